"""The edge models on each Arm Ethos-U target: mobilenet_v2, resnet18, mobilenet_v3_small (lookup tables, products)
and the YOLO-style detector (split, concat, nearest upsampling) at 64x64, on ethos-u55-128, ethos-u65-256 and
ethos-u85-256 (the digits CNN: test_ethos_u_compile.py).

Each model is quantized once and shared by the three targets, which quantize it alike (asserted per model). The TOSA
reference model runs its TOSA graph == the integer model. Compiled once per target with the simulation: the artifact
run by the Python runtime == the integer model; check places the whole model on the NPU, and Vela compiles that one
region, whose TOSA file is the graph the reference model ran: check's placement is what Vela accepts. edgeq's own
estimate is within 20 % of Vela's and ranks the layers as Vela does (Spearman >= 0.9; issue 31's goals)."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from ethos_u import assert_equal, assert_reference_equals, assert_vela_compiled_every_npu_region, expected, python_outputs
from models import YoloStyleDetector, integer_model, torchvision_model

from edgeq.check.report import Placement
from edgeq.compile import CompileResult, compile_model
from edgeq.export.tosa import TosaGraph, tosa_graph
from edgeq.perf import perf_model
from edgeq.quantization.integer_model import IntegerModel

pytestmark = pytest.mark.flow  # quantizes four networks, compiles each for three targets with TVM and Vela

MODELS = ("mobilenet_v2", "resnet18", "mobilenet_v3_small", "yolo")
TARGETS = ("ethos-u55-128", "ethos-u65-256", "ethos-u85-256")
QUANTIZED_FOR = "ethos-u65-256"
"""Each model is quantized for this target; the others quantize it alike (test_the_targets_quantize_alike)."""
CASES = [(name, target) for name in MODELS for target in TARGETS]
SHAPE = (1, 3, 64, 64)


@dataclass(frozen=True)
class Quantized:
    """A model's integer model, its TOSA graph, and an input drawn apart from the calibration."""

    int_model: IntegerModel
    graph: TosaGraph
    x: torch.Tensor


def quantize(name: str, target: str) -> IntegerModel:
    """The model (random init, seed 0) calibrated for ``target`` on random batches and converted."""
    torch.manual_seed(0)
    model = YoloStyleDetector() if name == "yolo" else torchvision_model(name)
    return integer_model(model.eval(), torch.randn(SHAPE), target)


@pytest.fixture(scope="module")
def quantized() -> Callable[[str], Quantized]:
    """Each model quantized for QUANTIZED_FOR and written as TOSA, once per module."""
    made: dict[str, Quantized] = {}

    def of(name: str) -> Quantized:
        if name not in made:
            int_model = quantize(name, QUANTIZED_FOR)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
            made[name] = Quantized(int_model, tosa_graph(int_model, (x,)), x)
        return made[name]

    return of


@pytest.fixture(scope="module", params=CASES, ids=["-".join(case) for case in CASES])
def compiled(request, quantized, tmp_path_factory) -> tuple[str, Quantized, CompileResult]:
    """The shared integer model compiled once for the target."""
    name, target = request.param
    model = quantized(name)
    out = tmp_path_factory.mktemp(f"{name}-{target}") / f"{name}.edgeq"
    return target, model, compile_model(model.int_model, (model.x,), target=target, out=out, simulate=True)


@pytest.mark.parametrize("name", MODELS)
def test_the_targets_quantize_alike(quantized, name):
    """The model quantized for each other target is the shared integer model: its graph, weights, every tensor's
    quantization, its rounding rule, and the TOSA graph of its arithmetic."""
    shared = quantized(name)
    for target in [t for t in TARGETS if t != QUANTIZED_FOR]:
        int_model = quantize(name, target)
        assert int_model.target == target and int_model.rounding == shared.int_model.rounding
        assert int_model.graph_module.code == shared.int_model.graph_module.code
        assert int_model.tensor_quant == shared.int_model.tensor_quant
        weights, shared_weights = int_model.graph_module.state_dict(), shared.int_model.graph_module.state_dict()
        assert weights.keys() == shared_weights.keys() and all(torch.equal(weights[k], shared_weights[k]) for k in weights)
        assert tosa_graph(int_model, (shared.x,)).flatbuffer == shared.graph.flatbuffer


@pytest.mark.parametrize("name", MODELS)
def test_tosa_reference_model_equals_the_integer_model(quantized, name):
    model = quantized(name)
    generator = torch.Generator().manual_seed(4)
    assert assert_reference_equals(model.int_model, model.graph, [model.x, torch.randn(SHAPE, generator=generator)]) > 0


def test_artifact_equals_the_integer_model(compiled):
    _, model, result = compiled
    assert_equal(python_outputs(result.artifact, model.x), expected(model.int_model, model.x))


def test_vela_compiled_the_whole_model(compiled):
    """check places every op on the NPU, one region; Vela compiled it, and its TOSA file is the model's graph."""
    target, model, result = compiled
    assert [r.placement for r in result.partition.regions] == [Placement.NPU]
    assert_vela_compiled_every_npu_region(result, target)
    (stream,) = result.manifest["npu_command_streams"]
    with zipfile.ZipFile(result.artifact) as archive:
        assert archive.read(stream["tosa"]) == model.graph.flatbuffer


ESTIMATE_ERROR = 0.20
"""edgeq's estimate of the NPU regions against Vela's (docs/perf.md, "Against Vela"): within 20 %..."""
ESTIMATE_SPEARMAN = 0.9
"""...and its layers ranked as Vela's with Spearman's correlation at least 0.9 (issue 31's goals)."""

ESTIMATE_MISSES: dict[str, str] = {}
"""Cases whose total is known to miss the 20 % goal, and why; a strict xfail, so a fix says to remove it (the
YOLO-style detector on the U85 was +27 % until a split cost nothing and each layer waited only for the weights the
one before left to bring)."""
RANKING_MISSES = {
    "yolo-ethos-u85-256": "Spearman 0.66: the U85's block model is the U65's in edgeq (its own block configs, 16-byte "
    "input runs and per-block halos of its 6x16 stem blocks are Vela's C++ ArchEthosU85::FindBlockConfig)",
}
"""Cases whose ranking is known to miss 0.9, and why (strict xfails; the detector on the U65 ranked 0.85 until its
layers' first and last blocks and their wait for weights were costed)."""


def _vela_comparison(compiled, request, misses, tmp_path):
    case = request.node.callspec.id
    if case in misses:
        request.applymarker(pytest.mark.xfail(strict=True, reason=misses[case]))
    _, _, result = compiled
    comparison = perf_model(result.artifact, out_dir=tmp_path).vela
    assert comparison is not None
    return comparison


def test_estimate_within_20_percent_of_velas(compiled, request, tmp_path):
    """The estimator's block and memory models (docs/perf.md, "NPU layers by blocks") against the estimate compile
    stored: the YOLO-style detector's was 55 % short on the U65 before the memory model."""
    comparison = _vela_comparison(compiled, request, ESTIMATE_MISSES, tmp_path)
    assert abs(comparison.error) <= ESTIMATE_ERROR, comparison.error


def test_estimate_ranks_layers_as_vela(compiled, request, tmp_path):
    """The layers' order by cost: Vela's output stage, pooling and elementwise cycles (docs/perf.md) took
    mobilenet_v3_small on the U65 from Spearman 0.69 to 0.97 at 64x64."""
    comparison = _vela_comparison(compiled, request, RANKING_MISSES, tmp_path)
    assert comparison.spearman >= ESTIMATE_SPEARMAN, comparison.spearman
