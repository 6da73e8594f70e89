"""Provenance: which graph op each binding of a region function computes, and so each kernel call.

It starts at TVM's ONNX import: the importer (:class:`_RecordingImporter`) records the Relax expression each ONNX
node of a region became, and each node belongs to a graph op (a Q/DQ node to the op it quantizes the output of
or feeds, :func:`node_owners`); the bindings emitted while converting a node are that node's. A region edgeq
builds itself (an int32 head) is its one op's. Then every pass of the build carries it (:meth:`Provenance.run`):

- a binding a pass keeps (the same variable) keeps its ops; so does one edgeq's pass rewrites in place (a
  rewritten QDQ unit keeps its quantize's variable, a widening made broadcasting keeps its variable);
- a new binding calling the same kernel on the same arguments as a binding before the pass stands for it (the
  copy of a widening conversion made for each kernel reading it, :mod:`.fusion_patterns`);
- ``FuseOps``: a call of a fused group computes the ops of the bindings the group stands for, found by matching
  the group's body, its parameters bound to the call's arguments, against the bindings before the pass;
- ``FuseTIR`` and the layout plan replace each binding by one (a call of the fused or blocked kernel), in order;
- any other new binding is part of what the next binding the pass kept computes: a lowering rule writes the
  bindings of a unit's integer arithmetic just before the unit's rewritten quantize.

The kernel calls of a region are its ``call_tir`` bindings once TVM's ``RewriteDataflowReshape`` made reshapes
views (:meth:`Provenance.kernel_calls`), in the order the VM calls them; :func:`edgeq.compile.kernel_map.kernel_map`
checks them against the built executable's.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import onnx
import tvm
from tvm import relax
from tvm.ir import GlobalVar, IRModule
from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter, Pad

from edgeq.compile import integer_only
from edgeq.compile.bindings import called_kernel
from edgeq.errors import CompileError, first_line
from edgeq.export.float_onnx import FLOAT_FALLBACK_DOC
from edgeq.export.onnx_nodes import node_name

Ops = frozenset[str]
"""The names of the graph ops a binding computes (part of)."""

Bindings = dict[relax.Var, Ops]
"""The ops of each binding of one function."""

KernelCalls = dict[str, tuple[str, list[tuple[str, Ops]]]]
"""Each region's function (the one running it) and kernel calls in call order: the kernel, and the ops of the
region the call computes (part of)."""


class _RecordingImporter(ONNXGraphImporter):
    """TVM's ONNX importer, recording the expression each node became (in node order).

    It overrides the private ``_construct_nodes`` of TVM 0.27.0.post1, which converts the nodes in order, each
    through one ``_convert_operator`` call (tests/test_provenance.py fails when TVM changes it). A node TVM converts
    into a kernel of its own (``emit_te``: reflect padding, einsum...) adds it to ``context``, the module being
    compiled, so that its name is new there; a float fallback node's are kept in ``float_kernels``. A Pad of constant
    mode becomes ``relax.nn.pad``, whose widths and value the integer lowering reads (TVM's converter writes a
    kernel with them inside, which no pattern can read). A ``ConvInteger``, which TVM has no converter for, becomes
    :func:`edgeq.compile.integer_only.conv_integer`'s int32 convolution."""

    def __init__(self, context: IRModule | None) -> None:
        super().__init__(None, "float32", keep_params_in_input=False, sanitize=True)
        self.bb = relax.BlockBuilder(context)
        self.float_kernels: dict[GlobalVar, tvm.tirx.PrimFunc] = {}

    def _construct_nodes(self, graph: onnx.GraphProto) -> None:
        self.results: list[relax.Expr] = []
        convert = self._convert_operator
        nodes = list(graph.node)

        def recorded(op_name: str, inputs: list, attrs: dict, opset: int) -> relax.Expr:
            node = nodes[len(self.results)]
            before = set(self.bb.get().get_global_vars())
            constant_pad = op_name == "Pad" and opset >= 11 and attrs.get("mode", b"constant") == b"constant"
            try:
                if op_name in integer_only.CONVERTERS:
                    result = integer_only.CONVERTERS[op_name](self.bb, inputs, attrs, f"{op_name} '{node_name(node)}'")
                else:
                    result = self._pad(inputs) if constant_pad else convert(op_name, inputs, attrs, opset)
            except CompileError:
                raise
            except Exception as error:  # TVM raises many kinds; one line naming the node instead of its traceback
                reason = first_line(error) or type(error).__name__
                raise CompileError(
                    f"{op_name} '{node_name(node)}': TVM {tvm.__version__}'s ONNX importer cannot convert it: {reason}{_fallback(node)}"
                ) from error
            if node.doc_string.startswith(FLOAT_FALLBACK_DOC):
                module = self.bb.get()
                self.float_kernels.update((var, module[var]) for var in module.get_global_vars() if var not in before)
            self.results.append(result)
            return result

        self._convert_operator = recorded
        try:
            super()._construct_nodes(graph)
        finally:
            del self._convert_operator

    def _check_for_unsupported_ops(self, graph: onnx.GraphProto) -> None:
        """TVM's check, with the ops edgeq converts itself (:data:`integer_only.CONVERTERS`) left out of it."""
        kept = onnx.GraphProto()
        kept.node.extend(node for node in graph.node if node.op_type not in integer_only.CONVERTERS)
        super()._check_for_unsupported_ops(kept)

    def _pad(self, inputs: list) -> relax.Expr:
        before, after, value = Pad._parse_pads_and_axes(inputs, [self._nodes, self._params])
        widths = [int(w) for pair in zip(before, after) for w in pair]
        return self.bb.normalize(relax.op.nn.pad(inputs[0], widths, "constant", float(value)))


