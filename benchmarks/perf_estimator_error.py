"""How far the performance estimator is from measured latency on this machine (x86_64 target, native build).

For each model: quantize (random init, calibrated on random data), compile for this CPU, estimate with the
calibrated CPU figures (``edgeq.perf``), then measure the artifact: total latency of ``main`` and the time of
every kernel call (the Relax VM's instrument hook), mapped to ops through the compiled graph. Prints the total
error and the Spearman rank correlation between estimated and measured time per kernel call (the ops TVM fused
into one kernel are summed). Goal: |total error| <= 20 %, Spearman >= 0.9.

    .venv/bin/python benchmarks/perf_estimator_error.py [--models resnet18,mobilenet_v2,digits] [--runs 5]
        [--recalibrate]
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

from edgeq.compile import compile_model  # noqa: E402
from edgeq.perf import estimate_graph  # noqa: E402
from edgeq.perf.measure import measure  # noqa: E402
from edgeq.targets import load_target  # noqa: E402
from models import integer_model, torchvision_model  # noqa: E402

TARGET = "x86_64"


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (scipy's when installed; else Pearson's correlation of average ranks)."""
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])
    return float(spearmanr(a, b).statistic)


def _ranks(values: list[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for value in set(values):  # ties share their average rank
        tied = np.asarray(values) == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _digits() -> tuple[torch.nn.Module, torch.Tensor]:
    spec = importlib.util.spec_from_file_location("digits_qat", REPO / "examples" / "digits_qat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DigitsNet().eval(), torch.randn(1, 1, 8, 8)


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if name == "digits":
        return _digits()
    return torchvision_model(name), torch.randn(1, 3, 224, 224)


def run(name: str, runs: int, folder: Path, recalibrate: bool) -> None:
    torch.manual_seed(0)
    model, example = _model(name)
    result = compile_model(integer_model(model, example, TARGET), (example,), target=TARGET, out=folder / f"{name}.edgeq", progress=lambda _: None)
    estimated = estimate_graph(result.graph, load_target(TARGET), str(result.artifact), recalibrate)
    measured = measure(result.artifact, runs=runs)
    per_call: dict[tuple[tuple[str, int], ...], float] = {}  # estimated ms, by the kernel calls ops run in
    calls: dict[tuple[tuple[str, int], ...], float] = {}  # measured ms, by the same
    for layer in estimated.layers:
        key = tuple((c.region, c.index) for c in measured.ops.get(layer.name, ()))
        if key:
            per_call[key] = per_call.get(key, 0.0) + layer.latency_ms
            calls[key] = measured.op_seconds(layer.name) * 1e3
    keys = sorted(per_call)
    mapped = {place for key in keys for place in key}
    unmapped_calls = [c for c in measured.calls if (c.region, c.index) not in mapped]
    unmapped = sum(c.seconds * 1e3 for c in unmapped_calls)
    total = estimated.summary.latency_ms
    actual = measured.latency_s * 1e3
    rho = spearman([per_call[k] for k in keys], [calls[k] for k in keys])
    print(
        f"{name:13} estimated {total:9.2f} ms  measured {actual:9.2f} ms  error {100 * (total - actual) / actual:+6.1f} %  "
        f"Spearman {rho:.3f} over {len(keys)} kernels (unmapped calls: {len(unmapped_calls)}, {unmapped:.2f} ms)"
    )
    worst = sorted(keys, key=lambda k: -abs(per_call[k] - calls[k]))[:3]
    for key in worst:
        ops = [n for n, c in measured.ops.items() if tuple((x.region, x.index) for x in c) == key]
        print(f"    {ops[0][:48]:48} estimated {per_call[key]:8.3f} ms, measured {calls[key]:8.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v2,digits")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--recalibrate", action="store_true",
        help="measure this CPU's figures again right before each model (a VM whose speed drifts then costs the "
        "estimate less than between a cached calibration and the measurement)",
    )
    args = parser.parse_args()
    print(f"target {TARGET} (this machine), {torch.get_num_threads()} threads, {args.runs} runs per model")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            run(name, args.runs, Path(folder), args.recalibrate)


if __name__ == "__main__":
    main()
