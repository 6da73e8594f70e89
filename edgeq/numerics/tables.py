"""Clamp levels and lookup tables: the int8 constants of activations (docs/numerics.md section 7)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from edgeq.numerics.rounding import ACTIVATION_QMAX, ACTIVATION_QMIN, round_half
from edgeq.ops import Op, OpTable
from edgeq.targets import Rounding

RELU6_CEILING = 6.0


def quantized_level(value: float, scale: float, rounding: Rounding = Rounding.HALF_TO_EVEN) -> int:
    """``round(float32(value) / float32(scale))``, ties by ``rounding`` (a quantization: the target's rule)."""
    quotient = torch.tensor(np.float32(value) / np.float32(scale), dtype=torch.float32)
    return int(round_half(quotient, rounding))


def relu6_ceiling(scale: float, rounding: Rounding = Rounding.HALF_TO_EVEN) -> int:
    """The int8 value of 6.0 at ``scale``: ``min(127, round(float32(6) / float32(s)))``, ties by ``rounding`` (the
    fake quantization of 6.0 in QAT, so QAT's clamp and the integer model's agree)."""
    return min(ACTIVATION_QMAX, quantized_level(RELU6_CEILING, scale, rounding))


def clamp_levels(bounds: tuple[float, float], scale: float, rounding: Rounding = Rounding.HALF_TO_EVEN) -> tuple[int, int]:
    """The int8 bounds of a clamp to real ``bounds`` at ``scale`` (a standalone ReLU, ReLU6, Hardtanh), each as
    ReLU6's ceiling: ``saturate(round(float32(b) / float32(s)))``, ties by ``rounding``; an infinite bound is no
    bound."""

    def level(bound: float) -> int:
        if math.isinf(bound):
            return ACTIVATION_QMAX if bound > 0 else ACTIVATION_QMIN
        return min(max(quantized_level(bound, scale, rounding), ACTIVATION_QMIN), ACTIVATION_QMAX)

    return level(bounds[0]), level(bounds[1])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _hardsigmoid(x: float) -> float:
    return min(max(x + 3.0, 0.0), 6.0) / 6.0


def _gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def _gelu_tanh(x: float) -> float:
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


TABLE_FUNCTIONS: OpTable[Callable[[float, float], float]] = OpTable(
    "table function in numerics/tables.py", lambda info: info.lookup_table
)
"""The real function of each lookup-table op, in float64 (``alpha``: the op's constant, ``OpInfo.alpha``:
LeakyReLU's negative slope, ELU's alpha; unused by the others); docs/numerics.md section 7."""

TABLE_FUNCTIONS.register(Op.SIGMOID)(lambda x, alpha: _sigmoid(x))
TABLE_FUNCTIONS.register(Op.TANH)(lambda x, alpha: math.tanh(x))
TABLE_FUNCTIONS.register(Op.HARDSIGMOID)(lambda x, alpha: _hardsigmoid(x))
TABLE_FUNCTIONS.register(Op.HARDSWISH)(lambda x, alpha: x * _hardsigmoid(x))
TABLE_FUNCTIONS.register(Op.SILU)(lambda x, alpha: x * _sigmoid(x))
TABLE_FUNCTIONS.register(Op.LEAKYRELU)(lambda x, alpha: x if x >= 0 else alpha * x)
TABLE_FUNCTIONS.register(Op.GELU)(lambda x, alpha: _gelu(x))
TABLE_FUNCTIONS.register(Op.GELU_TANH)(lambda x, alpha: _gelu_tanh(x))
TABLE_FUNCTIONS.register(Op.ELU)(lambda x, alpha: x if x > 0 else alpha * math.expm1(x))

LUT_SIZE = ACTIVATION_QMAX - ACTIVATION_QMIN + 1


def lookup_table(
    op: Op,
    input_scale: float,
    output_scale: float,
    alpha: float = 0.0,
    zero_points: tuple[int, int] = (0, 0),
    rounding: Rounding = Rounding.HALF_TO_EVEN,
) -> np.ndarray:
    """The int8 table of a lookup-table ``op`` between two scales: entry ``q + 128`` is the output for input ``q``.

    ``x = float32(q - z_in) * float32(s_in)`` (the float32 product of DequantizeLinear), ``y = f(x)`` in float64
    with Python's ``math``, ``table[q + 128] = saturate(round(y / float64(s_out)) + z_out)``, ties by ``rounding``;
    ``zero_points`` are ``(z_in, z_out)``, 0 for edgeq's own activations (docs/numerics.md section 9).
    """
    scale_in, scale_out = np.float32(input_scale), float(np.float32(output_scale))
    zero_in, zero_out = zero_points
    values = [
        TABLE_FUNCTIONS[op](float(np.float32(q - zero_in) * scale_in), float(np.float32(alpha))) / scale_out
        for q in range(ACTIVATION_QMIN, ACTIVATION_QMAX + 1)
    ]
    rounded = round_half(torch.tensor(values, dtype=torch.float64), rounding).numpy()
    return np.clip(rounded + zero_out, ACTIVATION_QMIN, ACTIVATION_QMAX).astype(np.int8)


def look_up(value: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """int8 -> int8 through a :func:`lookup_table`: ``table[q + 128]``."""
    return table[value.to(torch.int64) - ACTIVATION_QMIN]
