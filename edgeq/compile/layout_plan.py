"""Layout planning: int8 activations passed between edgeq's blocked kernels stay in blocks of channels.

A convolution kernel (:mod:`edgeq.compile.kernels`) computes channels in blocks. Given NCHW tensors, it packs
its input into blocks first and scatters its output back over the channel planes; between two such kernels,
that is a round trip through NCHW for nothing. This stage (after fusion, before scheduling) finds every int8
activation made by a convolution kernel and read only by convolution kernels (a residual add fused into one
included), and stores it as ``[N, C/B, H, W, B]`` (``NCHW{B}c``, ``B`` = the dot product's lanes; channels that do
not fill the last block are padded: the producer writes zeros there, the consumers never read them): the
producer's epilogue stores a column's channels contiguously, and the consumers' packing stages read them so.
Max pools compute each channel from itself, so activations whose channels fill whole blocks are blocked across
them too, a convolution among the kernels touching them (resnet18's stem -> max pool -> first block, whose stem
scattered its outputs over 64 planes byte by byte); the pool then iterates over a block's channels innermost.
Everything else keeps NCHW, so no layout conversion is ever added: a tensor is blocked only where every kernel
touching it takes it blocked. Blocking moves where values are stored, never what they are: results are identical.

The kernels get their blocked form by TIR's ``transform_layout`` on their parameters (a copy per combination of
blocked parameters, named with a ``_nchw{B}c`` suffix).
"""

from __future__ import annotations

import re

import tvm
from tvm import relax, s_tir, tirx

from edgeq.compile import kernels
from edgeq.compile.bindings import called_kernel, readers
from edgeq.compile.cpu_features import DotProduct
from edgeq.compile.schedules import classify, root_blocks
from edgeq.compile.schedules.generic import POOL_BLOCKS


def blocked_name(kernel: str, block: int) -> str:
    """The name of ``kernel``'s copy with blocked parameters."""
    return f"{kernel}_nchw{block}c"


def is_blocked(kernel: str) -> bool:
    """Whether a kernel (by name) is a copy with blocked parameters (:func:`blocked_name`)."""
    return re.search(r"_nchw\d+c$", kernel) is not None


