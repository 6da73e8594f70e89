"""Reading the quantization of a QDQ unit from TVM's import: the constant scales and zero points of its
``relax.quantize`` / ``relax.dequantize`` calls, its int8 weights and its int32 bias, and the constant arguments
of its float ops."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax

from edgeq.compile.integer_relax import Activation
from edgeq.numerics import accumulator_bias


def constant(expr: relax.Expr) -> np.ndarray | None:
    """The values of a constant (None for anything else)."""
    value = getattr(expr, "value", None)
    return value.numpy() if hasattr(value, "numpy") else None


def scalar(expr: relax.Expr) -> float | None:
    """The value of a constant of one element (None for anything else)."""
    value = constant(expr)
    return float(value.reshape(())) if value is not None and value.size == 1 else None


def prim_float(expr: relax.Expr) -> float | None:
    """The value of a scalar argument: a constant, or an ``IntImm`` / ``FloatImm`` (None for anything else)."""
    value_of_constant = constant(expr)
    if value_of_constant is not None:
        return float(value_of_constant.reshape(()))
    value = getattr(expr, "value", None)
    if isinstance(value, (int, float)):  # an IntImm / FloatImm argument
        return float(value)
    return float(value.value) if value is not None and hasattr(value, "value") else None


@dataclass(frozen=True)
class Quant:
    """The parameters of one quantize/dequantize call, when they are constants."""

    scales: np.ndarray
    zero_points: np.ndarray
    dtype: str
    axis: int

    @property
    def activation(self) -> Activation | None:
        """Scale and zero point of an int8 per-tensor quantization (``None`` for anything else)."""
        if self.dtype == "int8" and self.scales.size == 1:
            return Activation(float(self.scales.reshape(())), int(self.zero_points.reshape(())))
        return None


def quant(call: relax.Call, quantized: relax.Expr | None) -> Quant | None:
    """The parameters of a quantize call, or of a dequantize call of ``quantized`` (None unless constants)."""
    scales, zero_points = constant(call.args[1]), constant(call.args[2])
    if scales is None or zero_points is None:
        return None
    dtype = str(call.ty.dtype if call.op.name == "relax.quantize" else quantized.ty.dtype)
    return Quant(scales.astype(np.float32).reshape(-1), zero_points.reshape(-1), dtype, int(call.attrs.axis))


def input_activation(dequantize: relax.Call) -> Activation | None:
    """The quantization of a dequantized int8 activation (None for anything else)."""
    found = quant(dequantize, dequantize.args[0])
    return found.activation if found is not None and str(dequantize.args[0].ty.dtype) == "int8" else None


def output_activation(quantize: relax.Call) -> Activation | None:
    """The quantization an int8 quantize call writes (None for anything else)."""
    found = quant(quantize, None)
    return found.activation if found is not None else None


def same_quantization(quantize: relax.Call, dequantize: relax.Call) -> bool:
    """Whether a quantize call writes the int8 quantization a dequantize call reads."""
    source = input_activation(dequantize)
    return source is not None and source == output_activation(quantize)


def _symmetric_constant(dequantize: relax.Call, dtype: type[np.integer]) -> tuple[np.ndarray, Quant] | None:
    """The values and quantization of a dequantized constant of ``dtype`` with zero points 0, else None."""
    values = constant(dequantize.args[0])
    found = quant(dequantize, dequantize.args[0])
    if values is None or found is None or values.dtype != dtype or found.zero_points.any():
        return None
    return values, found


def weights(dequantize: relax.Call, channels_axis: int, channels: int) -> tuple[np.ndarray, list[float]] | None:
    """int8 weights and their per-channel scales (a per-tensor scale is repeated), or None if they do not fit."""
    symmetric = _symmetric_constant(dequantize, np.int8)
    if symmetric is None:
        return None
    values, found = symmetric
    if found.scales.size == 1:
        return values, [float(found.scales[0])] * channels
    if found.axis != channels_axis or found.scales.size != channels:
        return None
    return values, [float(s) for s in found.scales]


def bias(dequantize: relax.Call | None, input_scale: float, weight_scales: list[float]) -> np.ndarray | None:
    """The bias's integers at ``s_in * s_w`` (:func:`edgeq.numerics.accumulator_bias`: zeros when there is none,
    or when it is all zeros at any scale; int64 for one written at ``s_in * s_w * 2**k``); None if it does not
    fit."""
    if dequantize is None:
        return np.zeros(len(weight_scales), dtype=np.int32)
    symmetric = _symmetric_constant(dequantize, np.int32)
    if symmetric is None:
        return None
    return accumulator_bias(symmetric[0], symmetric[1].scales, input_scale, weight_scales)
