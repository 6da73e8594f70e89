"""ONNX's integer-only ops in Relax: ``ConvInteger``, which TVM's ONNX frontend has no converter for (its
``MatMulInteger`` converter computes as below).

``ConvInteger(x, w, x_zero_point, w_zero_point)`` is ``Σ (x - z_x)(w - z_w)`` in int32, the input padded with
its zero point (padding adds 0, as ONNX Runtime computes it): both operands widened to int32 less their zero
points (``w``'s per output channel, or one), then an int32 convolution. Exact, like ONNX Runtime's: the products
of two 8-bit values less their zero points and their sums are integers int32 holds (the ONNX specification's
bound). The ops run on the CPU (check: they are not among any NPU's ops).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tvm import relax
from tvm.relax import op as R

from edgeq.errors import CompileError


def conv_integer(builder: relax.BlockBuilder, inputs: list[relax.Expr | None], attributes: dict[str, Any], what: str) -> relax.Expr:
    """The Relax expression of a ``ConvInteger`` node (its inputs and attributes as TVM's importer gives them),
    normalized by ``builder``; ``what`` names the node in errors.

    Raises:
        CompileError: a form edgeq does not compile (not 2-D, ``auto_pad``), one line naming the node.
    """
    x, w = inputs[0], inputs[1]
    if len(x.ty.shape) != 4:
        raise CompileError(f"{what}: a {len(x.ty.shape) - 2}-D ConvInteger; edgeq compiles 2-D ones (NCHW)")
    auto_pad = attributes.get("auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
        raise CompileError(f"{what}: auto_pad {auto_pad!r} is not supported; export the model with explicit pads")
    source = _less_zero_point(x, inputs[2] if len(inputs) > 2 else None, None)
    weights = _less_zero_point(w, inputs[3] if len(inputs) > 3 else None, [-1, 1, 1, 1])
    return builder.normalize(R.nn.conv2d(
        source,
        weights,
        strides=list(attributes.get("strides", [1, 1])),
        padding=list(attributes.get("pads", [0, 0, 0, 0])),
        dilation=list(attributes.get("dilations", [1, 1])),
        groups=int(attributes.get("group", 1)),
        out_dtype="int32",
    ))


Converter = Callable[[relax.BlockBuilder, list, dict[str, Any], str], relax.Expr]

CONVERTERS: dict[str, Converter] = {"ConvInteger": conv_integer}
"""The ONNX ops edgeq converts itself, besides TVM's frontend's own, and how."""


def _less_zero_point(value: relax.Expr, zero_point: relax.Expr | None, per_channel_shape: list[int] | None) -> relax.Expr:
    """``value - zero_point`` in int32; a 1-D zero point (per output channel) reshaped to ``per_channel_shape``."""
    widened = R.astype(value, "int32")
    if zero_point is None:
        return widened
    if per_channel_shape is not None and len(zero_point.ty.shape) == 1:
        zero_point = R.reshape(zero_point, per_channel_shape)
    zero = R.astype(zero_point, "int32")
    return R.subtract(widened, zero)
