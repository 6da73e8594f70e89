"""How far the performance estimator is from measured latency on this machine (the x86_64-native target).

For each model: quantize (random init, calibrated on random data), compile for this CPU, estimate with the
calibrated CPU figures (``edgeq.perf``), then measure the artifact: total latency of ``main`` and the time of
every kernel call (the Relax VM's instrument hook), mapped to ops through the compiled graph. Prints the total
error and the Spearman rank correlation between estimated and measured time per kernel call (the ops TVM fused
into one kernel are summed). Goal: |total error| <= 20 %, Spearman >= 0.9.

Each model is compared in several rounds. In each, the model is measured in the same interleaved runs as the
calibration networks (``edgeq.perf.calibrate.calibrate_alongside``): this VM's speed drifts by up to 2x within
minutes, and figures measured a minute before the model would price its kernels at another speed. The round of
median error is printed, with every round's error and Spearman correlation.

    .venv/bin/python benchmarks/perf_estimator_error.py [--models resnet18,mobilenet_v2,digits] [--rounds 5]
        [--worst 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import importlib.util
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from models import integer_model, torchvision_model  # noqa: E402

from edgeq.compile import compile_model  # noqa: E402
from edgeq.compile.compiled_graph import CompiledGraph  # noqa: E402
from edgeq.perf.calibrate import calibrate_alongside  # noqa: E402
from edgeq.perf.estimate import estimate  # noqa: E402
from edgeq.perf.vela_compare import spearman  # noqa: E402
from edgeq.targets import load_target  # noqa: E402

TARGET = "x86_64-native"


def _digits() -> tuple[torch.nn.Module, torch.Tensor]:
    spec = importlib.util.spec_from_file_location("digits_qat", REPO / "examples" / "digits_qat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DigitsNet().eval(), torch.randn(1, 1, 8, 8)


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if name == "digits":
        return _digits()
    return torchvision_model(name), torch.randn(1, 3, 224, 224)


@dataclass(frozen=True)
class KernelTimes:
    """Kernel calls ops tie together (one call, or an op's several: :meth:`Measurement.call_groups`): the first op in
    them, and their estimated and measured time (ms; the ops in them summed)."""

    op: str
    estimated: float
    measured: float


@dataclass(frozen=True)
class Round:
    """One comparison: the estimated and measured latency (ms), and the times of every kernel call."""

    estimated: float
    measured: float
    kernels: list[KernelTimes]

    @property
    def error(self) -> float:
        return (self.estimated - self.measured) / self.measured

    @property
    def spearman(self) -> float:
        return spearman([k.estimated for k in self.kernels], [k.measured for k in self.kernels])


def compare(artifact: Path, graph: CompiledGraph) -> Round:
    """Calibrate this CPU's figures while measuring ``artifact`` in the same runs, and estimate ``graph`` with
    them."""
    target = load_target(TARGET)
    calibration, (measured,) = calibrate_alongside(target, [artifact])
    estimated = estimate(graph, target, calibration.figures, "measured alongside", str(artifact))
    latency = {layer.op.name: layer.latency_ms for layer in estimated.layers}
    kernels = [KernelTimes(ops[0].name, sum(latency[op.name] for op in ops), seconds * 1e3) for ops, seconds in measured.call_groups(graph)]
    mapped = {place for op in graph.ops for place in measured.places(op.name)}
    unmapped = [c for c in measured.calls if (c.region, c.index) not in mapped]
    if unmapped:
        print(f"    {len(unmapped)} kernel calls map to no op ({sum(c.seconds for c in unmapped) * 1e3:.3f} ms)")
    return Round(estimated.summary.latency_ms, measured.latency_s * 1e3, kernels)


def run(name: str, rounds: int, worst: int, folder: Path) -> None:
    torch.manual_seed(0)
    model, example = _model(name)
    result = compile_model(integer_model(model, example, TARGET), (example,), target=TARGET, out=folder / f"{name}.edgeq", progress=lambda _: None)
    results = sorted((compare(result.artifact, result.graph) for _ in range(rounds)), key=lambda r: r.error)
    middle = results[len(results) // 2]
    rhos = sorted(r.spearman for r in results)
    print(
        f"{name:13} estimated {middle.estimated:8.3f} ms  measured {middle.measured:8.3f} ms  error {100 * middle.error:+6.1f} % "
        f"(median of {rounds} rounds: {', '.join(f'{100 * r.error:+.0f}' for r in results)})  Spearman {statistics.median(rhos):.3f} "
        f"({', '.join(f'{r:.2f}' for r in rhos)}) over {len(middle.kernels)} kernels"
    )
    for kernel in sorted(middle.kernels, key=lambda k: -abs(k.estimated - k.measured))[:worst]:
        print(f"    {kernel.op[:48]:48} estimated {kernel.estimated:9.4f} ms, measured {kernel.measured:9.4f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v2,digits")
    parser.add_argument(
        "--rounds", type=int, default=5,
        help="comparisons per model, each calibrating in the same runs as it measures; the median one is printed",
    )
    parser.add_argument("--worst", type=int, default=3, help="kernels printed per model, largest difference first")
    args = parser.parse_args()
    print(f"target {TARGET} (this machine), {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            run(name, args.rounds, args.worst, Path(folder))


if __name__ == "__main__":
    main()