def _fallback(node: onnx.NodeProto) -> str:
    """`` (float fallback: <op> '<path>': <reason>)`` for a node of the float fallback, else nothing."""
    return f" ({node.doc_string})" if node.doc_string.startswith(FLOAT_FALLBACK_DOC) else ""


def import_onnx(
    model: onnx.ModelProto, context: IRModule | None = None
) -> tuple[relax.Function, dict[str, relax.Expr], dict[GlobalVar, tvm.tirx.PrimFunc]]:
    """``model`` imported as TVM's ``from_onnx(model, keep_params_in_input=False)`` imports it: its ``main``, the
    expression each node (by name) became, and the kernels TVM built for its float fallback nodes, named anew in
    ``context`` (the module they are to be added to, with these very GlobalVars).

    Raises:
        CompileError: TVM's importer no longer converts each node once, in order (a TVM this edgeq does not know).
    """
    try:
        onnx.checker.check_model(model)
    except Exception as error:  # TVM's from_onnx warns and goes on, as here
        warnings.warn(str(error))
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    importer = _RecordingImporter(context)
    function = importer.from_onnx(model.graph, opset)["main"]
    nodes = list(model.graph.node)
    if len(importer.results) != len(nodes):
        raise CompileError(
            f"TVM {tvm.__version__}'s ONNX importer converted {len(importer.results)} of {len(nodes)} nodes through "
            "_convert_operator; edgeq's provenance needs TVM 0.27's importer (compile/provenance.py)"
        )
    return function, {node_name(node): result for node, result in zip(nodes, importer.results)}, importer.float_kernels