def blocked_layout(block: int):
    """The index map NCHW -> ``[N, C/block, H, W, block]``."""
    return lambda n, c, h, w: [n, c // block, h, w, c % block]


CONVOLUTION_SCHEDULES = ("conv2d", "conv2d_1x1", "depthwise_conv2d")
"""The kernels (by :func:`edgeq.compile.schedules.classify`) whose int8 inputs and outputs may be blocked."""


CONVOLUTION, POOL = "convolution", "pool"
"""The kernels that take blocked tensors (:func:`_layout_role`)."""


def _layout_role(function: tirx.PrimFunc) -> str | None:
    """:data:`CONVOLUTION` for a convolution kernel of :mod:`edgeq.compile.kernels`, :data:`POOL` for a pooling
    kernel (TVM's pooling blocks, :data:`POOL_BLOCKS`: each output channel reads its own input channel), else None."""
    sch = s_tir.Schedule(function)
    if classify(sch) in CONVOLUTION_SCHEDULES:
        return CONVOLUTION
    names = {sch.get(b).name_hint for b in root_blocks(sch)}
    return POOL if names.intersection(POOL_BLOCKS) else None


def _blockable(var: relax.Var, block: int) -> bool:
    """An int8 NCHW dataflow tensor of static shape."""
    info = var.ty
    if not isinstance(var, relax.DataflowVar) or not isinstance(info, relax.TensorType) or str(info.dtype) != "int8" or info.ndim != 4:
        return False
    shape = info.shape.values if info.shape is not None else None
    return shape is not None and all(isinstance(d, tirx.IntImm) for d in shape)


def _fills_blocks(var: relax.Var, block: int) -> bool:
    """Whether the channels of a :func:`_blockable` tensor fill whole blocks (no padding)."""
    return int(var.ty.shape.values[1]) % block == 0


def _blocked_tensors(module: tvm.IRModule, function: relax.Function, block: int) -> set[relax.Var]:
    """The tensors of ``function`` made by a convolution kernel and read only by convolution kernels, and those whose
    channels fill whole blocks made and read only by convolution and pooling kernels, a convolution among them."""
    bindings = relax.analysis.get_var2val(function)
    kernels_called = {var: called_kernel(value) for var, value in bindings.items()}
    roles = {var: _layout_role(module[kernel]) for var, kernel in kernels_called.items() if kernel is not None}
    reading = readers(function)

    def blocked(var: relax.Var) -> bool:
        touching = [roles.get(user) for user in [var, *reading.get(var, [])]]  # its producer and its readers
        if len(touching) == 1 or not _blockable(var, block):
            return False
        if all(role == CONVOLUTION for role in touching):
            return True
        with_pools = all(role in (CONVOLUTION, POOL) for role in touching)
        return with_pools and _fills_blocks(var, block) and CONVOLUTION in touching

    return {var for var, role in roles.items() if role is not None and blocked(var)}


def _with_blocked_parameters(function: tirx.PrimFunc, positions: list[int], block: int) -> tirx.PrimFunc:
    """``function`` with the NCHW buffers of its parameters at ``positions`` stored blocked."""
    sch = s_tir.Schedule(function)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for position in positions:
        buffer = function.params[position]
        accessing = next(
            b for b in blocks if any(region.source.same_as(buffer) for region in [*sch.get(b).reads, *sch.get(b).writes])
        )
        if any(region.source.same_as(buffer) for region in sch.get(accessing).writes):  # the output: zeros past C
            sch.transform_layout(accessing, buffer, blocked_layout(block), pad_value=0)
            if sch.get(accessing).name_hint in POOL_BLOCKS:
                _pool_in_blocks(sch, accessing, block)
        else:  # an input: read below C only (the kernels pad their packed inputs themselves)
            sch.transform_layout(accessing, buffer, blocked_layout(block), assume_injective_transform=True)
        if sch.get(accessing).name_hint == kernels.PACK:
            _pack_in_blocks(sch, accessing, block)
    return sch.mod["main"]


def _pool_in_blocks(sch: s_tir.Schedule, pool: s_tir.schedule.SBlockRV, block: int) -> None:
    """A pooling block writing a blocked output iterates as it: a block's channels innermost among its output
    axes (the vector lanes of its schedule), the window after them."""
    axes = len(sch.get(pool).iter_vars)
    index = tirx.IndexMap.from_func(lambda n, c, h, w, *window: [n, c // block, h, w, c % block, *window], ndim=axes)
    sch.transform_block_layout(pool, index)


def _pack_in_blocks(sch: s_tir.Schedule, pack: s_tir.schedule.SBlockRV, block: int) -> None:
    """A convolution's packed input (``[N, C/depth, H, W, depth]``) re-blocked as ``[N, C/block, H, W, block]``,
    the layout of its blocked input: packing is then a contiguous copy (a widening or an offset on the way)."""
    _, depth_blocks, _, _, depth = (int(d) for d in sch.get(pack).writes[0].source.shape)
    if depth >= block:
        return
    per_block = block // depth
    index = lambda n, c_block, y, x, c: [n, c_block // per_block, y, x, c_block % per_block * depth + c]  # noqa: E731
    sch.transform_layout(pack, ("write", 0), index, pad_value=0)  # channels past the input's: never read
    if depth_blocks % per_block == 0:  # unpadded (with padding, the write's transform has made it iterate so)
        sch.transform_block_layout(pack, index)


@relax.expr_functor.mutator
class _Planner(relax.PyExprMutator):
    """Rewrites each kernel call that reads or makes a blocked tensor into a call of a blocked copy of its kernel
    (one copy per kernel and combination of blocked parameters; the output is the kernel's last parameter)."""

    def __init__(self, module: tvm.IRModule, block: int) -> None:
        super().__init__(module)
        self.module = module
        self.block = block
        self.blocked: set[relax.Var] = set()
        self.copies: dict[tuple[str, tuple[int, ...]], tuple[relax.GlobalVar, tirx.PrimFunc]] = {}

    def plan(self) -> tvm.IRModule:
        for global_var, function in self.module.functions_items():
            if isinstance(function, relax.Function):
                self.blocked = _blocked_tensors(self.module, function, self.block)
                self.builder_.update_func(global_var, self.visit_expr(function))
        return self.builder_.get()

    def _copy(self, callee: relax.GlobalVar, positions: tuple[int, ...]) -> tuple[relax.GlobalVar, tirx.PrimFunc]:
        key = (callee.name_hint, positions)
        if key not in self.copies:
            function = _with_blocked_parameters(self.module[callee], list(positions), self.block)
            self.copies[key] = self.builder_.add_func(function, blocked_name(callee.name_hint, self.block)), function
        return self.copies[key]

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if called_kernel(value) is None:
            super().visit_var_binding_(binding)
            return
        arguments = list(value.args[1].fields)
        positions = [i for i, argument in enumerate(arguments) if argument in self.blocked]
        if binding.var in self.blocked:
            positions.append(len(arguments))
        if not positions:
            super().visit_var_binding_(binding)
            return
        kernel, function = self._copy(value.args[0], tuple(positions))
        output = function.params[-1]  # the copy's output buffer, in its layout
        output_type = relax.TensorType([int(d) for d in output.shape], binding.var.ty.dtype)
        call = relax.call_tir(kernel, [self.visit_expr(a) for a in arguments], output_type)
        self.set_var_remap(binding.var, self.builder_.emit(call, binding.var.name))


def plan_layouts(dot: DotProduct) -> tvm.transform.Pass:
    """The module pass storing the int8 activations between convolution kernels in blocks of ``dot.lanes``
    channels (see the module's docstring); kernels no call uses any more are removed."""

    @tvm.transform.module_pass(opt_level=0, name="edgeq.PlanLayouts")
    def run(module: tvm.IRModule, _context: tvm.transform.PassContext) -> tvm.IRModule:
        return relax.transform.DeadCodeElimination()(_Planner(module, dot.lanes).plan())

    return run
