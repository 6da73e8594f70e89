"""How closely ONNX Runtime, running edgeq's QDQ ONNX files, agrees with the integer model.

For resnet18, mobilenet_v2 (random init, BatchNorm statistics set on random data) and the digits example CNN
(trained by examples/digits_qat.py), on npu-m (fixed-point scales) and npu-s (power-of-two scales), prints

- per op: each op fed the integer model's exact inputs, the share of int8 outputs that differ and the largest
  difference, in steps of the output scale;
- end to end: the share of model outputs within one step (int32 outputs in steps of range / 127).

ORT runs as edgeq.export.peer.session configures it on this CPU (printed first), or as ``--peer`` names.

    .venv/bin/python benchmarks/onnx_runtime_fidelity.py [--images 64] [--peer fused|fused-u8u8|float]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from models import integer_model, torchvision_model  # noqa: E402

from edgeq.export import build_onnx  # noqa: E402
from edgeq.export.peer import PEER_PATHS, PeerPath, peer_path, per_op_differences, session  # noqa: E402


def digits_model(target: str, images: int) -> tuple:
    spec = importlib.util.spec_from_file_location("digits_qat", REPO / "examples" / "digits_qat.py")
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    workdir = Path(tempfile.mkdtemp())
    data = digits.load_pixels()
    torch.manual_seed(0)
    for stage in ("float", "calib", "qat"):
        digits.run_stage(stage, workdir, target, data, {})
    inputs = digits.normalise(data[2][:images])
    return digits.int_model(workdir, target), inputs[:2], inputs


def torchvision(name: str, target: str, images: int) -> tuple:
    torch.manual_seed(0)
    example = torch.randn(2, 3, 64, 64)
    return integer_model(torchvision_model(name), example, target), example, torch.randn(images, 3, 64, 64)


def measure(int_model, example: torch.Tensor, inputs: torch.Tensor, path: PeerPath) -> tuple[float, int, float]:
    per_op = per_op_differences(build_onnx(int_model, (example,)), int_model, inputs[: len(example)], path=path)
    differing = sum(int((d > 0).sum()) for d in per_op.values()) / sum(d.size for d in per_op.values())
    largest = max(int(d.max()) for d in per_op.values())
    (output,) = session(build_onnx(int_model, (inputs,)), path).run(None, {int_model.graph_module.graph.find_nodes(op="placeholder")[0].name: inputs.numpy()})
    exact = int_model(inputs).numpy()
    quant = int_model.output_quant()[0]
    step = quant.scale if quant.dtype == "int8" else np.abs(exact).max() / 127
    within = float((np.abs(output - exact) <= step * 1.0001).mean())
    return differing, largest, within


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--peer", choices=sorted(PEER_PATHS), help="ORT configuration (default: chosen for this CPU)")
    args = parser.parse_args()
    path = PEER_PATHS[args.peer] if args.peer else peer_path()
    print(f"ONNX Runtime path: {path.name} ({'named by --peer' if args.peer else path.reason})")
    print(f"{'model':<20}{'target':<8}{'per-op differing':>18}{'max':>5}{'end-to-end within 1 step':>27}")
    for name in ("resnet18", "mobilenet_v2", "digits CNN"):
        for target in ("npu-m", "npu-s"):
            if name == "digits CNN":
                int_model, example, inputs = digits_model(target, args.images * 8)
            else:
                int_model, example, inputs = torchvision(name, target, args.images)
            differing, largest, within = measure(int_model, example, inputs, path)
            print(f"{name:<20}{target:<8}{differing:>17.5%}{largest:>5}{within:>26.3%}", flush=True)


if __name__ == "__main__":
    main()
