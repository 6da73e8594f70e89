"""How far edgeq's own Ethos-U estimate is from Vela's (Arm's compiler model of the NPU, not silicon).

For each model and target: quantize (random init, calibrated on generated data), compile edgeq's graph (check's
placement, NPU regions), write each NPU region as TOSA and compile it with the Vela driver, estimate with edgeq's
block model (``edgeq.perf``), then compare per op (Vela's layers summed per op of edgeq's graph through the TOSA
writer's operator map; ops Vela fuses grouped). Prints the total error and the Spearman rank correlation per
model and target, and the README's figures: NPU ops share, Vela's inference time and SRAM use, edgeq's estimate.
Goal: |total error| <= 20 %, Spearman >= 0.9. Nothing here is timed: both sides are models.

    .venv/bin/python benchmarks/ethos_u_estimator_error.py [--models digits,mobilenet_v2,resnet18,...]
        [--targets ethos-u55-128,ethos-u65-256,ethos-u85-256] [--size 224] [--worst 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from models import YoloStyleDetector, integer_model, torchvision_model  # noqa: E402

from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.perf import perf_model  # noqa: E402
from edgeq.perf.estimate import view_op  # noqa: E402
from edgeq.perf.vela_compare import VelaComparison  # noqa: E402
from edgeq.targets import load_target  # noqa: E402

TARGETS = ("ethos-u55-128", "ethos-u65-256", "ethos-u85-256")


def _digits() -> tuple[torch.nn.Module, torch.Tensor]:
    spec = importlib.util.spec_from_file_location("digits_qat", REPO / "examples" / "digits_qat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DigitsNet().eval(), torch.randn(1, 1, 8, 8)


def model_named(name: str, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and an example input: the example digits CNN (8x8), the YOLO-style detector or a torchvision model."""
    if name == "digits":
        return _digits()
    model = YoloStyleDetector() if name == "yolo" else torchvision_model(name)
    return model.eval(), torch.randn(1, 3, size, size)


@dataclass(frozen=True)
class Row:
    """One model on one target: the comparison, the share of computing ops on the NPU, Vela's SRAM use."""

    model: str
    target: str
    comparison: VelaComparison
    npu_share: float
    sram_bytes: int


def run(name: str, target_name: str, size: int) -> Row:
    """Quantize ``name`` for ``target_name``, compile its NPU regions with Vela and compare the estimates."""
    torch.manual_seed(0)
    model, example = model_named(name, size)
    target = load_target(target_name)
    int_model = integer_model(model, example, target_name)
    with tempfile.TemporaryDirectory() as folder:
        result = perf_model(int_model, (example,), out_dir=folder, target=target)  # compiles, Vela on each NPU region
    comparison, graph = result.vela, result.graph
    assert comparison is not None
    computing = [op for op in graph.ops if not view_op(op)]
    share = sum(op.placement == "NPU" for op in computing) / len(computing)
    return Row(name, target_name, comparison, share, max((r.summary.sram_bytes for r in comparison.regions), default=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits,mobilenet_v2,resnet18,mobilenet_v3_small,yolo")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--size", type=int, default=224, help="input size of the torchvision models (the YOLO-style one: 64)")
    parser.add_argument("--worst", type=int, default=3, help="op groups printed per row, largest difference first")
    args = parser.parse_args()
    for name in args.models.split(","):
        for target in args.targets.split(","):
            try:
                row = run(name, target, 64 if name == "yolo" else args.size)
            except EdgeqError as error:  # a model the target cannot run (the U55 has no host for what it lacks)
                print(f"{name:18} {target:14} not compiled: {str(error).splitlines()[0]}", flush=True)
                continue
            c = row.comparison
            print(
                f"{name:18} {target:14} NPU ops {100 * row.npu_share:5.1f} %  Vela {c.vela_ms:8.3f} ms  SRAM {row.sram_bytes / 1024:7.1f} KiB  "
                f"edgeq {c.estimated_ms:8.3f} ms  error {100 * c.error:+6.1f} %  Spearman {c.spearman:.3f} over {len(c.groups)} op groups",
                flush=True,
            )
            for group in sorted(c.groups, key=lambda g: -abs(g.estimated_ms - g.vela_ms))[: args.worst]:
                print(f"    {' + '.join(group.ops)[:70]:70} edgeq {group.estimated_ms:8.4f} ms, Vela {group.vela_ms:8.4f} ms")


if __name__ == "__main__":
    main()
