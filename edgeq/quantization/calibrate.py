"""Calibration in one call: prepare, observe batches, freeze the ranges."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn

from edgeq.errors import QuantizationError
from edgeq.quantization.prepare import prepare_qat_fx
from edgeq.quantization.qconfig import QConfigSpec, default_calib_qconfig
from edgeq.quantization.state import FakeQuantState, set_fake_quantize
from edgeq.targets import TargetLike


def calibrate(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Sequence[torch.Tensor]],
    *,
    example_inputs: Sequence[torch.Tensor],
    target: TargetLike,
    qconfig: QConfigSpec = default_calib_qconfig,
) -> fx.GraphModule:
    """Prepare ``model`` with ``qconfig``, run it in eval mode on every batch with the observers recording
    (``CALIBRATION``), then freeze the ranges (``VALIDATION``).

    Args:
        model: float model whose integer region is marked by QuantStub / DeQuantStub.
        batches: the model's input, or a tuple of its inputs, per batch (a few batches of real data).
        example_inputs, target, qconfig: as for :func:`~edgeq.quantization.prepare_qat_fx`.

    Returns:
        The calibrated model: it predicts the integer model, :func:`~edgeq.quantization.convert_fx` turns it into
        the integer model, and its state dict loads into a QAT model prepared from the same float model.

    Raises:
        QuantizationError: ``batches`` is empty; and what :func:`~edgeq.quantization.prepare_qat_fx` raises.

    Example:
        >>> from edgeq.quantization import DeQuantStub, QuantStub, convert_fx
        >>> net = nn.Sequential(QuantStub(), nn.Conv2d(1, 4, 3), DeQuantStub())
        >>> x = torch.randn(1, 1, 8, 8)
        >>> calibrated = calibrate(net, [torch.randn(2, 1, 8, 8)], example_inputs=(x,), target="npu-m")
        >>> convert_fx(calibrated).run_integer(x).dtype
        torch.int8
    """
    prepared = prepare_qat_fx(model, qconfig, example_inputs=example_inputs, target=target).eval()
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    count = 0
    with torch.no_grad():
        for batch in batches:
            prepared(*batch) if isinstance(batch, (tuple, list)) else prepared(batch)
            count += 1
    if not count:
        raise QuantizationError("calibrate: no batches given; pass a few batches of the model's input data")
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    return prepared