def node_owners(model: onnx.ModelProto, node_ops: dict[str, str]) -> dict[str, str]:
    """The graph op each node of a region's ``model`` belongs to, by node name: an op's own nodes by ``node_ops``;
    a QuantizeLinear of an op's output that op's; any other node (a DequantizeLinear, a conversion edgeq added)
    the op of the first node reading its output that has one. Nodes that lead to no op are left out."""
    producer = {tensor: node for node in model.graph.node for tensor in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    owners: dict[str, str | None] = {}

    def owner(node: onnx.NodeProto) -> str | None:
        name = node_name(node)
        if name not in owners:
            made_by = producer.get(node.input[0]) if node.op_type == "QuantizeLinear" and node.input else None
            if name in node_ops:
                owners[name] = node_ops[name]
            elif made_by is not None and node_name(made_by) in node_ops:
                owners[name] = node_ops[node_name(made_by)]
            else:
                readers = (owner(reader) for tensor in node.output for reader in consumers.get(tensor, []))
                owners[name] = next((found for found in readers if found is not None), None)
        return owners[name]

    return {node_name(node): found for node in model.graph.node if (found := owner(node)) is not None}


def _bindings(function: relax.Function) -> list[relax.VarBinding]:
    return [binding for block in function.body.blocks for binding in block.bindings]


def _carry_to_next(function: relax.Function, known: Bindings) -> Bindings:
    """Kept bindings keep their ops; the others take those of the next kept binding (none after the last)."""
    carried: Bindings = {}
    pending: list[relax.Var] = []
    for binding in _bindings(function):
        if binding.var in known:
            carried[binding.var] = known[binding.var]
            carried.update(dict.fromkeys(pending, known[binding.var]))
            pending = []
        else:
            pending.append(binding.var)
    return carried


def _call_key(value: relax.Expr, standing: dict[relax.Var, relax.Var]) -> tuple | None:
    """What a binding computes, with the variables it reads seen through ``standing``: a kernel and its
    arguments, or a tuple and an index; None for anything else."""
    kernel = called_kernel(value)
    if kernel is not None:
        return ("call", kernel, tuple(standing.get(a, a) for a in value.args[1].fields))
    if isinstance(value, relax.TupleGetItem):
        return ("item", standing.get(value.tuple_value, value.tuple_value), value.index)
    return None


def _computations(function: relax.Function) -> dict[tuple, list[relax.Var]]:
    """The bindings of ``function`` by what they compute (:func:`_call_key`), in order."""
    found: dict[tuple, list[relax.Var]] = {}
    for binding in _bindings(function):
        key = _call_key(binding.value, {})
        if key is not None:
            found.setdefault(key, []).append(binding.var)
    return found


def _carry_kept(before: relax.Function, after: relax.Function, known: Bindings) -> Bindings:
    """A pass that keeps bindings, rewrites some in place and adds others (see the module's docstring)."""
    computations = _computations(before)
    standing = {}
    for binding in _bindings(after):
        key = _call_key(binding.value, {})
        if binding.var not in known and key in computations:
            standing[binding.var] = computations[key][0]
    return _carry_to_next(after, {**known, **{var: known[original] for var, original in standing.items() if original in known}})


def _carry_in_order(before: relax.Function, after: relax.Function, known: Bindings) -> Bindings:
    """A pass that replaces each binding by one, in order (``FuseTIR``, the layout plan)."""
    old, new = _bindings(before), _bindings(after)
    if len(old) != len(new):
        raise CompileError(f"provenance: a pass replacing each binding by one made {len(new)} bindings of {len(old)}; edgeq cannot trace it")
    return {n.var: known.get(o.var, frozenset()) for o, n in zip(old, new)}


class _GroupMatcher:
    """Matches the body of each fused group ``FuseOps`` made against the bindings before it."""

    def __init__(self, before: relax.Function) -> None:
        self.computations = _computations(before)
        self.used: set[relax.Var] = set()

    def original(self, key: tuple) -> relax.Var:
        """The first binding before the pass computing ``key`` that no other binding stands for yet."""
        for var in self.computations.get(key, []):
            if var not in self.used:
                self.used.add(var)
                return var
        raise CompileError("provenance: FuseOps made a binding edgeq cannot trace to one before it")

    def group(self, bindings: list[relax.VarBinding], standing: dict[relax.Var, relax.Var]) -> dict[relax.Var, relax.Var] | None:
        """``standing`` extended with the original of each of ``bindings`` (bindings that compute the same thing
        are told apart by what reads them), or None when they do not match."""
        if not bindings:
            return standing
        first, rest = bindings[0], bindings[1:]
        key = _call_key(first.value, standing)
        for var in self.computations.get(key, []) if key is not None else []:
            if var in self.used or var in standing.values():
                continue
            matched = self.group(rest, {**standing, first.var: var})
            if matched is not None:
                return matched
        return None


def _carry_fused(before: relax.Function, after: relax.Function, module: tvm.IRModule, known: Bindings) -> Bindings:
    """``FuseOps``: see the module's docstring."""
    matcher = _GroupMatcher(before)
    standing: dict[relax.Var, relax.Var | tuple] = {}
    carried: Bindings = {}
    for binding in _bindings(after):
        value = binding.value
        group = module[value.op] if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar) else None
        if binding.var in known:
            carried[binding.var] = known[binding.var]
        elif isinstance(group, relax.Function):
            parameters = {p: standing.get(a, a) for p, a in zip(group.params, value.args)}
            matched = matcher.group(_bindings(group), parameters)
            if matched is None:
                raise CompileError("provenance: a group FuseOps made matches no bindings before it; edgeq cannot trace it")
            inner = [b.var for b in _bindings(group)]
            matcher.used.update(matched[var] for var in inner)
            carried[binding.var] = frozenset().union(*(known.get(matched[var], frozenset()) for var in inner))
            body = group.body.body
            standing[binding.var] = matched[body] if isinstance(body, relax.Var) else tuple(matched[f] for f in body.fields)
        elif isinstance(value, relax.TupleGetItem) and isinstance(standing.get(value.tuple_value), tuple):
            standing[binding.var] = standing[value.tuple_value][value.index]
            carried[binding.var] = known.get(standing[binding.var], frozenset())
        elif (key := _call_key(value, standing)) is not None:  # re-emitted outside any group
            standing[binding.var] = matcher.original(key)
            carried[binding.var] = known.get(standing[binding.var], frozenset())
        else:
            carried[binding.var] = frozenset()
    return carried


