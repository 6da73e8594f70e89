"""Capture: torch.fx by default, torch.export for what torch.fx cannot trace, with the same user API and results."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from models import ConvBnSiLU, SmallCNN, with_batchnorm_statistics
from torch import nn

from edgeq.check import check_model
from edgeq.errors import TraceError, UnsupportedOpError
from edgeq.quantization import (
    DeQuantStub,
    FakeQuantState,
    QuantStub,
    convert_fx,
    default_calib_int32_output_qconfig,
    default_calib_qconfig,
    default_qat_int32_output_qconfig,
    default_qat_qconfig,
    prepare_qat_fx,
    set_fake_quantize,
)
from edgeq.quantization.capture import CAPTURE_ATTRIBUTE, Capture

SHAPE = (3, 8, 8)


class Halves(nn.Module):
    """A conv's output split in two halves, one of them convolved again, all concatenated (C2f's shape).
    ``as_list``: ``list(x.chunk(2, 1))`` as Ultralytics writes it (torch.fx cannot trace it); otherwise
    ``a, b = x.chunk(2, 1)`` (it can)."""

    def __init__(self, as_list: bool) -> None:
        super().__init__()
        self.as_list = as_list
        self.quant = QuantStub(scale=1 / 128)
        self.cv1 = ConvBnSiLU(3, 8, 3)
        self.m = ConvBnSiLU(4, 4, 3)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(12, 5, 1)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(self.quant(x))
        if self.as_list:
            y = list(x.chunk(2, 1))
        else:
            a, b = x.chunk(2, 1)
            y = [a, b]
        y.append(self.m(y[-1]) + y[-1])
        return self.dequant(self.head(self.pool(torch.cat(y, 1))))


def twins() -> tuple[nn.Module, nn.Module]:
    """The same weights written both ways: (torch.fx cannot trace it, torch.fx can)."""
    torch.manual_seed(0)
    listed = with_batchnorm_statistics(Halves(as_list=True), (4, *SHAPE))
    unpacked = copy.deepcopy(listed)
    unpacked.as_list = False
    return listed, unpacked


def qconfig(base, int32_head):
    return {"": base, "module_name": {"head": int32_head}}


def calibrate_then_train(model: nn.Module, target: str = "npu-s") -> tuple[torch.fx.GraphModule, object]:
    """The seed's flow: calibrate, load the calibration state dict into the QAT model, one training step,
    validate, convert. The head has an int32 output."""
    torch.manual_seed(1)
    example = torch.randn(1, *SHAPE)
    calib = prepare_qat_fx(model, qconfig(default_calib_qconfig, default_calib_int32_output_qconfig),
                           example_inputs=(example,), target=target).eval()
    set_fake_quantize(calib, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for _ in range(2):
            calib(torch.randn(4, *SHAPE))
    qat = prepare_qat_fx(model, qconfig(default_qat_qconfig, default_qat_int32_output_qconfig),
                         example_inputs=(example,), target=target)
    qat.load_state_dict(calib.state_dict())
    qat.train()
    set_fake_quantize(qat, FakeQuantState.QAT)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    qat(torch.randn(4, *SHAPE)).square().mean().backward()
    optimizer.step()
    qat.eval()
    set_fake_quantize(qat, FakeQuantState.VALIDATION)
    return qat, convert_fx(qat)


def test_what_fx_cannot_trace_is_captured_with_torch_export_and_quantizes_alike(caplog):
    listed, unpacked = twins()
    with caplog.at_level(logging.INFO, logger="edgeq"):
        exported_qat, exported_int = calibrate_then_train(listed)
    fx_qat, fx_int = calibrate_then_train(unpacked)
    assert getattr(exported_qat, CAPTURE_ATTRIBUTE) is Capture.EXPORT
    assert getattr(fx_qat, CAPTURE_ATTRIBUTE) is Capture.FX
    assert "torch.fx could not trace Halves: TraceError: Proxy object cannot be iterated" in caplog.text
    assert "prepared Halves for npu-s (graph captured with torch.export)" in caplog.text
    modules = [(n.target, type(exported_qat.get_submodule(n.target))) for n in exported_qat.graph.nodes if n.op == "call_module"]
    assert modules == [(n.target, type(fx_qat.get_submodule(n.target))) for n in fx_qat.graph.nodes if n.op == "call_module"]
    assert exported_qat.get_submodule("quant").output_quantizer.fixed_scale == 1 / 128
    x = torch.randn(4, *SHAPE)
    got, expected = exported_int.run_integer(x), fx_int.run_integer(x)
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), expected.numpy())


class ShapeBranch(nn.Module):
    """Python control flow on a shape: torch.fx sees a Proxy in the condition; torch.export, static shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.conv, self.pool, self.dequant = QuantStub(), nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.quant(x))
        if x.shape[-1] > 4:
            x = self.pool(x)
        return self.dequant(x[:, :2])


