"""edgeq's compiled artifact (-O2, default schedules or tuned), float input and output, run by edgeq's Python
runtime in edgeq's environment: a runner of benchmarks/peers.py (see runner.py).

The model is quantized by edgeq for ``EDGEQ_TARGET`` (npu-m, as benchmarks/latency.py), exported as QDQ ONNX and
compiled for this CPU (``simulate=True``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from runner import calibration_batches, float_model, main

REPO = Path(__file__).resolve().parents[2]
EDGEQ_TARGET = "npu-m"


def prepare(folder: Path, name: str, tune_minutes: float | None) -> Path:
    """The float model quantized by edgeq (calibrated on the batches), exported and compiled; with
    ``tune_minutes``, compiled with the records of ``edgeq tune`` run that long on this machine first."""
    sys.path.insert(0, str(REPO / "tests"))
    from models import Wrapped

    from edgeq.compile import compile_model
    from edgeq.export import to_onnx
    from edgeq.quantization import calibrate, convert_fx
    from edgeq.tune import tune_model

    batches = calibration_batches(folder, name)
    example = (batches[0],)
    int_model = convert_fx(calibrate(Wrapped(float_model(folder, name)), batches, example_inputs=example, target=EDGEQ_TARGET))
    qdq_path = to_onnx(int_model, example, folder / f"{name}-edgeq.onnx")
    suffix, records = ("-tuned", folder / f"{name}-records") if tune_minutes else ("", None)
    if records is not None:
        tune_model(qdq_path, target=EDGEQ_TARGET, simulate=True, budget_minutes=tune_minutes, records=records,
                   progress=lambda line: print(line, file=sys.stderr))
    result = compile_model(qdq_path, target=EDGEQ_TARGET, out=folder / f"{name}-edgeq{suffix}.edgeq", opt_level=2, simulate=True,
                           tuning_records=records, tuned=records is not None)
    return result.artifact


def load(path: Path, threads: int, x: np.ndarray) -> Callable[[], object]:
    """The artifact in edgeq's Python runtime on ``threads`` threads."""
    from edgeq_runtime import Model

    model = Model.load(path, num_threads=threads)
    return lambda: model.run(x)


if __name__ == "__main__":
    main(prepare, load, tunable=True)
