"""``report.html``: the perf estimate, the check's reasons, per-layer accuracy and the compiled graph in one page.

One self-contained file (inline CSS, JavaScript and SVG; nothing is fetched), rendered from the template
``templates/report.html.j2`` with jinja2: summary figures, charts of where the time goes (per layer, per op kind,
NPU vs CPU), a sortable per-layer table (placement, op, shapes, MACs, bytes, estimated time, bound, reasons and
advice), the NPU<->CPU transitions, per-layer accuracy when measured (:mod:`.accuracy`), and the compiled graph
drawn by :mod:`edgeq.visualize`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
from markupsafe import Markup

from edgeq import __version__
from edgeq.compile.compiled_graph import GraphOp
from edgeq.fileio import atomic_write
from edgeq.perf.result import LayerEstimate, PerfResult
from edgeq.report import charts
from edgeq.report.accuracy import COSINE_FLOOR, LayerAccuracy
from edgeq.units import bytes_text, count_text, shape_text
from edgeq.visualize import PLACEMENT_COLOURS, graph_svg

__all__ = ["REPORT_HTML", "render_report", "write_report"]

logger = logging.getLogger(__name__)

REPORT_HTML = "report.html"


@dataclass(frozen=True)
class Row:
    """One line of the per-layer table: the estimate (of the compiled graph's op) and its accuracy (if measured)."""

    index: int
    layer: LayerEstimate
    input_shapes: str
    output_shape: str
    share: float
    accuracy: LayerAccuracy | None

    @property
    def op(self) -> GraphOp:
        """The compiled graph's op."""
        return self.layer.op


def _milliseconds(value: float) -> str:
    """``12.3 ms``, ``45.6 µs``, ``0.8 µs``."""
    return f"{value:.3g} ms" if value >= 1 else f"{value * 1000:.3g} µs"


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("edgeq.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(bytes=bytes_text, count=count_text, ms=_milliseconds, shape=shape_text)
    return environment


def _inline_svg(svg: str) -> Markup:
    """Graphviz's SVG without its XML prolog and DOCTYPE (which names a URL), to sit inside the HTML."""
    return Markup(re.sub(r"^.*?(?=<svg)", "", svg, flags=re.DOTALL))


def render_report(result: PerfResult, accuracy: Sequence[LayerAccuracy] | None = None) -> str:
    """The report page of ``result`` as HTML text (see the module docstring)."""
    graph = result.graph
    by_op = {a.op: a for a in accuracy or () if a.op is not None}
    total = result.summary.latency_ms
    rows = []
    for index, layer in enumerate(result.layers):
        rows.append(
            Row(
                index=index,
                layer=layer,
                input_shapes=", ".join(shape_text(graph.tensors[t].shape) for t in layer.op.inputs),
                output_shape=", ".join(shape_text(graph.tensors[t].shape) for t in layer.op.outputs),
                share=layer.latency_ms / total if total > 0 else 0.0,
                accuracy=by_op.get(layer.op.name),
            )
        )
    flagged = [a for a in accuracy or () if a.flagged]
    template = _environment().get_template("report.html.j2")
    return template.render(
        result=result,
        graph=graph,
        summary=result.summary,
        rows=rows,
        fallback=[row for row in rows if row.op.reasons],
        accuracy=list(accuracy) if accuracy is not None else None,
        flagged=flagged,
        cosine_floor=COSINE_FLOOR,
        per_layer=charts.per_layer(result),
        per_op_kind=charts.per_op_kind(result),
        per_placement=charts.per_placement(result),
        colours=PLACEMENT_COLOURS,
        graph_svg=_inline_svg(graph_svg(graph)),
        version=__version__,
    )


def write_report(result: PerfResult, out_dir: str | Path, accuracy: Sequence[LayerAccuracy] | None = None) -> Path:
    """Write ``out_dir/report.html`` (atomically) and return its path."""
    path = Path(out_dir) / REPORT_HTML
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary:
        Path(temporary).write_text(render_report(result, accuracy), encoding="utf-8")
    logger.info("wrote %s", path)
    return path
