"""The coverage table of issue 32: each model through edgeq's default flow, as a new user would run it.

For each model (random init, no weights downloaded): ``calibrate`` (``prepare_qat_fx`` with the calibration qconfig,
then observing random batches of 2) -> ``convert_fx`` -> ``to_onnx`` -> ``compile_model`` for x86_64 -> the artifact
(Python runtime) against the integer model on one random input. Prints a markdown table: where the front end stopped
(or ok), whether compile did, the equality (exact; else the largest difference in output steps, the share within 1
step, and the float fallback's bound of docs/numerics.md checked region by region with
``edgeq.compile.float_regions``: each float region within 1 step of the integer model's given the same inputs, on at
most 0.1 % of its values, and the integer ops exact), and how many ops fell back to float (prepare's
FloatFallbackWarning, one per op).

Usage: python scripts/coverage_table.py [--size 64] [--work DIR] [MODEL ...]   (default: every model below)
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeq.compile import compile_model
from edgeq.compile.float_regions import FloatRegionComparison, float_region_differences
from edgeq.export import to_onnx
from edgeq.quantization import DeQuantStub, QuantStub, calibrate, convert_fx
from edgeq.quantization.prepare import FloatFallbackWarning
from edgeq_runtime import Model

TIMM_MODELS = [
    "mobilenetv3_large_100", "hardcorenas_a", "fbnetv3_b", "edgenext_xx_small", "hgnetv2_b0", "mobilevitv2_050", "tiny_vit_5m_224",
    # the "keep passing" list
    "efficientnet_lite0", "mixnet_s", "rexnet_100", "mobileone_s0", "regnetz_005", "ese_vovnet19b_dw", "resnet18d", "cspdarknet53", "dla34",
]
SIZES = {"tiny_vit_5m_224": 224, "mobilevitv2_050": 224}
"""Models the issue runs at 224 (tiny_vit's windows need it); the others at ``--size``."""

CALIBRATION_BATCHES = 3
BOUND_STEPS = 1


class Quantized(nn.Module):
    """A model between a QuantStub and a DeQuantStub; a model returning several tensors gives its first."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.quant, self.model, self.dequant = QuantStub(), model, DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(self.quant(x))
        return self.dequant(out[0] if isinstance(out, (tuple, list)) else out)


def _yolov8n() -> nn.Module:
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel("yolov8n.yaml", verbose=False)


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return build


MODELS: dict[str, Callable[[], nn.Module]] = {"yolov8n": _yolov8n, **{name: _timm(name) for name in TIMM_MODELS}}


@dataclass
class Row:
    model: str
    front_end: str = "-"
    compiled: str = "-"
    equality: str = "-"
    float_ops: str = "-"

    def markdown(self) -> str:
        return f"| {self.model} | {self.front_end} | {self.compiled} | {self.equality} | {self.float_ops} |"


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return (text[:150] + "...") if len(text) > 150 else text.replace("|", "\\|")


def _end_to_end(got: np.ndarray, expected: np.ndarray) -> str:
    steps = np.abs(got.astype(np.int64) - expected.astype(np.int64))
    if not steps.any():
        return "equal"
    return f"max {steps.max()} steps, {100 * (steps <= BOUND_STEPS).mean():.2f} % within {BOUND_STEPS}"


def _by_region(comparison: FloatRegionComparison) -> str:
    """The float fallback's bound, region by region, and whether the integer ops between the regions are exact."""
    steps = np.concatenate([region.steps.ravel() for region in comparison.regions])
    exact = not any(difference.any() for difference in comparison.integer_ops.values())
    within = steps.max(initial=0) <= BOUND_STEPS and np.count_nonzero(steps) <= 0.001 * steps.size
    return (
        f"{'within' if within and exact else 'outside'} bound: {len(comparison.regions)} float regions, "
        f"{np.count_nonzero(steps)} of {steps.size} values off (max {steps.max(initial=0)} step), "
        f"integer ops {'exact' if exact else 'differ'}"
    )


def run(name: str, size: int, work: Path) -> Row:
    """One model through the default flow; the row says how far it got."""
    row = Row(name)
    size = SIZES.get(name, size)
    torch.manual_seed(0)
    stage = "build"
    try:
        model = Quantized(MODELS[name]()).eval()
        example = torch.randn(1, 3, size, size)
        stage = "prepare and calibrate"
        batches = (torch.randn(2, 3, size, size) for _ in range(CALIBRATION_BATCHES))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FloatFallbackWarning)
            prepared = calibrate(model, batches, example_inputs=(example,), target="x86_64")
        row.float_ops = str(sum(issubclass(w.category, FloatFallbackWarning) for w in caught))
        stage = "convert"
        int_model = convert_fx(prepared)
        stage = "to_onnx"
        path = to_onnx(int_model, (example,), work / f"{name}.onnx")
    except Exception as error:  # the table reports where and why each model stops
        row.front_end = f"{stage}: {_short(error)}"
        return row
    row.front_end = "ok"
    try:
        result = compile_model(path, target="x86_64", out=work / f"{name}.edgeq", progress=lambda _: None)
    except Exception as error:
        row.compiled = _short(error)
        return row
    row.compiled = "ok"
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with Model.load(result.artifact) as artifact:
        (got,) = artifact.run({"x": x.numpy()}, raw=True).values()
    row.equality = _end_to_end(got, int_model.run_integer(x).numpy())
    if row.equality != "equal":
        comparison = float_region_differences(path, int_model, (x,), "x86_64", work / f"{name}.probes")
        row.equality = f"{_by_region(comparison)}; end to end {row.equality}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"any of: {', '.join(MODELS)} (default: all)")
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    parser.add_argument("--work", type=Path, help="folder for the ONNX files and artifacts (default: a temporary one)")
    args = parser.parse_args()
    names = args.models or list(MODELS)
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    print("| model | front end | compile x86_64 | artifact vs integer model | ops in float |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            print(run(name, args.size, work).markdown(), flush=True)


if __name__ == "__main__":
    main()
