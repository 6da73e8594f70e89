"""QuantStub and DeQuantStub: the user's marks for where the integer region of a model begins and ends."""

from __future__ import annotations

import math

import torch
from torch import nn

from edgeq.errors import QuantizationError


class QuantStub(nn.Module):
    """Marks a model input that enters the integer region; identity while the model is float.

    Args:
        scale: a fixed input scale, kept exactly through calibration, QAT, convert and export. With
            ``scale=1/128`` and inputs normalised as ``(pixel - 128) / 128``, raw uint8 pixels enter the NPU
            as ``pixel - 128`` with no arithmetic. ``None``: the scale is calibrated like any activation.
    """

    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise QuantizationError(f"QuantStub: scale must be a positive finite number or None; got {scale!r}")
        self.scale = None if scale is None else float(scale)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def extra_repr(self) -> str:
        return "" if self.scale is None else f"scale={self.scale:.6g}"


class DeQuantStub(nn.Module):
    """Marks a model output that leaves the integer region (dequantized to float); identity while float."""

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value


def _is_torch_ao_stub(module: nn.Module, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__.startswith("torch.ao.quantization")


def is_quant_stub(module: nn.Module | None) -> bool:
    """edgeq's QuantStub, or torch.ao's (as the seed flow imports it), which counts as one without fixed scale."""
    return isinstance(module, QuantStub) or (module is not None and _is_torch_ao_stub(module, "QuantStub"))


def is_dequant_stub(module: nn.Module | None) -> bool:
    """edgeq's DeQuantStub, or torch.ao's."""
    return isinstance(module, DeQuantStub) or (module is not None and _is_torch_ao_stub(module, "DeQuantStub"))


def fixed_scale_of(stub: nn.Module) -> float | None:
    """The fixed scale of a QuantStub (``None`` when calibrated, always for torch.ao's)."""
    return stub.scale if isinstance(stub, QuantStub) else None