_IN_ORDER = ("FuseTIR", "edgeq.PlanLayouts")
"""The passes that replace each binding by one, in order."""


class Provenance:
    """The ops of each region's bindings, carried through the build. A region runs the function of its name, or,
    when it is identical to an earlier region, that one's (``BlockBuilder.add_func`` adds a function once): its
    bindings are then that function's, with its own ops."""

    def __init__(self) -> None:
        self.regions: dict[str, Bindings] = {}
        self.functions: dict[str, str] = {}

    def imported(self, region: str, function: relax.Function, node_results: dict[str, relax.Expr], owners: dict[str, str]) -> None:
        """Start region ``region`` from its import: each node's bindings are its owner's (:func:`node_owners`)."""
        bound = {binding.value: binding.var for binding in _bindings(function)}
        variables = set(bound.values())
        known: Bindings = {}
        for node, result in node_results.items():
            var = result if isinstance(result, relax.Var) and result in variables else bound.get(result)
            if var is not None and node in owners:
                known[var] = frozenset([owners[node]])
        self.regions[region], self.functions[region] = _carry_to_next(function, known), region

    def built(self, region: str, function: relax.Function, op: str) -> None:
        """Start region ``region``, which edgeq built for op ``op`` alone (an int32 head)."""
        self.regions[region], self.functions[region] = {binding.var: frozenset([op]) for binding in _bindings(function)}, region

    def runs_as(self, region: str, name: str, function: relax.Function, running: relax.Function) -> None:
        """Region ``region`` (imported as ``function``) runs the identical function ``running``, named ``name``."""
        known = self.regions[region]
        self.regions[region] = {new.var: known[old.var] for old, new in zip(_bindings(function), _bindings(running)) if old.var in known}
        self.functions[region] = name

    def run(self, step: tvm.transform.Pass, module: tvm.IRModule) -> tvm.IRModule:
        """``step`` applied to ``module`` (in a ``Sequential``, as a stage runs it), the provenance carried."""
        before = {function: module[function] for function in set(self.functions.values())}  # a Python pass may change module in place
        after = tvm.transform.Sequential([step])(module)
        name = step.info.name
        for region, known in self.regions.items():
            before_function, after_function = before[self.functions[region]], after[self.functions[region]]
            if name == "FuseOps":
                self.regions[region] = _carry_fused(before_function, after_function, after, known)
            elif name in _IN_ORDER:
                self.regions[region] = _carry_in_order(before_function, after_function, known)
            else:
                self.regions[region] = _carry_kept(before_function, after_function, known)
        return after

    def kernel_calls(self, module: tvm.IRModule) -> KernelCalls:
        """Each region's kernel calls once TVM made reshapes views (``RewriteDataflowReshape``, the first pass of
        the build after the ``schedule`` stage), with their ops."""
        viewed = relax.transform.RewriteDataflowReshape()(module)
        traced: KernelCalls = {}
        for region, known in self.regions.items():
            name = self.functions[region]
            traced[region] = name, list(self._calls(viewed[name], _carry_kept(module[name], viewed[name], known)))
        return traced

    @staticmethod
    def _calls(function: relax.Function, known: Bindings) -> Iterator[tuple[str, Ops]]:
        for binding in _bindings(function):
            kernel = called_kernel(binding.value)
            if kernel is not None:
                yield kernel.name_hint, known.get(binding.var, frozenset())
