"""edgeq's observers and scale rules in torchao's PT2E flow: the observer classes an :class:`EdgeqQuantizer`'s
quantization specs construct.

PT2E observers only watch tensors; the scale of each is edgeq's: an activation's from its edgeq observer's
clipping range (:func:`~edgeq.numerics.scale_from_amax` with the target's scale rule, zero point 0, int8
[-128, 127]), a weight's per output channel from its absolute maximum (int8 [-127, 127]) (docs/numerics.md).
torchao's ``convert_pt2e`` writes these scales into its quantize / dequantize ops.

For ``prepare_qat_pt2e`` the specs construct fake quantizers instead: edgeq's own
(:class:`~edgeq.quantization.fake_quantize.ActivationFakeQuantize`, whose state ``set_fake_quantize`` sets as in
edgeq's flow, and the per-channel weight fake quantization of edgeq's QAT layers).

Imports torchao: load it through :mod:`edgeq.quantization.pt2e`, which says how to install it.
"""

from __future__ import annotations

from typing import Any

import torch
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
from torchao.quantization.pt2e.observer import ObserverBase

from edgeq.numerics import ACTIVATION_QMAX, scale_from_amax
from edgeq.quantization.fake_quantize import ActivationFakeQuantize, fake_quantize_weight, weight_scales
from edgeq.quantization.observers import ObserverFactory
from edgeq.targets import Rounding, ScaleRule


class EdgeqActivationObserver(ObserverBase):
    """An edgeq :class:`~edgeq.quantization.observers.Observer` (from a qconfig's ``activation_observer``) as a
    PT2E observer: per-tensor symmetric int8 at edgeq's scale.

    Args:
        observer_factory: the qconfig's activation observer factory.
        scale_rule: the target's scale rule.
        dtype, qscheme, quant_min, quant_max, is_dynamic: what torchao passes from the quantization spec.
    """

    def __init__(
        self,
        observer_factory: ObserverFactory,
        scale_rule: ScaleRule,
        dtype: torch.dtype = torch.int8,
        qscheme: torch.qscheme = torch.per_tensor_symmetric,
        quant_min: int | None = None,
        quant_max: int | None = None,
        is_dynamic: bool = False,
        **_: Any,
    ) -> None:
        super().__init__(dtype=dtype, is_dynamic=is_dynamic)
        self.observer = observer_factory()
        self.scale_rule = scale_rule
        self.qscheme = qscheme
        self.quant_min = quant_min
        self.quant_max = quant_max

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        self.observer.observe(value)
        return value

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """edgeq's float32 scale of the range observed (as ``ActivationFakeQuantize.scale``) and zero point 0."""
        if not self.observer.has_data:
            raise RuntimeError("an EdgeqQuantizer observer has seen no data: calibrate (run batches) before convert_pt2e")
        scale = scale_from_amax(self.observer.clipping_amax(), ACTIVATION_QMAX, self.scale_rule)
        return scale.reshape(1), torch.zeros(1, dtype=torch.int32)


class EdgeqPerChannelWeightObserver(ObserverBase):
    """A weight's per-output-channel symmetric int8 scales, from its absolute maximum under the target's scale
    rule (:func:`~edgeq.quantization.fake_quantize.weight_scales`, as edgeq's flow quantizes weights)."""

    def __init__(
        self,
        scale_rule: ScaleRule,
        dtype: torch.dtype = torch.int8,
        qscheme: torch.qscheme = torch.per_channel_symmetric,
        quant_min: int | None = None,
        quant_max: int | None = None,
        ch_axis: int = 0,
        is_dynamic: bool = False,
        **_: Any,
    ) -> None:
        super().__init__(dtype=dtype, is_dynamic=is_dynamic)
        self.scale_rule = scale_rule
        self.qscheme = qscheme
        self.quant_min = quant_min
        self.quant_max = quant_max
        self.ch_axis = ch_axis
        self.register_buffer("scales", torch.zeros(0))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self.scales = weight_scales(weight, self.scale_rule)
        return weight

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scales, torch.zeros(self.scales.shape, dtype=torch.int32)


