"""The compiled graph as a Graphviz drawing: one box per fused op, one cluster per region, tensors on the edges.

Each op box names the op, its kind, the ONNX ops fused into it, its output's shape, dtype and scale, and its
MACs; its fill tells where it runs (:data:`PLACEMENT_COLOURS`). Regions are clusters with a border in their
placement's colour. An edge is a tensor, labelled with its shape and size; an edge that crosses from one placement
to another (an NPU <-> CPU transition, where data leaves or enters the NPU) is drawn thick and red. Hovering a box
shows the full name, the reasons it is not on the NPU, advice, the requantization and the TVM kernel.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import graphviz

from edgeq.compile.compiled_graph import CompiledGraph, GraphOp, Tensor
from edgeq.op_attrs import ActivationAttrs, Conv2dAttrs, LinearAttrs, WindowAttrs
from edgeq.units import bytes_text, count_text, shape_text

__all__ = ["PLACEMENT_COLOURS", "TRANSITION_COLOUR", "Colours", "graph_dot"]


@dataclass(frozen=True)
class Colours:
    """The fill of an op's box and the border of its region, for one placement."""

    fill: str
    border: str


PLACEMENT_COLOURS: dict[str, Colours] = {
    "NPU": Colours("#d3ecd6", "#2e7d32"),
    "CPU": Colours("#d6e6f7", "#1565c0"),
    "CPU (float)": Colours("#ffe3c2", "#e65100"),
    "unsupported": Colours("#f8d0d3", "#c62828"),
}
"""Colours by placement (the HTML report's table and charts use the same)."""

TRANSITION_COLOUR = "#d32f2f"
"""Edges where a tensor moves between placements."""

_BOUNDARY = Colours("#ffffff", "#616161")
_FONT = "Helvetica"
_MAX_NAME = 36
"""Longer op names are shortened in the middle (the tooltip has the full name)."""


def graph_dot(graph: CompiledGraph) -> graphviz.Digraph:
    """The Graphviz description of ``graph``; ``.pipe(format="svg")`` renders it.

    SVG element ids: ``op:<op name>`` for op boxes, ``input:<tensor>`` and ``output:<tensor>`` for the program's
    inputs and outputs, ``region:<region name>`` for region clusters.
    """
    return _Drawing(graph).dot


class _Drawing:
    """Builds the drawing of one graph (one instance per call)."""

    def __init__(self, graph: CompiledGraph) -> None:
        self.graph = graph
        self.ops = {op.name: op for op in graph.ops}
        self.ids = {name: f"in{i}" for i, name in enumerate(graph.inputs)}
        self.ids.update({op.name: f"op{i}" for i, op in enumerate(graph.ops)})
        self.ids.update({f"output:{name}": f"out{i}" for i, name in enumerate(graph.outputs)})
        self.dot = graphviz.Digraph(name="compiled_graph", engine="dot")
        self.dot.attr("graph", rankdir="TB", fontname=_FONT, fontsize="11", nodesep="0.35", ranksep="0.4",
                      tooltip=f"{graph.target.name} ({graph.arch})")
        self.dot.attr("node", shape="plain", fontname=_FONT, fontsize="10")
        self.dot.attr("edge", fontname=_FONT, fontsize="8", color="#757575", arrowsize="0.6", fontcolor="#424242")
        for name in graph.inputs:
            self.dot.node(self.ids[name], self._boundary_label("input", graph.tensors[name]), id=f"input:{name}", tooltip=name)
        placed = set()
        for region in graph.regions:
            colours = PLACEMENT_COLOURS.get(region.placement, _BOUNDARY)
            count = f"{len(region.ops)} op" + ("s" if len(region.ops) != 1 else "")
            with self.dot.subgraph(name=f"cluster_{region.name}") as cluster:
                cluster.attr(style="rounded,dashed", color=colours.border, penwidth="1.5", id=f"region:{region.name}",
                             tooltip=region.name)
                for name in region.ops:
                    self._op_node(cluster, self.ops[name])
                # The region's name is a node beside its first op: a cluster label would sit where edges come in.
                with cluster.subgraph() as first_rank:
                    first_rank.attr(rank="same")
                    title = f"<b>{_text(region.name)}</b><br/>{_text(region.placement)} · {count}"
                    first_rank.node(f"label_{region.name}", f"<<font color='{colours.border}'>{title}</font>>",
                                    shape="plaintext", id=f"region-label:{region.name}")
                    if region.ops:
                        first_rank.node(self.ids[region.ops[0]])
            placed.update(region.ops)
        for op in graph.ops:  # ops in no region: unsupported ones
            if op.name not in placed:
                self._op_node(self.dot, op)
        for name in graph.outputs:
            self.dot.node(self.ids[f"output:{name}"], self._boundary_label("output", graph.tensors[name]),
                          id=f"output:{name}", tooltip=name)
        self._edges()
        # Last, so that the clusters above do not inherit the title.
        self.dot.attr("graph", labelloc="t", label=self._title())

    def _title(self) -> str:
        """The target and the colour legend, as an HTML-like label."""
        used = [p for p in PLACEMENT_COLOURS if any(op.placement == p for op in self.graph.ops)]
        keys = "".join(
            f'<td bgcolor="{PLACEMENT_COLOURS[p].fill}" border="1" color="{PLACEMENT_COLOURS[p].border}">{_text(p)}</td>'
            for p in used
        )
        transition = f'<td><font color="{TRANSITION_COLOUR}"><b>→</b> transition</font></td>' if len(used) > 1 else ""
        target = self.graph.target
        heading = f"{target.name} ({target.kind}, {self.graph.arch} library)"
        return f'<<table border="0" cellspacing="4" cellpadding="3"><tr><td><b>{_text(heading)}</b></td>{keys}{transition}</tr></table>>'

    def _op_node(self, parent: graphviz.Digraph, op: GraphOp) -> None:
        colours = PLACEMENT_COLOURS.get(op.placement, _BOUNDARY)
        output = self.graph.tensors[op.outputs[0]] if op.outputs else None
        rows = [f"<b>{_text(_short(op.name))}</b>", f"{_text(_kind(op))} <font color='#616161'>{_text('+'.join(op.source_ops))}</font>"]
        if output is not None:
            rows.append(_text(f"{shape_text(output.shape)} {output.dtype}{_scale(output)}"))
        if op.macs:
            rows.append(_text(f"{count_text(op.macs)} MACs"))
        parent.node(self.ids[op.name], _box(rows, colours), id=f"op:{op.name}", tooltip=_tooltip(op))

    @staticmethod
    def _boundary_label(kind: str, tensor: Tensor) -> str:
        return _box([f"<b>{kind}</b> {_text(tensor.name)}", _text(f"{shape_text(tensor.shape)} {tensor.dtype}{_scale(tensor)}")], _BOUNDARY)

    def _edges(self) -> None:
        """One edge per (tensor, consumer); program outputs get an edge to their output node."""
        outputs = set(self.graph.outputs)
        for tensor in self.graph.tensors.values():
            if tensor.kind == "constant":
                continue
            tail = self.ids.get(tensor.producer) if tensor.producer else self.ids.get(tensor.name)
            if tail is None:
                continue
            made = self.ops[tensor.producer].placement if tensor.producer in self.ops else None
            for consumer in (c for c in tensor.consumers if c in self.ops):
                self._edge(tensor, tail, consumer, made)
            if tensor.name in outputs:
                self._edge(tensor, tail, f"output:{tensor.name}", None)

    def _edge(self, tensor: Tensor, tail: str, head: str, made: str | None) -> None:
        """The edge carrying ``tensor`` to ``head`` (an op name, or ``output:<tensor>``); ``made`` is the placement
        of the op that makes it."""
        label = f"{shape_text(tensor.shape)} · {bytes_text(tensor.bytes)}"
        tooltip = f"{tensor.name}: {shape_text(tensor.shape)} {tensor.dtype}, {bytes_text(tensor.bytes)}"
        read = self.ops[head].placement if head in self.ops else None
        if made is not None and read is not None and made != read:
            self.dot.edge(tail, self.ids[head], label=f"{made} → {read}\n{label}", color=TRANSITION_COLOUR, fontcolor=TRANSITION_COLOUR,
                          penwidth="2.5", tooltip=f"transition {made} → {read}: {tooltip}", id=f"transition:{tensor.name}:{head}")
        else:
            self.dot.edge(tail, self.ids[head], label=label, tooltip=tooltip)


