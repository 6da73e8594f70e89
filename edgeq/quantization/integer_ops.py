"""Integer ops: the modules of the integer model, each one op of ``docs/numerics.md``.

Tensors between ops are int8 (int32 for a high-precision output). Every op that rounds (requantization,
quantizing a float input) carries the target's rule as ``rounding`` (:class:`~edgeq.targets.Rounding`; lookup tables
and clamp levels are built with it at convert). Every op keeps its integer parameters as
buffers and its quantization parameters as plain attributes, so that export and the compiler read them
directly. Convolutions and sums run in float64 on integer values, which is exact: every product and partial
sum is an integer below 2**53 (products are at most 2**14; a reduction would need 2**39 terms to reach 2**53),
so no rounding can occur whatever the summation order; the result is then cast back to int64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgeq.errors import QuantizationError
from edgeq.numerics import (
    ACTIVATION_QMAX,
    ACTIVATION_QMIN,
    FixedPointMultiplier,
    accumulator_bounds,
    bilinear_accumulate,
    bilinear_taps,
    check_split_requantization,
    dequantize,
    look_up,
    needs_int64_accumulator,
    quantize,
    requantize,
    rounding_right_shift,
    saturate,
    split_requantize,
)
from edgeq.ops import LOOKUP_TABLE_OPS, Op, OpTable
from edgeq.quantization.qat_modules import UpsampleNearest2d
from edgeq.quantization.tensor_quant import TensorQuant
from edgeq.targets import Rounding

INTEGER_OPS: OpTable[type[nn.Module]] = OpTable("integer op in integer_ops.py", lambda info: not info.movement)
"""The integer op (a module class of this file) that ``convert_fx`` makes of each op."""


def _channel_view(values: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


def _multiplier_buffers(module: nn.Module, multipliers: Sequence[FixedPointMultiplier]) -> None:
    module.register_buffer("multiplier", torch.tensor([m.multiplier for m in multipliers], dtype=torch.int64))
    module.register_buffer("shift", torch.tensor([m.shift for m in multipliers], dtype=torch.int64))


class IntQuantize(nn.Module):
    """QuantStub: float -> int8 at ``output_scale``. An int8 input is taken as already quantized (raw)."""

    def __init__(self, output_scale: float, rounding: Rounding = Rounding.HALF_TO_EVEN) -> None:
        super().__init__()
        self.output_scale = output_scale
        self.rounding = rounding

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        if value.dtype == torch.int8:
            return value
        return quantize(value, self.output_scale, self.rounding)

    def extra_repr(self) -> str:
        return f"scale={self.output_scale:.6g}"


class IntLeaveFloat(IntQuantize):
    """Float fallback: the float result of an op left in float -> int8 at ``output_scale``."""


class _Dequantizing(nn.Module):
    """int8/int32 -> float32 (per tensor, or per channel along ``axis``)."""

    def __init__(self, quant: TensorQuant) -> None:
        super().__init__()
        self.quant = quant
        self.register_buffer("scales", torch.tensor(quant.scales, dtype=torch.float32))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        if self.quant.axis is None:
            return dequantize(value, self.scales[0])
        return dequantize(value, _channel_view(self.scales, value.dim(), self.quant.axis))

    def extra_repr(self) -> str:
        return f"{self.quant.dtype}, {len(self.quant.scales)} scale(s)"


class IntDequantize(_Dequantizing):
    """DeQuantStub: int8/int32 -> float32; the integer region ends here."""


class IntEnterFloat(_Dequantizing):
    """Float fallback: int8/int32 -> float32 for an op left in float (the integer graph goes on after it)."""


class _WeightedOp(nn.Module):
    """Conv and linear: int8 x int8 -> accumulator (+ bias; int32, or int64 where the bias passes int32:
    ``wide_accumulator``, docs/numerics.md section 5), then requantization (by halves when wide) or int32 out."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        input_scale: float,
        weight_scales: Sequence[float],
        output: TensorQuant,
        multipliers: Sequence[FixedPointMultiplier] | None,
        clamp: tuple[int, int] | None,
        rounding: Rounding = Rounding.HALF_TO_EVEN,
    ) -> None:
        super().__init__()
        self.rounding = rounding
        if (multipliers is None or clamp is None) != (output.dtype == "int32"):
            raise ValueError("multipliers and clamp are given exactly when the output is int8")
        self.register_buffer("weight", weight.to(torch.int8))
        self.register_buffer("bias", bias.to(torch.int64))
        self.input_scale = input_scale
        self.weight_scales = tuple(weight_scales)
        self.output = output
        self.clamp = clamp
        bounds = accumulator_bounds(weight, bias, axis=0)
        self.wide_accumulator = needs_int64_accumulator(bounds)
        if multipliers is not None:
            if self.wide_accumulator:
                check_split_requantization(bounds, multipliers, what=type(self).__name__)
            _multiplier_buffers(self, multipliers)

    def _finish(self, accumulator: torch.Tensor, channel_axis: int) -> torch.Tensor:
        rank = accumulator.dim()
        accumulator = accumulator.to(torch.int64) + _channel_view(self.bias.to(torch.int64), rank, channel_axis)
        if self.output.dtype == "int32":
            return accumulator.to(torch.int32)
        assert self.clamp is not None
        requantizing = split_requantize if self.wide_accumulator else requantize  # chosen once: a trace records it
        scaled = requantizing(
            accumulator,
            _channel_view(self.multiplier, rank, channel_axis),
            _channel_view(self.shift, rank, channel_axis),
            self.rounding,
        )
        return saturate(scaled, *self.clamp, torch.int8)