class SharedScaleObserver(ObserverBase):
    """A tensor quantized at another tensor's scale without being observed itself (a max pool's output at its
    input's scale), as edgeq's own flow shares one quantizer: the leader's range comes from the leader's tensor
    alone."""

    def __init__(self, leader: ObserverBase) -> None:
        super().__init__(dtype=leader.dtype, is_dynamic=leader.is_dynamic)
        self._leader = (leader,)  # a tuple: not a submodule, so its state is saved once, where it is inserted
        self.qscheme = leader.qscheme
        self.quant_min = leader.quant_min
        self.quant_max = leader.quant_max

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._leader[0].calculate_qparams()


class EdgeqActivationFakeQuantize(FakeQuantizeBase):
    """edgeq's :class:`~edgeq.quantization.fake_quantize.ActivationFakeQuantize` as a PT2E fake quantizer (QAT): it
    observes and fake-quantizes by the target's scale rule and rounding, in the state ``set_fake_quantize`` gives
    it (``QAT`` at first).

    Args:
        observer_factory, scale_rule: as for :class:`EdgeqActivationObserver` (``None``: the scale is fixed).
        rounding: the target's rounding of ties.
        fixed_scale: a model input's fixed scale (``QuantStub(scale=...)``), instead of an observer.
        dtype, qscheme, quant_min, quant_max, is_dynamic: what torchao passes from the quantization spec.
    """

    def __init__(
        self,
        observer_factory: ObserverFactory | None,
        scale_rule: ScaleRule,
        rounding: Rounding,
        fixed_scale: float | None = None,
        dtype: torch.dtype = torch.int8,
        qscheme: torch.qscheme = torch.per_tensor_symmetric,
        quant_min: int | None = None,
        quant_max: int | None = None,
        is_dynamic: bool = False,
        **_: Any,
    ) -> None:
        super().__init__()
        observer = None if observer_factory is None else observer_factory()
        self.quantizer = ActivationFakeQuantize(observer, scale_rule, fixed_scale, rounding=rounding)
        self.dtype, self.qscheme, self.quant_min, self.quant_max, self.is_dynamic = dtype, qscheme, quant_min, quant_max, is_dynamic

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return self.quantizer(value)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """edgeq's float32 scale of the range observed so far, and zero point 0."""
        return torch.tensor([self.quantizer.scale()], dtype=torch.float32), torch.zeros(1, dtype=torch.int32)


class EdgeqPerChannelWeightFakeQuantize(FakeQuantizeBase):
    """A weight fake-quantized per output channel at edgeq's scales, as edgeq's QAT layers do (straight-through
    gradients). Its qparams are computed from the weight as it is when asked (after the last optimizer step), not
    as it was at the last forward."""

    def __init__(
        self,
        scale_rule: ScaleRule,
        dtype: torch.dtype = torch.int8,
        qscheme: torch.qscheme = torch.per_channel_symmetric,
        quant_min: int | None = None,
        quant_max: int | None = None,
        ch_axis: int = 0,
        is_dynamic: bool = False,
        **_: Any,
    ) -> None:
        super().__init__()
        self.scale_rule = scale_rule
        self.dtype, self.qscheme, self.quant_min, self.quant_max, self.is_dynamic = dtype, qscheme, quant_min, quant_max, is_dynamic
        self.ch_axis = ch_axis
        self._weight: tuple[torch.Tensor, ...] = ()  # the parameter itself (a tuple: not saved, not a copy)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self._weight = (weight,)
        return fake_quantize_weight(weight, self.scale_rule)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._weight:
            raise RuntimeError("an EdgeqQuantizer weight fake quantizer has seen no weight: run the model before convert_pt2e")
        scales = weight_scales(self._weight[0], self.scale_rule)
        return scales, torch.zeros(scales.shape, dtype=torch.int32)
