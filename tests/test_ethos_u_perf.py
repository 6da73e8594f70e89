"""edgeq's own Ethos-U estimate (the block model, docs/perf.md) against Vela's, on the digits CNN: the bounds
docs/perf.md states for it, a firmware-host target estimated without CPU figures, and ``edgeq perf``'s Vela
section for a model (Vela run) and an artifact (the estimate compile stores)."""

from __future__ import annotations

import json

import pytest
import torch
from models import SmallCNN, integer_model, rewrite_artifact

from edgeq.compile import compile_model
from edgeq.compile.compiled_graph import CompiledGraphError
from edgeq.export import to_onnx
from edgeq.perf import perf_model
from edgeq.perf.text import perf_region_lines
from edgeq.perf.vela_compare import artifact_vela_regions, spearman
from edgeq.targets import load_target

DIGITS_ERROR = 0.20
"""docs/perf.md, "Against Vela": the digits CNN's total within 20 % of Vela's..."""
DIGITS_SPEARMAN = 0.85
"""...and its op groups ranked with Spearman's correlation at least 0.85 (7 groups; 1.0 and 0.89 measured, 0.75 the
bound until the layers' first and last blocks and their wait for weights were costed)."""


def test_spearman_of_ranks_with_ties():
    assert spearman([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]) == pytest.approx(1.0)
    assert spearman([1.0, 2.0, 3.0], [30.0, 20.0, 10.0]) == pytest.approx(-1.0)
    assert spearman([1.0, 1.0, 2.0], [5.0, 5.0, 9.0]) == pytest.approx(1.0)


@pytest.mark.flow
@pytest.mark.parametrize("target_name", ["ethos-u55-128", "ethos-u65-256"])
def test_digits_estimate_against_vela(target_name, tmp_path):
    torch.manual_seed(0)
    example = torch.randn(1, 1, 8, 8)
    int_model = integer_model(SmallCNN().eval(), example, target_name)
    target = load_target(target_name)
    result = perf_model(int_model, (example,), out_dir=tmp_path, target=target)  # compiles, Vela on each NPU region
    graph = result.graph
    if target.firmware_host is not None:
        assert result.figures["cpu"] is None and result.summary.cpu_ms == 0
    comparison = result.vela
    assert comparison is not None and comparison.regions
    assert comparison.vela_ms == pytest.approx(sum(r.summary.inference_time_s for r in comparison.regions) * 1e3)
    assert abs(comparison.error) <= DIGITS_ERROR, comparison
    assert comparison.spearman >= DIGITS_SPEARMAN, comparison
    assert {op for group in comparison.groups for op in group.ops} <= {op.name for op in graph.ops}


@pytest.fixture(scope="module")
def digits_u55(tmp_path_factory):
    """The digits CNN quantized for ethos-u55-128: its QDQ file and its artifact."""
    folder = tmp_path_factory.mktemp("digits_u55")
    torch.manual_seed(0)
    example = torch.randn(1, 1, 8, 8)
    int_model = integer_model(SmallCNN().eval(), example, "ethos-u55-128")
    onnx = to_onnx(int_model, (example,), folder / "digits.onnx")
    artifact = compile_model(onnx, target="ethos-u55-128", out=folder / "digits.edgeq", simulate=True, progress=lambda _: None).artifact
    return onnx, artifact


@pytest.mark.flow
def test_perf_of_a_model_runs_vela(digits_u55, tmp_path):
    """A model (not compiled yet): Vela runs on the NPU region's TOSA; report.json, the HTML report and the
    terminal lines show its estimate beside edgeq's."""
    result = perf_model(digits_u55[0], out_dir=tmp_path)
    assert result.vela is not None and result.figures["vela_source"].startswith("Vela run on each NPU region")
    report = json.loads(result.report_json.read_text())
    assert report["vela"]["regions"][0]["summary"]["total_cycles"] == result.vela.regions[0].summary.total_cycles
    assert sum(g["vela"]["cycles"] for g in report["vela"]["groups"]) == sum(layer.cycles for layer in result.vela.regions[0].layers)
    assert "Vela's estimate of the NPU" in result.report_html.read_text()
    lines = perf_region_lines(result)
    assert lines[0].startswith("region0_npu (NPU, 11 ops): edgeq ") and "cycles at 500 MHz" in lines[0]
    assert any(line.startswith("  conv3/Conv + conv3/Relu: edgeq ") for line in lines)


@pytest.mark.flow
def test_perf_of_an_artifact_reads_the_stored_estimate(digits_u55, tmp_path):
    """An artifact: Vela's estimate is the one compile stored (``npu_command_streams`` in the manifest,
    ``<region>.vela.json``), equal to Vela run on the model; a damaged one is one error naming the region."""
    ran = perf_model(digits_u55[0], out_dir=tmp_path / "model").vela
    result = perf_model(digits_u55[1], out_dir=tmp_path / "artifact")
    assert result.figures["vela_source"] == "stored in the artifact by edgeq compile"
    assert result.vela == ran
    assert artifact_vela_regions(digits_u55[1]) == {region.region: region for region in ran.regions}
    member = f"{ran.regions[0].region}.vela.json"
    broken = rewrite_artifact(digits_u55[1], tmp_path / "broken.edgeq", lambda manifest, members: members.update({member: b"{}"}))
    with pytest.raises(CompiledGraphError, match=r"broken.edgeq: Vela's estimate of region0_npu cannot be read \('layers'\); compile the model again"):
        artifact_vela_regions(broken)
