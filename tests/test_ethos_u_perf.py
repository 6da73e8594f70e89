"""edgeq's own Ethos-U estimate (the block model, docs/perf.md) against Vela's, on the digits CNN: the bounds
docs/perf.md states for it, and a firmware-host target estimated without CPU figures."""

from __future__ import annotations

import pytest
import torch
from models import SmallCNN, integer_model

from edgeq.compile.graph_source import compiled_graph_of
from edgeq.export.sources import quantized_form
from edgeq.perf import estimate_graph
from edgeq.perf.vela_compare import compare, spearman, vela_regions
from edgeq.targets import load_target

DIGITS_ERROR = 0.20
"""docs/perf.md, "Against Vela": the digits CNN's total within 20 % of Vela's..."""
DIGITS_SPEARMAN = 0.75
"""...and its op groups ranked with Spearman's correlation at least 0.75 (7 groups)."""


def test_spearman_of_ranks_with_ties():
    assert spearman([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]) == pytest.approx(1.0)
    assert spearman([1.0, 2.0, 3.0], [30.0, 20.0, 10.0]) == pytest.approx(-1.0)
    assert spearman([1.0, 1.0, 2.0], [5.0, 5.0, 9.0]) == pytest.approx(1.0)


@pytest.mark.flow
@pytest.mark.parametrize("target_name", ["ethos-u55-128", "ethos-u65-256"])
def test_digits_estimate_against_vela(target_name):
    torch.manual_seed(0)
    example = torch.randn(1, 1, 8, 8)
    int_model = integer_model(SmallCNN().eval(), example, target_name)
    target = load_target(target_name)
    graph = compiled_graph_of(int_model, (example,), target)
    result = estimate_graph(graph, target, "digits")
    if target.firmware_host is not None:
        assert result.figures["cpu"] is None and result.summary.cpu_ms == 0
    vela = vela_regions(quantized_form(int_model, (example,))[0], graph, target)
    comparison = compare(result, vela)
    assert comparison.vela_ms == pytest.approx(sum(r.summary.inference_time_s for r in vela.values()) * 1e3)
    assert abs(comparison.error) <= DIGITS_ERROR, comparison
    assert comparison.spearman >= DIGITS_SPEARMAN, comparison
    assert {op for group in comparison.groups for op in group.ops} <= {op.name for op in graph.ops}
