"""ONNX Runtime int8 on its own ``quantize_static`` file (QDQ, uint8 activations with zero points, int8 weights:
its defaults), run by edgeq's environment: a runner of benchmarks/peers.py (see runner.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from runner import calibration_batches, float_model, main

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def prepare(folder: Path, name: str) -> Path:
    """The float model exported to ONNX and quantized by ``quantize_static`` on the calibration batches."""
    from models import float_onnx, ort_quantize_static

    batches = calibration_batches(folder, name)
    float_path = float_onnx(float_model(folder, name), batches[0], folder / f"{name}-float.onnx")
    return ort_quantize_static(float_path, folder / f"{name}-onnxruntime.onnx", [b.numpy() for b in batches])


def load(path: Path, threads: int, x: np.ndarray) -> Callable[[], object]:
    """A session with ONNX Runtime's default optimizations on ``threads`` intra-op threads that do not spin."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


if __name__ == "__main__":
    main(prepare, load)
