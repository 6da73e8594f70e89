"""Fusion decisions: the op patterns TVM's operator fusion reads, set where its defaults fuse badly for int8 graphs.

TVM fuses an elementwise op into the kernel making its input (``FuseOps``: a convolution takes every elementwise
op after it up to its post-dominator). Two kinds of edgeq's kernels need other patterns:

- lookup-table kernels (:func:`edgeq.compile.kernels.lookup`) are elementwise, but ``AnnotateTIROpPattern`` calls
  their data-dependent read opaque: they would run alone;
- a widening conversion of an int8 tensor (the first step of a residual add's term, a pool's sum, a product's
  operand: :mod:`edgeq.compile.lower_integer`) fused into the kernel making the tensor makes that kernel write
  its output 4 or 8 times as wide, for another kernel to read: a residual add taken by the kernel of its other
  input (ResNet's projection shortcut wrote its term of the add as float64), a pooling sum, which no convolution
  takes (squeeze-and-excitation's input was written as int32 for its pool and its product). Such a conversion is
  marked broadcasting: fusion then ends the producing kernel at its int8 output and puts the conversion in the
  kernel reading it (a conversion read by several ops is first copied, one for each). Of the conversions
  leading to one op with several inputs (an add, a product), one stays elementwise, so that one producer still
  takes that op into its kernel: the one whose int8 input is made last and read by nothing else.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from edgeq.compile.bindings import called_kernel, readers, reads

LOOKUP_ATTRIBUTE = "edgeq.lookup"
"""PrimFunc attribute marking a lookup-table kernel (:func:`edgeq.compile.kernels.lookup`)."""

WIDENING_ATTRIBUTE = "edgeq.widening"
"""PrimFunc attribute marking a widening conversion of an int8 tensor."""

ELEMENTWISE_PATTERN, BROADCAST_PATTERN, REDUCTION_PATTERN, OPAQUE_PATTERN = 0, 1, 3, 8
"""TVM's ``op_pattern`` of an elementwise kernel (``kElemWise``), which operator fusion fuses into the kernel
before it, of a broadcasting one (``kBroadcast``), which it fuses into the kernel after it only, of a reduction
(``kCommReduce``): fusion puts a broadcasting kernel into a kernel of any pattern up to this one, and of an opaque
one (``kOpaque``), which it fuses with nothing."""


def _primfunc(module: tvm.IRModule, value: relax.Expr) -> tirx.PrimFunc | None:
    """The PrimFunc a binding calls (None for anything else)."""
    kernel = called_kernel(value)
    function = module[kernel] if kernel is not None else None
    return function if isinstance(function, tirx.PrimFunc) else None


def _widening(module: tvm.IRModule, value: relax.Expr) -> bool:
    """Whether a binding calls a widening conversion of an int8 tensor (:data:`WIDENING_ATTRIBUTE`)."""
    function = _primfunc(module, value)
    return function is not None and bool((function.attrs or {}).get(WIDENING_ATTRIBUTE))


def _pattern(module: tvm.IRModule, value: relax.Expr) -> int:
    """The ``op_pattern`` of the kernel a binding calls (opaque for anything but a call of a PrimFunc)."""
    function = _primfunc(module, value)
    return int((function.attrs or {}).get("op_pattern", OPAQUE_PATTERN)) if function is not None else OPAQUE_PATTERN


@relax.expr_functor.mutator
class _CopyPerReader(relax.PyExprMutator):
    """Gives each kernel call reading a widening conversion that several calls read a copy of its own."""

    def __init__(self, module: tvm.IRModule, shared: set[relax.Var], values: dict[relax.Var, relax.Expr]) -> None:
        super().__init__(module)
        self.shared = shared
        self.values = values

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        for read in dict.fromkeys(reads(binding.value)):
            if read in self.shared:
                self.set_var_remap(read, self.builder_.emit(self.visit_expr(self.values[read]), read.name))
        super().visit_var_binding_(binding)


@relax.expr_functor.mutator
class _CallBroadcasting(relax.PyExprMutator):
    """Makes the bindings in ``broadcasting`` call a broadcasting copy of their kernel."""

    def __init__(self, module: tvm.IRModule, broadcasting: set[relax.Var], copies: dict[relax.GlobalVar, relax.GlobalVar]) -> None:
        super().__init__(module)
        self.module = module
        self.broadcasting = broadcasting
        self.copies = copies

    def _copy(self, kernel: relax.GlobalVar) -> relax.GlobalVar:
        if kernel not in self.copies:
            function = self.module[kernel].with_attr("op_pattern", BROADCAST_PATTERN)
            self.copies[kernel] = self.builder_.add_func(function, f"{kernel.name_hint}_at_reader")
        return self.copies[kernel]

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var not in self.broadcasting:
            super().visit_var_binding_(binding)
            return
        value = binding.value
        call = relax.call_tir(self._copy(value.args[0]), self.visit_expr(value.args[1]), value.ty_args[0])
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(call)))  # the same variable: its provenance


def _broadcasting(module: tvm.IRModule, function: relax.Function) -> set[relax.Var]:
    """The widening conversions of ``function`` (each read by one call) to be marked broadcasting (see the
    module's docstring)."""
    values = relax.analysis.get_var2val(function)
    reading = readers(function)
    order = {var: index for index, var in enumerate(values)}
    widenings = [var for var, value in values.items() if _widening(module, value) and reads(value)]

    def chain_end(start: relax.Var) -> relax.Var | None:
        """The first call after ``start`` along calls that each read one tensor and that one call reads: one
        reading several tensors, or one fusion cannot put in the kernel before it (a reduction); None when the
        chain ends in a tensor several calls or none read."""
        current = start
        while len(reading.get(current, [])) == 1:
            reader = reading[current][0]
            if len(set(reads(values[reader]))) > 1 or _pattern(module, values[reader]) > BROADCAST_PATTERN:
                return reader
            current = reader
        return None

    broadcasting, merges = set(), {}
    for widening in widenings:
        end = chain_end(widening)
        if end is None or _pattern(module, values[end]) > REDUCTION_PATTERN:  # e.g. a gather, opaque: stays in the producer
            continue
        if len(set(reads(values[end]))) > 1:
            merges.setdefault(end, []).append(widening)
        else:
            broadcasting.add(widening)
    for leading in merges.values():
        sources = {w: reads(values[w])[0] for w in leading}
        alone = [w for w in leading if sources[w] in order and len(reading[sources[w]]) == 1]  # made by a call
        keeper = max(alone, key=lambda w: order[sources[w]], default=None)
        broadcasting.update(w for w in leading if w is not keeper)
    return broadcasting


def fusion_patterns() -> tvm.transform.Pass:
    """The module pass, after ``relax.transform.AnnotateTIROpPattern`` and before ``FuseOps``, setting the op
    patterns of the module's docstring: lookup-table kernels elementwise, widening conversions of int8 tensors
    copied for each reader and broadcasting where fusing them into their producer would widen its output."""

    @tvm.transform.module_pass(opt_level=0, name="edgeq.FusionPatterns")
    def run(module: tvm.IRModule, _context: tvm.transform.PassContext) -> tvm.IRModule:
        for global_var, function in list(module.functions.items()):
            if isinstance(function, tirx.PrimFunc) and (function.attrs or {}).get(LOOKUP_ATTRIBUTE):
                module[global_var] = function.with_attr("op_pattern", ELEMENTWISE_PATTERN)
        copies: dict[relax.GlobalVar, relax.GlobalVar] = {}
        for global_var, function in list(module.functions.items()):
            if isinstance(function, relax.Function):
                module = _copied_per_reader(module, global_var, function)
                broadcasting = _broadcasting(module, module[global_var])
                if broadcasting:
                    marker = _CallBroadcasting(module, broadcasting, copies)
                    marker.builder_.update_func(global_var, marker.visit_expr(module[global_var]))
                    module = marker.builder_.get()
        return module

    return run


def _copied_per_reader(module: tvm.IRModule, global_var: relax.GlobalVar, function: relax.Function) -> tvm.IRModule:
    """``module`` with each widening conversion of ``function`` that several kernel calls read copied for each, where
    fusion can put it in each of them (none is opaque nor a convolution)."""
    values, reading = relax.analysis.get_var2val(function), readers(function)
    shared = {
        var for var, value in values.items()
        if _widening(module, value) and len(reading.get(var, [])) > 1
        and all(_pattern(module, values[reader]) <= REDUCTION_PATTERN for reader in reading[var])
    }
    if not shared:
        return module
    copier = _CopyPerReader(module, shared, values)
    copier.builder_.update_func(global_var, copier.visit_expr(function))
    return relax.transform.DeadCodeElimination()(copier.builder_.get())