def test_shape_dependent_control_flow_is_captured_for_the_example_shape():
    prepared = prepare_qat_fx(ShapeBranch(), example_inputs=(torch.randn(1, *SHAPE),), target="npu-m")
    assert getattr(prepared, CAPTURE_ATTRIBUTE) is Capture.EXPORT
    assert [n.target for n in prepared.graph.nodes if n.op == "call_module"] == ["quant", "conv", "pool", "dequant"]
    # The slice x[:, :2] (aten.slice) reads as the getitem torch.fx would have recorded.
    assert prepared(torch.randn(2, *SHAPE)).shape == (2, 2, 3, 3)


def test_fx_traceable_models_keep_torch_fx():
    prepared = prepare_qat_fx(SmallCNN(), example_inputs=(torch.rand(1, 1, 8, 8),), target="npu-m")
    assert getattr(prepared, CAPTURE_ATTRIBUTE) is Capture.FX
    report = check_model(SmallCNN(), (torch.rand(1, 1, 8, 8),), target="npu-m")
    assert not any("captured with" in note for note in report.notes)


def test_check_says_which_capture_a_model_got():
    report = check_model(twins()[0], (torch.randn(1, *SHAPE),), target="npu-m")
    assert "graph captured with torch.export: torch.fx could not trace the model" in str(report)


def test_neither_capture_is_a_trace_error_with_both_reasons():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()

        def forward(self, x):
            x = self.quant(x)
            return self.dequant(x if x.sum() > 0 else -x)

    with pytest.raises(TraceError, match=r"torch.fx could not trace DataDependent: .*; torch.export could not capture "
                                         r"it either: .*data-dependent.*move data-dependent control flow"):
        prepare_qat_fx(DataDependent(), example_inputs=(torch.randn(1, *SHAPE),), target="npu-m")


def test_module_call_with_two_inputs_cannot_be_rebuilt():
    class Pairs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.bilinear, self.dequant = QuantStub(), nn.Bilinear(4, 4, 2), DeQuantStub()

        def forward(self, x):
            y = list(self.quant(x).chunk(2, -1))
            return self.dequant(self.bilinear(*y))

    with pytest.raises(TraceError, match=r"torch.export captured it, but Bilinear 'bilinear': torch.export's graph "
                                         r"shows this call reading 2 tensors and giving 1; .*give the module one input"):
        prepare_qat_fx(Pairs(), example_inputs=(torch.randn(1, 8),), target="npu-m")


def test_aten_op_without_a_spelling_is_named_like_any_unsupported_op():
    class Cumulative(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()

        def forward(self, x):
            y = list(self.quant(x).chunk(2, 1))
            return self.dequant(torch.cumsum(y[0], 1))

    with pytest.raises(UnsupportedOpError, match=r"aten.cumsum.default 'cumsum': edgeq has no integer implementation"):
        prepare_qat_fx(Cumulative(), example_inputs=(torch.randn(1, 4, 2, 2),), target="npu-m", strict=True)
