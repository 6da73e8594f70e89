"""Kernel selection: int8 convolutions and matmuls with constant weights become edgeq's blocked kernels.

A legalization (``relax.transform.LegalizeOps`` with edgeq's rules for ``relax.nn.conv2d`` and
``relax.matmul``): an int8 x constant int8 -> int32 op becomes a call of the matching TE kernel of
:mod:`edgeq.compile.kernels` with its weights packed here, once, for the CPU's dot product; every other op gets
TVM's own legalization. Grouped convolutions take the conv2d kernel (each block of output channels over the input
channels its groups read), depthwise ones the depthwise kernel. A gather from a constant int8 table (a table
activation) becomes edgeq's lookup kernel, which :mod:`edgeq.compile.fusion_patterns` lets operator fusion put in
the epilogue of the kernel before it; a widening conversion of an int8 tensor is marked for that module too.

A convolution whose input is padded with a constant by an op of its own (a zero point, docs/numerics.md section 9)
takes that padding into its kernel: the kernel's packing stage writes the constant where it writes zeros
otherwise, and the padded tensor is never made.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import tvm
from tvm import relax, topi
from tvm.relax.block_builder import BlockBuilder

from edgeq.compile import kernels
from edgeq.compile.cpu_features import DotProduct
from edgeq.compile.fusion_patterns import LOOKUP_ATTRIBUTE, WIDENING_ATTRIBUTE


def _default(op: str):
    return tvm.ir.Op.get(op).get_attr("FLegalize")


def _constant(expr: relax.Expr) -> np.ndarray | None:
    """The values of a constant (None for anything else)."""
    value = getattr(expr, "value", None)
    return value.numpy() if hasattr(value, "numpy") else None


def _int8_constant(expr: relax.Expr) -> np.ndarray | None:
    array = _constant(expr)
    return array if array is not None and array.dtype == np.int8 else None


def _static_int8(expr: relax.Expr) -> bool:
    info = expr.ty
    return isinstance(info, relax.TensorType) and str(info.dtype) == "int8" and info.shape is not None and all(
        isinstance(d, tvm.tirx.IntImm) for d in info.shape
    )


Bindings = dict[relax.Var, relax.Expr]
"""The value bound to each variable of the functions being legalized."""


def _spatial_padding(data: relax.Expr, bindings: Bindings) -> tuple[relax.Expr, list[int], int] | None:
    """``data``'s unpadded input, its padding (top, left, bottom, right) and pad value, when ``data`` is an int8
    NCHW tensor padded with an integer constant on its spatial axes only; else None."""
    pad = bindings.get(data)
    if not (isinstance(pad, relax.Call) and pad.op.name == "relax.nn.pad" and str(pad.attrs.pad_mode) == "constant"):
        return None
    widths = [int(w) for w in pad.attrs.pad_width]
    value = float(pad.attrs.pad_value)
    if len(widths) != 8 or any(widths[:4]) or not value.is_integer() or not -128 <= value <= 127 or not _static_int8(pad.args[0]):
        return None
    top, bottom, left, right = widths[4:]
    return pad.args[0], [top, left, bottom, right], int(value)


def _conv2d(dot: DotProduct, bindings: Bindings):
    default = _default("relax.nn.conv2d")

    def legalize(bb: BlockBuilder, call: relax.Call) -> relax.Expr:
        attrs = call.attrs
        weights = _int8_constant(call.args[1])
        fits = (
            weights is not None
            and _static_int8(call.args[0])
            and str(attrs.out_dtype) == "int32"
            and (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) == ("NCHW", "OIHW", "NCHW")
        )
        if not fits:
            return default(bb, call)
        data, padding, pad_value = call.args[0], [int(p) for p in attrs.padding], 0
        padded = _spatial_padding(data, bindings) if not any(padding) else None
        if padded is not None:
            data, padding, pad_value = padded
        groups, channels = int(attrs.groups), weights.shape[0]
        geometry = dict(strides=[int(s) for s in attrs.strides], padding=padding, dilation=[int(d) for d in attrs.dilation], pad_value=pad_value)
        if groups == channels == int(data.ty.shape[1]) and weights.shape[1] == 1:
            packed, correction = kernels.pack_depthwise_weights(weights, dot, geometry["dilation"])
            kernel = partial(kernels.depthwise_conv2d, kernel_width=weights.shape[3], dot=dot, **geometry)
            subtracted = relax.const(correction) if correction.any() else None
            return bb.call_te(kernel, data, relax.const(packed), subtracted, primfunc_name_hint="conv2d")
        packed, correction = kernels.pack_conv_weights(weights, dot, groups)
        kernel = partial(kernels.conv2d, channels=channels, dot=dot, groups=groups, **geometry)
        return bb.call_te(kernel, data, relax.const(packed), relax.const(correction), primfunc_name_hint="conv2d")

    return legalize


def _matmul(dot: DotProduct):
    default = _default("relax.matmul")

    def legalize(bb: BlockBuilder, call: relax.Call) -> relax.Expr:
        weights = _int8_constant(call.args[1])
        if weights is None or weights.ndim != 2 or not _static_int8(call.args[0]) or str(call.attrs.out_dtype) != "int32":
            return default(bb, call)
        packed, correction = kernels.pack_dense_weights(weights, dot)
        kernel = partial(kernels.dense, features=weights.shape[1], dot=dot)
        return bb.call_te(kernel, call.args[0], relax.const(packed), relax.const(correction), primfunc_name_hint="matmul")

    return legalize


def _narrowed(expr: relax.Expr) -> relax.Expr | None:
    """An int64 constant whose values all fit int32, as an int32 constant (None for anything else)."""
    array = _constant(expr)
    if array is None or array.dtype != np.int64 or not array.size:
        return None
    info = np.iinfo(np.int32)
    return relax.const(array.astype(np.int32)) if info.min <= array.min() and array.max() <= info.max else None


def _multiply():
    """int64 products with a constant that fits int32 (the requantization multipliers) keep the constant as int32
    and widen it inside the kernel: with both operands sign-extended from 32 bits, LLVM multiplies 32 x 32 -> 64
    (``vpmuldq``, ``smull``) instead of emulating a 64 x 64 multiply (three ``vpmuludq`` and shifts on AVX2)."""
    default = _default("relax.multiply")

    def legalize(bb: BlockBuilder, call: relax.Call) -> relax.Expr:
        left, right = call.args
        narrow = _narrowed(right)
        if narrow is not None and str(left.ty.dtype) == "int64":
            return bb.call_te(topi.multiply, left, narrow, primfunc_name_hint="multiply")
        return default(bb, call)

    return legalize


def _astype(bindings: Bindings):
    """A float64 rounded to an integer, then converted to int32 (the requantization where it is exact,
    :mod:`edgeq.compile.lower_integer`), becomes one :func:`~edgeq.compile.kernels.round_to_int32`; a widening
    conversion of an int8 tensor is marked :data:`WIDENING_ATTRIBUTE` (see :mod:`edgeq.compile.fusion_patterns`)."""
    default = _default("relax.astype")

    def legalize(bb: BlockBuilder, call: relax.Call) -> relax.Expr:
        source, dtype = call.args[0], str(call.attrs.dtype)
        rounded = bindings.get(source)
        if (
            dtype == "int32"
            and isinstance(rounded, relax.Call)
            and rounded.op.same_as(tvm.ir.Op.get("relax.round"))
            and str(rounded.args[0].ty.dtype) == "float64"
        ):
            return bb.call_te(kernels.round_to_int32, rounded.args[0], primfunc_name_hint="round_to_int32")
        if str(source.ty.dtype) == "int8" and dtype != "int8":
            return bb.call_te(topi.cast, source, dtype, primfunc_name_hint="widen", primfunc_attrs={WIDENING_ATTRIBUTE: True})
        return default(bb, call)

    return legalize


def _offset_int8(index: relax.Expr, bindings: Bindings) -> tuple[relax.Expr, int] | None:
    """``(x, c)`` when ``index`` is ``int32(x) + c``, ``x`` an int8 tensor and ``c`` an int32 scalar constant (a
    table activation's index, :mod:`edgeq.compile.lower_integer`); else None."""
    add = bindings.get(index)
    if not (isinstance(add, relax.Call) and add.op.same_as(tvm.ir.Op.get("relax.add"))):
        return None
    widened, offset = bindings.get(add.args[0]), _constant(add.args[1])
    if not (isinstance(widened, relax.Call) and widened.op.same_as(tvm.ir.Op.get("relax.astype"))) or offset is None:
        return None
    if str(widened.args[0].ty.dtype) != "int8" or offset.size != 1:
        return None
    return widened.args[0], int(offset.reshape(()))


def _take(bindings: Bindings):
    """A clipped gather from a constant 1-D int8 table (a table activation, :mod:`edgeq.compile.lower_integer`)
    becomes :func:`~edgeq.compile.kernels.lookup`, reading the int8 activation itself where the index is that
    activation plus a constant (the widening conversion and the add are then left to dead-code elimination)."""
    default = _default("relax.take")

    def legalize(bb: BlockBuilder, call: relax.Call) -> relax.Expr:
        table = _int8_constant(call.args[0])
        if table is None or table.ndim != 1 or str(call.attrs.mode) != "clip" or int(call.attrs.axis) != 0:
            return default(bb, call)
        source, offset = _offset_int8(call.args[1], bindings) or (call.args[1], 0)
        return bb.call_te(
            kernels.lookup, source, call.args[0], offset, primfunc_name_hint="lookup", primfunc_attrs={LOOKUP_ATTRIBUTE: True}
        )

    return legalize


def select_kernels(dot: DotProduct) -> tvm.transform.Pass:
    """Legalize every Relax op: int8 convolutions (with the constant padding of their input) and matmuls into
    edgeq's kernels for ``dot``, int64 products with a constant that fits int32 as widening multiplies; the
    paddings no op reads any more are removed."""

    @tvm.transform.module_pass(opt_level=0, name="edgeq.SelectKernels")
    def run(module: tvm.IRModule, _context: tvm.transform.PassContext) -> tvm.IRModule:
        bindings: Bindings = {}
        for function in module.functions.values():
            if isinstance(function, relax.Function):
                bindings.update(relax.analysis.get_var2val(function))
        legalize = relax.transform.LegalizeOps(
            {"relax.nn.conv2d": _conv2d(dot, bindings), "relax.matmul": _matmul(dot), "relax.multiply": _multiply(),
             "relax.astype": _astype(bindings), "relax.take": _take(bindings)}
        )
        return relax.transform.DeadCodeElimination()(legalize(module))

    return run