@INTEGER_OPS.register(Op.CONV2D)
class IntConv2d(_WeightedOp):
    """2-D convolution (groups, stride, padding and dilation as in torch)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        input_scale: float,
        weight_scales: Sequence[float],
        output: TensorQuant,
        multipliers: Sequence[FixedPointMultiplier] | None,
        clamp: tuple[int, int] | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        rounding: Rounding = Rounding.HALF_TO_EVEN,
    ) -> None:
        super().__init__(weight, bias, input_scale, weight_scales, output, multipliers, clamp, rounding)
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        products = F.conv2d(
            value.to(torch.float64), self.weight.to(torch.float64), None, self.stride, self.padding, self.dilation, self.groups
        )
        return self._finish(products, channel_axis=1)

    def extra_repr(self) -> str:
        out_channels, in_per_group, kh, kw = self.weight.shape
        return (
            f"{in_per_group * self.groups}, {out_channels}, kernel_size=({kh}, {kw}), stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, clamp={self.clamp}, "
            f"output={self.output.dtype}"
        )


@INTEGER_OPS.register(Op.LINEAR)
class IntLinear(_WeightedOp):
    """Fully connected layer over the last axis."""

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        products = F.linear(value.to(torch.float64), self.weight.to(torch.float64))
        return self._finish(products, channel_axis=products.dim() - 1)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, clamp={self.clamp}, output={self.output.dtype}"


@INTEGER_OPS.register(Op.ADD)
class IntAdd(nn.Module):
    """``saturate(round((a * M_a + b * M_b) / 2**n))``: both inputs rescaled to the output, one rounding (ties by
    ``rounding``; ``numerics.add_multipliers`` chose the multipliers for it)."""

    def __init__(
        self,
        input_scales: tuple[float, float],
        output_scale: float,
        multipliers: tuple[int, int],
        shift: int,
        clamp: tuple[int, int],
        rounding: Rounding = Rounding.HALF_TO_EVEN,
    ) -> None:
        super().__init__()
        self.rounding = rounding
        self.input_scales = input_scales
        self.output_scale = output_scale
        self.multipliers = multipliers
        self.shift = shift
        self.clamp = clamp

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        total = left.to(torch.int64) * self.multipliers[0] + right.to(torch.int64) * self.multipliers[1]
        return saturate(rounding_right_shift(total, self.shift, self.rounding), *self.clamp, torch.int8)

    def extra_repr(self) -> str:
        return f"multipliers={self.multipliers}, shift={self.shift}, clamp={self.clamp}"


@INTEGER_OPS.register(Op.MUL)
class IntMul(nn.Module):
    """``saturate(round(a * b * M / 2**n))`` with broadcasting; ``M * 2**-n`` is ``s_a * s_b / s_out``."""

    def __init__(
        self,
        input_scales: tuple[float, float],
        output_scale: float,
        multiplier: FixedPointMultiplier,
        rounding: Rounding = Rounding.HALF_TO_EVEN,
    ) -> None:
        super().__init__()
        self.rounding = rounding
        self.input_scales = input_scales
        self.output_scale = output_scale
        self.multiplier = multiplier

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        product = left.to(torch.int64) * right.to(torch.int64)
        return saturate(requantize(product, self.multiplier.multiplier, self.multiplier.shift, self.rounding), ACTIVATION_QMIN, ACTIVATION_QMAX, torch.int8)

    def extra_repr(self) -> str:
        return f"multiplier={self.multiplier.multiplier}, shift={self.multiplier.shift}"


@INTEGER_OPS.register(Op.MATMUL)
class IntMatMul(nn.Module):
    """``saturate(round(acc * M / 2**n))`` with ``acc[..., i, j] = Σ_k a[..., i, k] * b[..., k, j]``, the
    int8 x int8 products summed exactly (``|acc| <= K * 128 * 128 < 2**31``, checked at convert), leading axes
    broadcast as ``torch.matmul``; ``M * 2**-n`` is ``s_a * s_b / s_out`` (docs/numerics.md, "Matrix product")."""

    def __init__(
        self,
        input_scales: tuple[float, float],
        output_scale: float,
        reduction_size: int,
        multiplier: FixedPointMultiplier,
        rounding: Rounding = Rounding.HALF_TO_EVEN,
    ) -> None:
        super().__init__()
        self.rounding = rounding
        self.input_scales = input_scales
        self.output_scale = output_scale
        self.reduction_size = reduction_size
        self.multiplier = multiplier

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        if left.shape[-1] != self.reduction_size:
            raise QuantizationError(
                f"matmul: the product is over {left.shape[-1]} values but the model was converted for "
                f"{self.reduction_size} (its accumulator bound and multiplier are proved for that size); prepare with "
                "inputs of this size"
            )
        acc = torch.matmul(left.to(torch.float64), right.to(torch.float64)).to(torch.int64)
        scaled = requantize(acc, self.multiplier.multiplier, self.multiplier.shift, self.rounding)
        return saturate(scaled, ACTIVATION_QMIN, ACTIVATION_QMAX, torch.int8)

    def extra_repr(self) -> str:
        return f"reduction_size={self.reduction_size}, multiplier={self.multiplier.multiplier}, shift={self.multiplier.shift}"


@INTEGER_OPS.register(Op.CONCAT)
class IntConcat(nn.Module):
    """Concatenation; each input requantized to the output scale (exactly the identity when scales match)."""

    def __init__(
        self,
        dim: int,
        input_scales: Sequence[float],
        output_scale: float,
        multipliers: Sequence[FixedPointMultiplier],
        rounding: Rounding = Rounding.HALF_TO_EVEN,
    ) -> None:
        super().__init__()
        self.rounding = rounding
        self.dim = dim
        self.input_scales = tuple(input_scales)
        self.output_scale = output_scale
        self.multipliers = tuple(multipliers)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        rescaled = [
            saturate(requantize(t, m.multiplier, m.shift, self.rounding), ACTIVATION_QMIN, ACTIVATION_QMAX, torch.int8)
            for t, m in zip(tensors, self.multipliers)
        ]
        return torch.cat(rescaled, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, inputs={len(self.multipliers)}"


class _PoolingRequantize(nn.Module):
    """An integer sum of ``count`` values, requantized with a multiplier that folds 1/count."""

    def __init__(self, input_scale: float, output_scale: float, count: int, multiplier: FixedPointMultiplier, rounding: Rounding) -> None:
        super().__init__()
        self.rounding = rounding
        self.input_scale = input_scale
        self.output_scale = output_scale
        self.count = count
        self.multiplier = multiplier

    def _finish(self, total: torch.Tensor) -> torch.Tensor:
        scaled = requantize(total, self.multiplier.multiplier, self.multiplier.shift, self.rounding)
        return saturate(scaled, ACTIVATION_QMIN, ACTIVATION_QMAX, torch.int8)


@INTEGER_OPS.register(Op.AVG_POOL2D)
class IntAvgPool2d(_PoolingRequantize):
    """Average pooling: window sums (padding counts as zeros), then requantization folding 1/(kh*kw)."""

    def __init__(
        self,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        input_scale: float,
        output_scale: float,
        multiplier: FixedPointMultiplier,
        rounding: Rounding = Rounding.HALF_TO_EVEN,
    ) -> None:
        super().__init__(input_scale, output_scale, kernel_size[0] * kernel_size[1], multiplier, rounding)
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        sums = F.avg_pool2d(
            value.to(torch.float64), self.kernel_size, self.stride, self.padding, count_include_pad=True, divisor_override=1
        )
        return self._finish(sums.to(torch.int64))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


@INTEGER_OPS.register(Op.GLOBAL_AVG_POOL2D)
class IntGlobalAvgPool2d(_PoolingRequantize):
    """Mean over H and W: the integer sum over ``input_size``, then requantization folding 1/(H*W)."""

    def __init__(
        self,
        keepdim: bool,
        input_size: tuple[int, int],
        input_scale: float,
        output_scale: float,
        multiplier: FixedPointMultiplier,
        rounding: Rounding = Rounding.HALF_TO_EVEN,
    ) -> None:
        super().__init__(input_scale, output_scale, input_size[0] * input_size[1], multiplier, rounding)
        self.keepdim = keepdim
        self.input_size = input_size

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        if tuple(value.shape[-2:]) != tuple(self.input_size):
            raise QuantizationError(
                f"global average pool: input is {tuple(value.shape[-2:])} but the model was converted for "
                f"{tuple(self.input_size)} (its 1/(H*W) is folded into the multiplier); prepare with inputs of this size"
            )
        return self._finish(value.to(torch.int64).sum(dim=(2, 3), keepdim=self.keepdim))

    def extra_repr(self) -> str:
        return f"keepdim={self.keepdim}, input_size={self.input_size}"


@INTEGER_OPS.register(Op.RELU)
class IntClamp(nn.Module):
    """A standalone ReLU / ReLU6: ``clamp(q, low, high)`` at the input's scale."""

    def __init__(self, low: int, high: int) -> None:
        super().__init__()
        self.low = low
        self.high = high

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return torch.clamp(value, self.low, self.high)

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"


