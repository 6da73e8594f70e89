"""Quantization: prepare a float model for calibration and QAT, then convert it to the integer model.

The workflow of seed 002 (float -> calib -> qat -> int_infer), with edgeq's own fake-quant and integer ops::

    qat_model = prepare_qat_fx(float_model, default_calib_qconfig, example_inputs=(x,), target="npu-m")
    set_fake_quantize(qat_model, FakeQuantState.CALIBRATION)   # observe a few batches
    set_fake_quantize(qat_model, FakeQuantState.QAT)           # train
    set_fake_quantize(qat_model, FakeQuantState.VALIDATION)    # evaluate
    int_model = convert_fx(qat_model)                          # exact integer arithmetic of the NPU

``calibrate(float_model, batches, example_inputs=(x,), target="npu-m")`` does the calibration part in one call.
"""

from edgeq.quantization.calibrate import calibrate
from edgeq.quantization.convert import convert_fx
from edgeq.quantization.integer_model import IntegerModel
from edgeq.quantization.observers import EMAMinMaxObserver, HistogramObserver, MinMaxObserver, Observer
from edgeq.quantization.prepare import prepare_qat_fx
from edgeq.quantization.qconfig import (
    QConfig,
    default_calib_int32_output_qconfig,
    default_calib_qconfig,
    default_qat_int32_output_qconfig,
    default_qat_qconfig,
)
from edgeq.quantization.state import FakeQuantState, set_fake_quantize
from edgeq.quantization.stubs import DeQuantStub, QuantStub

_PT2E_NAMES = ("EdgeqQuantizer", "from_pt2e")
"""Names of :mod:`edgeq.quantization.pt2e`, loaded on first use: they need torchao, an optional extra."""


def __getattr__(name: str) -> object:
    if name not in _PT2E_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from edgeq.quantization import pt2e
    except ModuleNotFoundError as error:
        if error.name is None or not error.name.startswith("torchao"):
            raise
        raise ImportError(f"edgeq.quantization.{name} needs torchao (PT2E quantization): pip install edgeq[pt2e]") from error
    return getattr(pt2e, name)


__all__ = [
    "DeQuantStub",
    "EMAMinMaxObserver",
    "EdgeqQuantizer",
    "FakeQuantState",
    "HistogramObserver",
    "IntegerModel",
    "MinMaxObserver",
    "Observer",
    "QConfig",
    "QuantStub",
    "calibrate",
    "convert_fx",
    "default_calib_int32_output_qconfig",
    "default_calib_qconfig",
    "default_qat_int32_output_qconfig",
    "default_qat_qconfig",
    "from_pt2e",
    "prepare_qat_fx",
    "set_fake_quantize",
]
