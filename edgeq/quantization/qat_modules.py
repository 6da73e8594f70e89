"""The canonical ops of a prepared (calibration / QAT) model.

``prepare_qat_fx`` rewrites every supported pattern of the user's model (modules and functional calls alike)
into one of these modules, so that each node of the prepared graph is one integer op of the NPU. Ops that
produce a new scale own the quantizer of their output (``output_quantizer``); ops that keep their input's
scale (max pool, ReLU, reshapes) have none. ``convert_fx`` turns each module into its integer twin.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from edgeq.ops import LOOKUP_TABLE_OPS, Op, OpTable
from edgeq.quantization.fake_quantize import ActivationFakeQuantize, fake_quantize_weight
from edgeq.quantization.state import FakeQuantStateful
from edgeq.targets import ScaleRule

CANONICAL: OpTable[type[nn.Module]] = OpTable("canonical op in qat_modules.py", lambda info: not info.movement)
"""The canonical op (a module class of this file) that ``prepare_qat_fx`` makes of each op."""


class Activation(str, Enum):
    """An activation fused into the op before it (an integer clamp after requantization)."""

    NONE = "none"
    RELU = "relu"
    RELU6 = "relu6"

    def __call__(self, value: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """The activation of ``value``; ``inplace`` overwrites it (a fresh result that its producer's backward does
        not read: a conv's, a linear's, BatchNorm's or a sum's, as torchvision's ``ReLU6(inplace=True)``)."""
        if self is Activation.RELU:
            return F.relu(value, inplace)
        if self is Activation.RELU6:
            return F.relu6(value, inplace)
        return value

    @property
    def bounds(self) -> tuple[float, float | None]:
        """The activation's clamp ``(low, high)`` (``high`` None: none), as ``torch.clamp`` takes it."""
        return (0.0, 6.0) if self is Activation.RELU6 else (0.0, None)


class Requantizing(nn.Module):
    """An op whose int8 output has a scale of its own.

    Its ``output_quantizer`` observes and fake-quantizes the output. On targets where concat inputs share one
    scale, ``prepare_qat_fx`` removes the quantizer of a producer that feeds only a concat and names the concat
    in ``output_scale_from``: the concat's quantizer then decides this output's scale too.
    """

    output_quantizer: ActivationFakeQuantize | None
    output_scale_from: str | None = None

    def share_output_scale_with(self, module_path: str) -> None:
        """Let the quantizer of the module at ``module_path`` decide this op's output scale."""
        self.output_quantizer = None
        self.output_scale_from = module_path

    def _quantize_output(self, value: torch.Tensor, activation: Activation = Activation.NONE) -> torch.Tensor:
        """``value`` through ``activation`` (in place: a fresh result) and the output quantizer, fused where it can."""
        quantizer = self.output_quantizer
        if activation is not Activation.NONE and quantizer is not None and quantizer.fuses_clamp(value):
            return quantizer.clamp_and_quantize(value, activation.bounds)
        value = activation(value, inplace=True)
        return value if quantizer is None else quantizer(value)


class QuantizeInput(Requantizing):
    """A QuantStub: float in, int8 at ``output_quantizer``'s scale out."""

    def __init__(self, output_quantizer: ActivationFakeQuantize) -> None:
        super().__init__()
        self.output_quantizer = output_quantizer

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return self._quantize_output(value)


class LeaveFloat(QuantizeInput):
    """Float fallback: the result of an op left in float is quantized again here, at the scale its observer
    calibrates (docs/numerics.md "Float fallback")."""


class EnterFloat(nn.Module):
    """Float fallback: an integer tensor is dequantized here for an op left in float (identity while
    fake-quantized)."""

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value


FLOAT_REASON_KEY = "edgeq_float_reason"
"""``node.meta`` key of an op left in float (prepared and integer graphs): why it is not in integers."""

CONSTANT_KEY = "edgeq_constant"
"""``node.meta`` key of a constant tensor (prepared and integer graphs: a parameter, or what is computed from
parameters alone) that the integer region reads through a :class:`LeaveFloat`; export writes its quantized value."""


class DequantizeOutput(nn.Module):
    """A DeQuantStub: the integer region ends here (identity while fake-quantized)."""


    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value


class _WeightedLayer(Requantizing, FakeQuantStateful, ABC):
    """Shared parts of conv and linear: weight fake quantization, the BatchNorm folded in, the output quantizer.

    ``output_quantizer`` is ``None`` for an int32 output (``output_dtype == "int32"``): the accumulator leaves
    the layer unrounded, at scale ``s_in * s_w[c]``.

    With BatchNorm (over the output channels: a conv's axis 1, a 2-D linear output's features), training follows
    torch.ao's approach: the weight is scaled by ``gamma / running_std`` before fake quantization (so it is
    quantized as it will be folded), scaled back (torch.ao scales the layer's output back; the same per channel),
    and the real BatchNorm runs on the layer's output, keeping batch statistics and running estimates correct. In
    eval mode this equals the folded layer.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        bn: nn.modules.batchnorm._BatchNorm | None,
        activation: Activation,
        scale_rule: ScaleRule,
        output_quantizer: ActivationFakeQuantize | None,
    ) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.bn = bn
        self.activation = activation
        self.scale_rule = scale_rule
        self.output_quantizer = output_quantizer
        self.output_dtype = "int32" if output_quantizer is None else "int8"

    @abstractmethod
    def _layer(self, value: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The conv or linear product of ``value`` with ``weight`` (and ``bias``)."""

    def _per_output_channel(self, values: torch.Tensor, rank: int) -> torch.Tensor:
        """``values`` (one per output channel) shaped to broadcast along axis 0 of a tensor of ``rank`` axes."""
        return values.reshape(-1, *([1] * (rank - 1)))

    def bn_scale_factor(self) -> torch.Tensor:
        """``gamma / sqrt(running_var + eps)`` per output channel."""
        assert self.bn is not None
        gamma = self.bn.weight if self.bn.weight is not None else torch.ones_like(self.bn.running_var)
        return gamma / torch.sqrt(self.bn.running_var + self.bn.eps)

    def folded_weight(self) -> torch.Tensor:
        """The weight with BatchNorm's scale folded in (the weight itself without BatchNorm)."""
        if self.bn is None:
            return self.weight
        return self.weight * self._per_output_channel(self.bn_scale_factor(), self.weight.dim())

    def folded_bias(self) -> torch.Tensor:
        """The bias with BatchNorm folded in, from running statistics (zeros when there is neither)."""
        bias = self.bias if self.bias is not None else self.weight.new_zeros(self.weight.shape[0])
        if self.bn is None:
            return bias
        beta = self.bn.bias if self.bn.bias is not None else torch.zeros_like(bias)
        return (bias - self.bn.running_mean) * self.bn_scale_factor() + beta

    def _fake_quantized(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_state.fake_quantizes:
            return weight
        return fake_quantize_weight(weight, self.scale_rule)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        if self.bn is None:
            return self._finish(self._layer(value, self._fake_quantized(self.weight), self.bias))
        factor = self.bn_scale_factor()
        # A zero gamma folds its channel to zero; divide by 1 there (BatchNorm then outputs beta, as it should).
        # The layer is linear per output channel, so the fake-quantized folded weight is scaled back before the
        # layer rather than its output after it: the same function (up to float32 rounding) and gradients, at the
        # cost of one weight-sized product instead of three activation-sized passes (forward and backward).
        safe_factor = torch.where(factor == 0, torch.ones_like(factor), factor)
        weight = self._fake_quantized(self.folded_weight()) / self._per_output_channel(safe_factor, self.weight.dim())
        out = self._layer(value, weight, None)
        if self.bias is not None:
            out = out + self._per_output_channel(self.bias, out.dim() - 1)
        return self._finish(self.bn(out))

    def _finish(self, value: torch.Tensor) -> torch.Tensor:
        return self._quantize_output(value, self.activation)


@CANONICAL.register(Op.CONV2D)
class ConvAct2d(_WeightedLayer):
    """Conv2d with an optional BatchNorm2d folded in and an optional ReLU/ReLU6, then int8 requantization."""

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d | None,
        activation: Activation,
        scale_rule: ScaleRule,
        output_quantizer: ActivationFakeQuantize | None,
    ) -> None:
        super().__init__(conv.weight, conv.bias, bn, activation, scale_rule, output_quantizer)
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def _layer(self, value: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(value, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[1] * self.groups}, {self.out_channels}, kernel_size={tuple(self.weight.shape[2:])}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"activation={self.activation.value}, output={self.output_dtype}"
        )


@CANONICAL.register(Op.LINEAR)
class LinearAct(_WeightedLayer):
    """Linear with an optional BatchNorm1d folded in (on a 2-D output: over its features) and an optional
    ReLU/ReLU6, then int8 requantization (or an int32 output)."""

    def __init__(
        self,
        linear: nn.Linear,
        bn: nn.BatchNorm1d | None,
        activation: Activation,
        scale_rule: ScaleRule,
        output_quantizer: ActivationFakeQuantize | None,
    ) -> None:
        super().__init__(linear.weight, linear.bias, bn, activation, scale_rule, output_quantizer)

    def _layer(self, value: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(value, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, "
            f"activation={self.activation.value}, output={self.output_dtype}"
        )


@CANONICAL.register(Op.ADD)
class AddAct(Requantizing):
    """Elementwise add of two int8 tensors, with an optional ReLU/ReLU6, requantized to its own scale."""

    def __init__(self, activation: Activation, output_quantizer: ActivationFakeQuantize) -> None:
        super().__init__()
        self.activation = activation
        self.output_quantizer = output_quantizer

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return self._quantize_output(left + right, self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation.value}"


@CANONICAL.register(Op.MUL)
class Multiply(Requantizing):
    """Elementwise product of two int8 tensors (broadcasting, as ``x * scale`` in squeeze-and-excitation),
    requantized to its own scale."""

    def __init__(self, output_quantizer: ActivationFakeQuantize) -> None:
        super().__init__()
        self.output_quantizer = output_quantizer

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return self._quantize_output(left * right)


@CANONICAL.register(Op.MATMUL)
class MatMul(Requantizing):
    """Matrix product of two int8 activations (``torch.matmul``: the last two axes, leading axes broadcast, as
    ``q @ k.transpose(-2, -1)`` in attention), requantized to its own scale.

    ``reduction_size`` (the products per output, the left operand's last axis) is recorded from the example inputs:
    the integer op's accumulator bound is proved for it.
    """

    def __init__(self, reduction_size: int, output_quantizer: ActivationFakeQuantize) -> None:
        super().__init__()
        self.reduction_size = reduction_size
        self.output_quantizer = output_quantizer

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return self._quantize_output(torch.matmul(left, right))

    def extra_repr(self) -> str:
        return f"reduction_size={self.reduction_size}"


@CANONICAL.register(Op.CONCAT)
class Concat(Requantizing):
    """Concatenation along ``dim``; each input is brought to the output's scale."""

    def __init__(self, dim: int, output_quantizer: ActivationFakeQuantize) -> None:
        super().__init__()
        self.dim = dim
        self.output_quantizer = output_quantizer

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self._quantize_output(torch.cat(tensors, self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


@CANONICAL.register(Op.AVG_POOL2D)
class AvgPool2d(Requantizing):
    """Average pooling with a constant divisor (kernel area): integer sum, then requantization folding 1/N."""

    def __init__(
        self,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        output_quantizer: ActivationFakeQuantize,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.output_quantizer = output_quantizer

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(value, self.kernel_size, self.stride, self.padding, count_include_pad=True)
        return self._quantize_output(pooled)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


@CANONICAL.register(Op.GLOBAL_AVG_POOL2D)
class GlobalAvgPool2d(Requantizing):
    """Mean over height and width; output ``[N, C, 1, 1]`` (``keepdim``) or ``[N, C]``.

    ``input_size`` (H, W) is recorded from the example inputs: the integer op folds 1/(H*W) into its multiplier.
    """

    def __init__(self, keepdim: bool, input_size: tuple[int, int], output_quantizer: ActivationFakeQuantize) -> None:
        super().__init__()
        self.keepdim = keepdim
        self.input_size = input_size
        self.output_quantizer = output_quantizer

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return self._quantize_output(value.mean(dim=(2, 3), keepdim=self.keepdim))

    def extra_repr(self) -> str:
        return f"keepdim={self.keepdim}, input_size={self.input_size}"


@CANONICAL.register(Op.RELU)
class Clamp(nn.Module):
    """A ReLU or ReLU6 that could not be fused into its producer, or a Hardtanh (``nn.Hardtanh``, ``F.hardtanh``,
    ``torch.clamp`` of constant bounds): an integer clamp at the input's scale to ``bounds`` (real numbers, ``inf``
    for none; ``numerics.clamp_levels``). ``name`` is what the user wrote (``relu``, ``relu6``, ``hardtanh``)."""

    def __init__(self, name: str, bounds: tuple[float, float]) -> None:
        super().__init__()
        self.name = name
        self.bounds = (float(bounds[0]), float(bounds[1]))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(value, *self.bounds)  # F.relu's and F.relu6's values and gradients at their bounds

    def extra_repr(self) -> str:
        return f"{self.name}, bounds={self.bounds}"


@CANONICAL.register(Op.MAX_POOL2D)
class MaxPool2d(nn.MaxPool2d):
    """Max pooling (keeps its input's scale)."""



@CANONICAL.register(Op.UPSAMPLE_NEAREST2D)
class UpsampleNearest2d(nn.Module):
    """Nearest-neighbour upsampling by an integer factor per axis (keeps its input's scale)."""


    def __init__(self, scale_factor: tuple[int, int]) -> None:
        super().__init__()
        self.scale_factor = scale_factor

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return upsample_nearest(value, self.scale_factor)

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}"


def upsample_nearest(value: torch.Tensor, scale_factor: tuple[int, int]) -> torch.Tensor:
    """Output pixel (i, j) copies input pixel (i // fh, j // fw): exact for any dtype, unlike float index maths."""
    return value.repeat_interleave(scale_factor[0], dim=-2).repeat_interleave(scale_factor[1], dim=-1)


@CANONICAL.register(Op.UPSAMPLE_BILINEAR2D)
class UpsampleBilinear2d(Requantizing):
    """Bilinear resize to ``size`` (H, W), as ``F.interpolate(mode='bilinear')`` with ``align_corners``, requantized
    to its own scale."""

    def __init__(self, size: tuple[int, int], align_corners: bool, output_quantizer: ActivationFakeQuantize) -> None:
        super().__init__()
        self.size = size
        self.align_corners = align_corners
        self.output_quantizer = output_quantizer

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        resized = F.interpolate(value, size=self.size, mode="bilinear", align_corners=self.align_corners)
        return self._quantize_output(resized)

    def extra_repr(self) -> str:
        return f"size={self.size}, align_corners={self.align_corners}"


TorchFunction = Callable[[torch.Tensor, float], torch.Tensor]

TORCH_FUNCTIONS: OpTable[TorchFunction] = OpTable("torch function in quantization/qat_modules.py", lambda info: info.lookup_table)
"""The float function of each lookup-table activation, ``(value, alpha) -> result`` (``alpha``: the op's
constant, ``OpInfo.alpha``), that its canonical op runs before quantizing its output."""


@TORCH_FUNCTIONS.register(Op.SIGMOID)
def _sigmoid(value: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.sigmoid(value)


@TORCH_FUNCTIONS.register(Op.TANH)
def _tanh(value: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.tanh(value)


@TORCH_FUNCTIONS.register(Op.HARDSIGMOID)
def _hardsigmoid(value: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.hardsigmoid(value)


@TORCH_FUNCTIONS.register(Op.HARDSWISH)
def _hardswish(value: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.hardswish(value)


@TORCH_FUNCTIONS.register(Op.SILU)
def _silu(value: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.silu(value)


@TORCH_FUNCTIONS.register(Op.LEAKYRELU)
def _leaky_relu(value: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.leaky_relu(value, alpha)


@TORCH_FUNCTIONS.register(Op.GELU)
def _gelu(value: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.gelu(value)


@TORCH_FUNCTIONS.register(Op.GELU_TANH)
def _gelu_tanh(value: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.gelu(value, approximate="tanh")


@TORCH_FUNCTIONS.register(Op.ELU)
def _elu(value: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.elu(value, alpha)


@CANONICAL.register(*LOOKUP_TABLE_OPS)
class LookupTableActivation(Requantizing):
    """An elementwise activation that the integer model computes as an int8 lookup table (``op`` says which)."""

    def __init__(self, op: Op, alpha: float, output_quantizer: ActivationFakeQuantize) -> None:
        super().__init__()
        self.op = op
        self.alpha = float(alpha)
        self.output_quantizer = output_quantizer

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return self._quantize_output(TORCH_FUNCTIONS[self.op](value, self.alpha))

    def extra_repr(self) -> str:
        return f"{self.op.value}" + (f", alpha={self.alpha}" if self.op.info.alpha else "")
