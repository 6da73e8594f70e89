"""Fake-quantization states of a prepared model and the switch between them."""

from __future__ import annotations

from enum import Enum

from torch import nn

from edgeq.errors import QuantizationError
from edgeq.quantization.distributed import synchronize_ranks


class FakeQuantState(str, Enum):
    """What the fake-quant parts of a prepared model do.

    The state is independent of ``model.train()`` / ``model.eval()``, which still decide what BatchNorm and
    Dropout do; the seed flow sets both.
    """

    CALIBRATION = "calibration"
    """Observers record activation ranges; nothing is fake-quantized (the model computes in float)."""
    QAT = "qat"
    """Observers keep recording and activations and weights are fake-quantized with straight-through gradients."""
    VALIDATION = "validation"
    """Ranges are frozen; activations and weights are fake-quantized: the model predicts the integer model."""

    @property
    def observes(self) -> bool:
        """Whether observers update their ranges in this state."""
        return self is not FakeQuantState.VALIDATION

    @property
    def fake_quantizes(self) -> bool:
        """Whether values are rounded to the integer grid in this state."""
        return self is not FakeQuantState.CALIBRATION


class FakeQuantStateful(nn.Module):
    """Mixin for modules whose behaviour depends on the :class:`FakeQuantState`."""

    fake_quant_state: FakeQuantState = FakeQuantState.QAT

    def set_fake_quant_state(self, state: FakeQuantState) -> None:
        """Switch this module alone; use :func:`set_fake_quantize` for a whole model."""
        self.fake_quant_state = state


def set_fake_quantize(model: nn.Module, state: FakeQuantState) -> None:
    """Switch every fake-quant part of a prepared model to ``state``.

    Leaving ``CALIBRATION`` under torch.distributed combines every rank's observers (a collective: every rank
    calls it; see :func:`~edgeq.quantization.distributed.synchronize_ranks`).

    Raises:
        QuantizationError: the model has no fake-quant parts (it was not prepared with ``prepare_qat_fx``).

    Example:
        >>> from torch import nn
        >>> set_fake_quantize(nn.Linear(2, 2), FakeQuantState.VALIDATION)
        Traceback (most recent call last):
        ...
        edgeq.errors.QuantizationError: set_fake_quantize: Linear has no fake-quant parts; prepare it with prepare_qat_fx first
    """  # noqa: W505 (a doctest's expected output is one line)
    state = FakeQuantState(state)
    stateful = [module for module in model.modules() if isinstance(module, FakeQuantStateful)]
    if not stateful:
        raise QuantizationError(
            f"set_fake_quantize: {type(model).__name__} has no fake-quant parts; prepare it with prepare_qat_fx first"
        )
    leaving_calibration = state is not FakeQuantState.CALIBRATION and any(
        module.fake_quant_state is FakeQuantState.CALIBRATION for module in stateful
    )
    for module in stateful:
        module.set_fake_quant_state(state)
    if leaving_calibration:
        synchronize_ranks(model)