@INTEGER_OPS.register(Op.MAX_POOL2D)
class IntMaxPool2d(nn.Module):
    """Max pooling of int8 values (padding never wins: it is ignored, as in torch)."""

    def __init__(
        self,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        ceil_mode: bool,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.ceil_mode = ceil_mode

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        pooled = F.max_pool2d(
            value.to(torch.float64), self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode
        )
        return pooled.to(torch.int8)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}"


@INTEGER_OPS.register(Op.UPSAMPLE_NEAREST2D)
class IntUpsampleNearest2d(UpsampleNearest2d):
    """Nearest-neighbour upsampling by integer factors: pure copies, the same on int8 as on float."""


@INTEGER_OPS.register(Op.UPSAMPLE_BILINEAR2D)
class IntUpsampleBilinear2d(nn.Module):
    """Bilinear resize to ``size``: the four-tap sum with fixed-point weights (``numerics.bilinear_taps``), then
    requantization folding the weights' ``2**(2F)`` (docs/numerics.md, "Bilinear resize")."""

    def __init__(
        self,
        size: tuple[int, int],
        align_corners: bool,
        input_scale: float,
        output_scale: float,
        multiplier: FixedPointMultiplier,
        rounding: Rounding = Rounding.HALF_TO_EVEN,
    ) -> None:
        super().__init__()
        self.rounding = rounding
        self.size = size
        self.align_corners = align_corners
        self.input_scale = input_scale
        self.output_scale = output_scale
        self.multiplier = multiplier

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        rows, columns = (bilinear_taps(n, o, self.align_corners) for n, o in zip(value.shape[-2:], self.size))
        acc = bilinear_accumulate(value, rows, columns)
        scaled = requantize(acc, self.multiplier.multiplier, self.multiplier.shift, self.rounding)
        return saturate(scaled, ACTIVATION_QMIN, ACTIVATION_QMAX, torch.int8)

    def extra_repr(self) -> str:
        return f"size={self.size}, align_corners={self.align_corners}, {self.input_scale:.4g} -> {self.output_scale:.4g}"


@INTEGER_OPS.register(*LOOKUP_TABLE_OPS)
class IntLookupTable(nn.Module):
    """A table activation: ``table[q + 128]`` (docs/numerics.md, lookup-table activations); ``op`` says which,
    ``rounding`` the rule its entries were rounded by."""

    def __init__(self, op: Op, alpha: float, input_scale: float, output_scale: float, table: torch.Tensor, rounding: Rounding = Rounding.HALF_TO_EVEN) -> None:
        super().__init__()
        self.rounding = rounding
        self.op = op
        self.alpha = alpha
        self.input_scale = input_scale
        self.output_scale = output_scale
        self.register_buffer("table", table.to(torch.int8))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return look_up(value, self.table)

    def extra_repr(self) -> str:
        return f"{self.op.value}, {self.input_scale:.4g} -> {self.output_scale:.4g}"