def _box(rows: list[str], colours: Colours) -> str:
    """An HTML-like label: ``rows`` (already escaped) in a rounded box."""
    cells = "".join(f"<tr><td>{row}</td></tr>" for row in rows)
    style = f'border="1" cellborder="0" cellspacing="0" cellpadding="3" style="rounded" bgcolor="{colours.fill}" color="{colours.border}"'
    return f"<<table {style}>{cells}</table>>"


def _kind(op: GraphOp) -> str:
    """``conv2d 3x3/2 relu``: the op kind with its kernel, stride and fused activation."""
    words, attributes = [op.op], op.attributes
    if isinstance(attributes, WindowAttrs):
        words.append(shape_text(attributes.kernel) + (f"/{attributes.stride[0]}" if max(attributes.stride) > 1 else ""))
    if isinstance(attributes, Conv2dAttrs) and attributes.groups > 1:
        words.append(f"g{attributes.groups}")
    activation = attributes.activation if isinstance(attributes, (Conv2dAttrs, LinearAttrs, ActivationAttrs)) else None
    if activation and activation != "none":
        words.append(activation)
    return " ".join(words)


def _scale(tensor: Tensor) -> str:
    """`` s=0.0312`` for a per-tensor scale, `` 64 scales`` per channel, nothing for a float tensor."""
    if tensor.quant is None:
        return ""
    if len(tensor.quant.scale) == 1:
        zero = tensor.quant.zero_point[0] if tensor.quant.zero_point else 0
        return f" s={tensor.quant.scale[0]:.4g}" + (f" z={zero}" if zero else "")
    return f" {len(tensor.quant.scale)} scales"


def _short(name: str) -> str:
    if len(name) <= _MAX_NAME:
        return name
    keep = (_MAX_NAME - 1) // 2
    return f"{name[:keep]}…{name[-keep:]}"


def _tooltip(op: GraphOp) -> str:
    lines = [f"{op.name} ({op.op}, {op.placement}, {op.region})"]
    lines += [f"not on the NPU: {reason}" for reason in op.reasons]
    lines += [f"advice: {advice}" for advice in op.advice]
    if op.requantization is not None:
        lines.append(f"requantization: {len(op.requantization.multiplier)} multiplier(s) per {op.requantization.per}")
    if op.kernel:
        lines.append(f"kernel: {op.kernel}")
    return "\n".join(lines)


def _text(value: str) -> str:
    """Text for an HTML-like label."""
    return html.escape(value, quote=True)
