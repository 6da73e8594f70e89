"""Where the time goes, as chart data: bars with their share of the largest, drawn as inline SVG by the template."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edgeq.perf.result import PerfResult
from edgeq.visualize.graph_dot import PLACEMENT_COLOURS, TRANSITION_COLOUR

NEUTRAL = "#607d8b"


@dataclass(frozen=True)
class Bar:
    """One bar: its label, value (ms), length relative to the longest bar (0..1), colour and tooltip."""

    label: str
    value: float
    fraction: float
    colour: str
    tooltip: str


def _bars(rows: Iterable[tuple[str, float, str, str]]) -> list[Bar]:
    rows = list(rows)
    largest = max((value for _, value, _, _ in rows), default=0.0)
    return [Bar(label, value, value / largest if largest > 0 else 0.0, colour, tooltip) for label, value, colour, tooltip in rows]


def _colour(placement: str) -> str:
    return PLACEMENT_COLOURS[placement].border if placement in PLACEMENT_COLOURS else NEUTRAL


def per_layer(result: PerfResult) -> list[Bar]:
    """Every layer's latency, in call order, coloured by placement."""
    return _bars(
        (
            layer.op.name,
            layer.latency_ms,
            _colour(layer.op.placement),
            f"{layer.op.name} ({layer.op.op}, {layer.op.placement}): {layer.latency_ms:.4g} ms, {layer.bound}",
        )
        for layer in result.layers
    )


def per_op_kind(result: PerfResult) -> list[Bar]:
    """Latency summed by op kind, largest first."""
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for layer in result.layers:
        totals[layer.op.op] = totals.get(layer.op.op, 0.0) + layer.latency_ms
        counts[layer.op.op] = counts.get(layer.op.op, 0) + 1
    ranked = sorted(totals.items(), key=lambda item: -item[1])
    return _bars((op, ms, NEUTRAL, f"{op}: {counts[op]} layer(s), {ms:.4g} ms") for op, ms in ranked)


def per_placement(result: PerfResult) -> list[Bar]:
    """Latency on the NPU, on the CPU, in NPU<->CPU transitions and in the runtime's call of the model (those that
    are not zero)."""
    summary = result.summary
    rows = [
        ("NPU", summary.npu_ms, _colour("NPU")),
        ("CPU", summary.cpu_ms, _colour("CPU")),
        ("transitions", summary.transition_ms, TRANSITION_COLOUR),
        ("invocation", summary.invocation_ms, NEUTRAL),
    ]
    return _bars((label, ms, colour, f"{label}: {ms:.4g} ms") for label, ms, colour in rows if ms > 0)
