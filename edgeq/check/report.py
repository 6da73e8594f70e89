"""The check report: where each op runs and why, a summary, and its renderings (terminal table, JSON)."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from edgeq.check.records import OpRecord
from edgeq.check.rules import RuleResult
from edgeq.targets import Target, TargetKind

FLOAT_PLACEMENT = "CPU (float)"
"""How reports show the CPU placement of an op that runs in float."""


class Placement(str, Enum):
    """Where an op runs."""

    NPU = "NPU"
    CPU = "CPU"
    """On the CPU: the target is a CPU, or the op falls back from the NPU to its host."""
    UNSUPPORTED = "unsupported"
    """Nowhere: the model cannot be deployed until this op changes."""


@dataclass
class NodeReport:
    """One op: where it runs, the rules that decided it, and advice."""

    record: OpRecord
    placement: Placement
    results: list[RuleResult] = field(default_factory=list)

    @property
    def where(self) -> str:
        """The placement as reports show it: ``CPU (float)`` for an op that runs in float on the CPU."""
        return FLOAT_PLACEMENT if self.record.float_only and self.placement is Placement.CPU else self.placement.value

    @property
    def reasons(self) -> list[RuleResult]:
        """The blocking results: why the op is not on the NPU."""
        return [r for r in self.results if r.blocking]

    @property
    def advice(self) -> list[str]:
        """Advice from every rule that gave some, blocking ones first."""
        return [r.advice for r in sorted(self.results, key=lambda r: not r.blocking) if r.advice]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.record.name,
            "op": self.record.op,
            "source_op": self.record.source_op,
            "placement": self.where,
            "macs": self.record.macs,
            "output_shape": list(self.record.output_shape) if self.record.output_shape else None,
            "reasons": [{"rule": r.rule, "message": r.message} for r in self.reasons],
            "advice": self.advice,
        }


@dataclass
class Summary:
    """Totals over the ops."""

    ops: int
    ops_on_npu: int
    ops_on_cpu: int
    ops_unsupported: int
    macs: int
    macs_on_npu: int
    npu_subgraphs: int
    transitions: int
    verdict: str

    @property
    def npu_op_share(self) -> float:
        return self.ops_on_npu / self.ops if self.ops else 0.0

    @property
    def npu_mac_share(self) -> float:
        return self.macs_on_npu / self.macs if self.macs else 0.0


@dataclass
class CheckReport:
    """What ``check_model`` found: one :class:`NodeReport` per op and a :class:`Summary`.

    ``print(report)`` shows the table (or a list of ops where the table would not fit); :meth:`to_json` gives the
    same for tools (the compile stage and the HTML report read it).
    """

    target: Target
    source: str
    nodes: list[NodeReport]
    notes: list[str] = field(default_factory=list)
    with_advice: bool = True

    @property
    def summary(self) -> Summary:
        on = {p: [n for n in self.nodes if n.placement is p] for p in Placement}
        npu_names = {n.record.name for n in on[Placement.NPU]}
        return Summary(
            ops=len(self.nodes),
            ops_on_npu=len(on[Placement.NPU]),
            ops_on_cpu=len(on[Placement.CPU]),
            ops_unsupported=len(on[Placement.UNSUPPORTED]),
            macs=sum(n.record.macs for n in self.nodes),
            macs_on_npu=sum(n.record.macs for n in on[Placement.NPU]),
            npu_subgraphs=_components(self.nodes, npu_names),
            transitions=_transitions(self.nodes, npu_names),
            verdict=self._verdict(on),
        )

    @property
    def deployable(self) -> bool:
        """No op is unsupported (every op runs on the NPU or falls back to the CPU)."""
        return not any(n.placement is Placement.UNSUPPORTED for n in self.nodes)

    def node(self, name: str) -> NodeReport:
        """The report of the op called ``name``."""
        for node in self.nodes:
            if node.record.name == name:
                return node
        raise KeyError(f"no op '{name}' in the report; ops: {', '.join(n.record.name for n in self.nodes[:20])}")

    def _verdict(self, on: dict[Placement, list[NodeReport]]) -> str:
        if on[Placement.UNSUPPORTED]:
            return f"not deployable: {len(on[Placement.UNSUPPORTED])} unsupported op(s)"
        if self.target.kind is TargetKind.CPU:
            return f"runs on the {self.target.name} CPU"
        if not on[Placement.CPU]:
            return f"NPU-ready: every op runs on {self.target.name}"
        return f"runs with CPU fallback: {len(on[Placement.CPU])} op(s) on the {self.target.host} host"

    def to_dict(self) -> dict[str, Any]:
        summary = self.summary
        return {
            "target": self.target.name,
            "source": self.source,
            "summary": {
                "ops": summary.ops,
                "ops_on_npu": summary.ops_on_npu,
                "ops_on_cpu": summary.ops_on_cpu,
                "ops_unsupported": summary.ops_unsupported,
                "macs": summary.macs,
                "macs_on_npu": summary.macs_on_npu,
                "npu_op_share": summary.npu_op_share,
                "npu_mac_share": summary.npu_mac_share,
                "npu_subgraphs": summary.npu_subgraphs,
                "transitions": summary.transitions,
                "verdict": summary.verdict,
                "deployable": self.deployable,
            },
            "notes": self.notes,
            "nodes": [n.to_dict() for n in self.nodes],
        }

    def to_json(self, indent: int = 2) -> str:
        """The report as JSON (the terminal table's content, plus MACs and shapes)."""
        return json.dumps(self.to_dict(), indent=indent)

    @property
    def _title(self) -> str:
        return f"check_model: {self.source} on {self.target.name}"

    def _notes(self, node: NodeReport) -> dict[str, str]:
        """The text columns of ``node``'s row by heading: why it is not on the NPU, and advice (if asked for)."""
        why = "why not NPU" if self.target.kind is TargetKind.NPU else "why"
        notes = {why: "; ".join(r.message for r in node.reasons), "advice": "; ".join(node.advice)}
        return notes if self.with_advice else {why: notes[why]}

    def table(self) -> Table:
        """A rich table, one row per op."""
        table = Table()
        rows = [(node, self._notes(node)) for node in self.nodes]
        for column in ("op", "kind", "where"):
            table.add_column(column, no_wrap=True)
        for column in rows[0][1] if rows else ():
            table.add_column(column, min_width=_MIN_TEXT_WIDTH)
        for node, notes in rows:
            where = Text(node.where, style=_STYLES[node.placement])
            table.add_row(node.record.name, node.record.source_op, where, *notes.values())
        return table

    def render_list(self, console: Console) -> None:
        """Print one op a line (where, name, kind; never wrapped), its reasons and advice indented below."""
        indent = max((len(n.where) for n in self.nodes), default=0) + 2
        for node in self.nodes:
            where = node.where.ljust(indent)
            console.print(Text.assemble((where, _STYLES[node.placement]), node.record.name, "  ", (node.record.source_op, "dim")), soft_wrap=True)
            for label, text in self._notes(node).items():
                if text:
                    _print_wrapped(console, f"{label}: {text}", indent)

    def summary_lines(self) -> list[str]:
        summary = self.summary
        lines = [f"verdict: {summary.verdict}"]
        if self.target.kind is TargetKind.NPU:
            lines.append(
                f"NPU coverage: {summary.ops_on_npu}/{summary.ops} ops ({summary.npu_op_share:.0%}), "
                f"{summary.npu_mac_share:.1%} of {summary.macs / 1e6:.1f} M MACs; "
                f"{summary.npu_subgraphs} NPU subgraph(s), {summary.transitions} NPU<->CPU transition(s)"
            )
        return lines + self.notes

    def render(self, console: Console) -> None:
        """Print the table, or the list of :meth:`render_list` when ``console`` is too narrow for the table (op names
        unbroken, reasons and advice at least ``_MIN_TEXT_WIDTH`` wide), and the summary."""
        table = self.table()
        console.print(self._title, highlight=False, soft_wrap=True)
        if Measurement.get(console, console.options.update_width(_UNLIMITED), table).minimum <= console.width:
            console.print(table)
        else:
            self.render_list(console)
        for line in self.summary_lines():
            _print_wrapped(console, line, 0)

    def __str__(self) -> str:
        """The rendering at the terminal's width (``COLUMNS``, else the terminal's, else 80 columns)."""
        buffer = io.StringIO()
        self.render(Console(file=buffer, width=shutil.get_terminal_size().columns, color_system=None))
        return buffer.getvalue()


_UNLIMITED = 1 << 20  # a console width no table reaches, to measure a table's own width
_MIN_TEXT_WIDTH = 30  # narrowest column for reasons and advice before the list layout reads better
_STYLES = {Placement.NPU: "green", Placement.CPU: "yellow", Placement.UNSUPPORTED: "bold red"}


def _print_wrapped(console: Console, text: str, indent: int) -> None:
    """Print ``text`` wrapped at word boundaries to the console's width, every line indented by ``indent``."""
    for line in Text(text).wrap(console, max(console.width - indent, 1)):
        line.rstrip()
        console.print(" " * indent, line, sep="", soft_wrap=True)


def _components(nodes: list[NodeReport], members: set[str]) -> int:
    """Connected groups of ``members`` along data edges."""
    parent = {name: name for name in members}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for node in nodes:
        if node.record.name in members:
            for source in node.record.inputs:
                if source in members:
                    parent[root(source)] = root(node.record.name)
    return len({root(name) for name in members})


def _transitions(nodes: list[NodeReport], npu: set[str]) -> int:
    """Data edges between an op on the NPU and an op elsewhere."""
    names = {n.record.name for n in nodes}
    return sum(
        1
        for node in nodes
        for source in node.record.inputs
        if source in names and (source in npu) != (node.record.name in npu)
    )
