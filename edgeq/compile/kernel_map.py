"""Which TVM kernel (PrimFunc) each op landed in, read from the built Relax VM executable.

The executable's instructions (``as_text()``) list, per region function, every kernel call with its argument
registers: the tensors it reads, then the tensor it writes. The region's parameters are its input tensors in
order, so data flow ties the ops to the calls:

- an op that anchors a kernel (conv2d, linear, pooling...) takes the first free call whose name holds one of
  its primitive names (TVM names a fused kernel after the primitive ops in it) and which reads the registers of
  the op's inputs;
- an op TVM fuses into the kernel that makes its input (an activation, a residual add, a reshape, a concat) joins
  that call when the call's name holds its primitive and the call also reads the op's other inputs; else it
  takes a call of its own the same way;
- an op that needs no kernel (a reshape TVM makes a view) gets none;
- a call that no op anchors, between an op and a consumer that is not a view (the requantization TVM leaves in a
  kernel of its own after a pooling sum, a table's index shift, the conversion of a uint8 input: docs/numerics.md
  section 9), is found when that consumer reads its output: it joins the producer's calls, or the consumer's
  when it reads a region input;
- an op TVM builds from several kernels (a bilinear resize: gathers, then weighted sums, per axis) goes on from
  its first call through the free calls that read only what its calls so far wrote, up to the call that holds
  its closing primitive (the requantization's shift); its output is that call's.

TVM may order calls differently from the ONNX graph (a residual branch first), which data flow absorbs. Where two
ops read the same input, which takes which call is a matter of order: ops are placed in the graph's order, except
an op whose only consumer is a residual add, placed just before the add (TVM may fuse the two and run them once
the add's other input exists, after the other op's call: RegNet's projection shortcut).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tvm import relax

from edgeq.compile.compiled_graph import CompiledGraph, GraphOp
from edgeq.ops import LOOKUP_TABLE_OPS, Op, OpTable, op_named


@dataclass(frozen=True)
class KernelRole:
    """How TVM builds an op into kernels.

    Attributes:
        primitives: names of the primitive (Relax / TIR) ops the op becomes, as they appear in kernel names (a
            table activation: edgeq's lookup kernel, or TVM's ``take`` at ``-O0``).
        fused_follower: TVM fuses the op into the kernel that makes its input (a table activation: as an
            elementwise kernel, :mod:`edgeq.compile.fusion_patterns`; squeeze-and-excitation's scaling after it).
        view: the op needs no kernel of its own when TVM can make it a view.
        closing: for an op TVM builds from several kernels, the primitive of the kernel that ends it.
    """

    primitives: tuple[str, ...]
    fused_follower: bool = False
    view: bool = False
    closing: str | None = None


KERNEL_ROLES: OpTable[KernelRole] = OpTable("kernel role in compile/kernel_map.py")
"""Each op's :class:`KernelRole`."""

KERNEL_ROLES.register(Op.CONV2D)(KernelRole(("conv2d",)))
KERNEL_ROLES.register(Op.LINEAR)(KernelRole(("matmul", "dense")))
KERNEL_ROLES.register(Op.MATMUL)(KernelRole(("matmul",)))
KERNEL_ROLES.register(Op.ADD)(KernelRole(("add",), fused_follower=True))
KERNEL_ROLES.register(Op.MUL)(KernelRole(("multiply",), fused_follower=True))
KERNEL_ROLES.register(Op.RELU)(KernelRole(("maximum", "clip", "relu"), fused_follower=True))
KERNEL_ROLES.register(Op.MAX_POOL2D)(KernelRole(("max_pool2d",)))
KERNEL_ROLES.register(Op.AVG_POOL2D)(KernelRole(("avg_pool2d", "conv2d", "sum")))
KERNEL_ROLES.register(Op.GLOBAL_AVG_POOL2D)(KernelRole(("sum", "mean", "adaptive_avg_pool2d")))
KERNEL_ROLES.register(Op.CONCAT)(KernelRole(("concatenate", "concat"), fused_follower=True))
KERNEL_ROLES.register(Op.RESHAPE)(KernelRole(("reshape",), fused_follower=True, view=True))
KERNEL_ROLES.register(Op.TRANSPOSE)(KernelRole(("transpose",), fused_follower=True))
KERNEL_ROLES.register(Op.UPSAMPLE_NEAREST2D)(KernelRole(("repeat", "resize2d")))
KERNEL_ROLES.register(Op.UPSAMPLE_BILINEAR2D)(KernelRole(("take", "resize2d"), closing="right_shift"))
KERNEL_ROLES.register(Op.SPLIT)(KernelRole(("split",)))
KERNEL_ROLES.register(Op.SLICE)(KernelRole(("strided_slice",)))
KERNEL_ROLES.register(*LOOKUP_TABLE_OPS)(KernelRole(("lookup", "take"), fused_follower=True))


def kernel_role(op: str) -> KernelRole | None:
    """The :class:`KernelRole` of the op called ``op``; ``None`` for an op edgeq does not know (it takes the first
    free call that reads its inputs)."""
    known = op_named(op)
    return KERNEL_ROLES[known] if known is not None else None


def fused_follower(op: str) -> bool:
    """Whether TVM fuses the op called ``op`` into the kernel that makes its input."""
    role = kernel_role(op)
    return role is not None and role.fused_follower


def view_op(op: str) -> bool:
    """Whether the op called ``op`` needs no kernel of its own when TVM can make it a view."""
    role = kernel_role(op)
    return role is not None and role.view


_CALL = re.compile(r"^\s*call\s+(\S+)\s+in:(.*?)\s+dst:\s*(\S+)")
_FUNCTION = re.compile(r"^@(\S+):$")
_REGISTER = re.compile(r"^%(\d+)$")


@dataclass(frozen=True)
class KernelCall:
    """One kernel call in a VM function: the kernel, the registers it reads, the register it writes, and how many
    arguments the VM passes it (registers and constants, the output included)."""

    kernel: str
    reads: tuple[int, ...]
    writes: int | None
    arguments: int


def kernel_calls(text: str) -> dict[str, list[KernelCall]]:
    """The kernel calls of each VM function, in call order (VM built-ins and calls of other functions left out;
    a built-in that makes a view, such as ``vm.builtin.reshape``, makes its result an alias of its input).

    Args:
        text: the executable's instructions (``as_text()`` of the built executable or of the loaded library).
    """
    raw: dict[str, list[tuple[str, list[int], int | None, int]]] = {}
    current: list | None = None
    for line in text.splitlines():
        function = _FUNCTION.match(line)
        if function:
            current = raw.setdefault(function.group(1), [])
            continue
        call = _CALL.match(line)
        if call and current is not None:
            arguments = [a.strip() for a in call.group(2).split(",") if a.strip()]
            registers = [int(m.group(1)) for a in arguments if (m := _REGISTER.match(a))]
            destination = _REGISTER.match(call.group(3))
            current.append((call.group(1), registers, int(destination.group(1)) if destination else None, len(arguments)))
    calls: dict[str, list[KernelCall]] = {}
    for function, instructions in raw.items():
        alias: dict[int, int] = {}
        found = calls[function] = []
        for name, registers, destination, arguments in instructions:
            registers = [alias.get(r, r) for r in registers]
            if name.startswith("vm."):
                if "reshape" in name and registers and destination is not None:
                    alias[destination] = registers[0]
                continue
            if name in raw or not registers:  # a call of another VM function
                continue
            found.append(KernelCall(name, tuple(registers[:-1]), registers[-1], arguments))
    return calls


def _names(kernel: str, primitive: str) -> bool:
    """Whether TVM's name of ``kernel`` holds ``primitive`` (fused kernels are named after their primitives)."""
    return re.search(rf"(^|_){primitive}\d*(_|$)", kernel) is not None


def _holds(kernel: str, op: str) -> bool:
    role = kernel_role(op)
    return role is not None and any(_names(kernel, name) for name in role.primitives)


class _Matcher:
    """Places the ops of one region on its kernel calls (see the module docstring)."""

    def __init__(self, graph: CompiledGraph, inputs: list[str], calls: list[KernelCall]) -> None:
        self.graph = graph
        self.calls = calls
        self.location = {tensor: index for index, tensor in enumerate(inputs)}
        self.placed: dict[str, list[int]] = {}
        self.taken: set[int] = set()

    def _register(self, tensor: str) -> int | None:
        if tensor in self.location:
            return self.location[tensor]
        index = self._producer_call(tensor)
        return self.calls[index].writes if index is not None else None

    def _producer_call(self, tensor: str) -> int | None:
        """The call that writes ``tensor`` (the last call of its producer)."""
        calls = self.placed.get(self.graph.tensors[tensor].producer)
        return calls[-1] if calls else None

    def _span(self, op: GraphOp, first: int, registers: set[int]) -> list[int]:
        """The calls of an op that starts at call ``first`` (several for an op whose role has a ``closing``
        primitive)."""
        span = [first]
        role = kernel_role(op.op)
        closing = role.closing if role is not None else None
        if closing is None or _names(self.calls[first].kernel, closing):
            return span
        readable = registers | {self.calls[first].writes}
        for index in range(first + 1, len(self.calls)):
            call = self.calls[index]
            if index in self.taken or not set(call.reads) <= readable:
                continue
            span.append(index)
            readable.add(call.writes)
            if _names(call.kernel, closing):
                break
        return span

    def _own_call(self, op: GraphOp, registers: set[int]) -> int | None:
        for index, call in enumerate(self.calls):
            if index in self.taken or not registers <= set(call.reads):
                continue
            if kernel_role(op.op) is None or _holds(call.kernel, op.op):
                return index
        return None

    def _step_between(self, op: GraphOp, registers: set[int]) -> int | None:
        """A free call that reads only registers of ``op``'s inputs and whose output a call for ``op`` reads."""
        for index, call in enumerate(self.calls):
            if index in self.taken or not call.reads or call.writes is None or not set(call.reads) <= registers:
                continue
            if self._own_call(op, registers - set(call.reads) | {call.writes}) is not None:
                return index
        return None

    def _join_step(self, op: GraphOp, step: int) -> list[int]:
        """Call ``step`` appended to the calls of the op making an input it reads; returned, as the first call of
        ``op`` itself, when it reads region inputs only (which from now on stand for its output)."""
        self.taken.add(step)
        read = [t for t in op.inputs if self._register(t) in self.calls[step].reads]
        producers = [p for t in read if (p := self.graph.tensors[t].producer) in self.placed]
        for tensor in read:
            if tensor in self.location:
                self.location[tensor] = self.calls[step].writes
        if producers:
            self.placed[producers[0]].append(step)
            return []
        return [step]

    def _registers(self, op: GraphOp) -> set[int]:
        """The registers of ``op``'s inputs that are known so far."""
        return {r for t in op.inputs if (r := self._register(t)) is not None}

    def place(self, op: GraphOp) -> None:
        registers = self._registers(op)
        if fused_follower(op.op):
            for tensor in op.inputs:
                index = self._producer_call(tensor)
                if index is None or not _holds(self.calls[index].kernel, op.op):
                    continue
                others = {self._register(t) for t in op.inputs if self._producer_call(t) != index} - {None}
                if others <= set(self.calls[index].reads):
                    self.placed[op.name] = [index]
                    return
        if view_op(op.op) and not registers:
            return
        index, first = self._own_call(op, registers), []
        step = self._step_between(op, registers) if index is None and not view_op(op.op) else None
        if step is not None:
            first = self._join_step(op, step)
            registers = self._registers(op)
            index = self._own_call(op, registers)
        if index is not None:
            span = first + self._span(op, index, registers)
            self.placed[op.name] = span
            self.taken.update(span)


def _deferred_to(op: GraphOp, graph: CompiledGraph) -> str | None:
    """The consumer ``op`` is placed just before, or None: its one consumer, when that is a fused follower reading
    other tensors too (a residual add). TVM may fuse ``op`` and the add into one kernel, which runs once the add's
    other inputs exist: RegNet's projection shortcut runs after the block's branch, whose first convolution reads
    the same input."""
    if fused_follower(op.op) or len(op.outputs) != 1:
        return None
    consumers = graph.tensors[op.outputs[0]].consumers
    if len(consumers) != 1:
        return None
    consumer = graph.op(consumers[0])
    return consumer.name if fused_follower(consumer.op) and len(consumer.inputs) > 1 else None


def _placing_order(graph: CompiledGraph, names: list[str]) -> list[str]:
    """A region's ops in the order they are placed: the graph's, each op :func:`_deferred_to` a consumer moved to
    just before it (its only consumer: the order stays topological)."""
    deferred: dict[str, list[str]] = {}
    for name in names:
        consumer = _deferred_to(graph.op(name), graph)
        if consumer in names:
            deferred.setdefault(consumer, []).append(name)
    moved = {name for group in deferred.values() for name in group}
    order: list[str] = []

    def visit(name: str) -> None:
        for earlier in deferred.get(name, []):
            visit(earlier)
        order.append(name)

    for name in names:
        if name not in moved:
            visit(name)
    return order


def op_calls(calls: dict[str, list[KernelCall]], graph: CompiledGraph) -> dict[str, tuple[str, list[int]]]:
    """Which kernel calls each op of ``graph`` runs in: (region, indices in the region's calls; the last one writes
    the op's output), by op name.

    Args:
        calls: the kernel calls of each region (:func:`kernel_calls`).
        graph: the compiled graph.
    """
    placed: dict[str, tuple[str, list[int]]] = {}
    for region in graph.regions:
        matcher = _Matcher(graph, region.inputs, calls.get(region.name, []))
        for name in _placing_order(graph, region.ops):
            matcher.place(graph.op(name))
        placed.update({name: (region.name, indices) for name, indices in matcher.placed.items()})
    return placed


def kernel_map(executable: relax.VMExecutable, graph: CompiledGraph) -> dict[str, str]:
    """The kernel of every op of ``graph`` that has one (the one that writes its output), by op name (each region is
    a VM function of its name)."""
    calls = kernel_calls(executable.as_text())
    return {name: calls[region][indices[-1]].kernel for name, (region, indices) in op_calls(calls, graph).items()}
