"""Capture: torch.fx by default, torch.export for what torch.fx cannot trace, with the same user API and results."""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from models import ConvBnSiLU, SmallCNN, Wrapped, with_batchnorm_statistics
from reference import run_reference
from torch import nn

from edgeq.check import check_model
from edgeq.compile import compile_model
from edgeq.errors import QuantizationError, TraceError, UnsupportedOpError
from edgeq.export import to_onnx, trace
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
from edgeq.quantization.prepare import FloatFallbackWarning
from edgeq.quantization.qat_modules import LookupTableActivation
from edgeq_runtime import Model

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


def sharing_one_activation(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ConvBnSiLU blocks all use one nn.SiLU instance, as ultralytics' ``Conv`` shares
    its class attribute ``default_act``."""
    model = copy.deepcopy(model)
    shared = nn.SiLU()
    for block in model.modules():
        if isinstance(block, ConvBnSiLU):
            block.act = shared
    return model


@pytest.mark.parametrize("captured_by", [Capture.EXPORT, Capture.FX])
def test_a_shared_activation_is_an_op_of_its_own_at_each_place(captured_by):
    model = twins()[0 if captured_by is Capture.EXPORT else 1]
    shared_qat, shared_int = calibrate_then_train(sharing_one_activation(model))
    own_qat, own_int = calibrate_then_train(model)
    assert getattr(shared_qat, CAPTURE_ATTRIBUTE) is captured_by
    modules = dict(shared_qat.named_modules())
    tables = [n.target for n in shared_qat.graph.nodes if isinstance(modules.get(n.target), LookupTableActivation)]
    assert tables == ["cv1.act", "m.act"]
    assert shared_qat.state_dict().keys() == own_qat.state_dict().keys()
    x = torch.randn(4, *SHAPE)
    np.testing.assert_array_equal(shared_int.run_integer(x).numpy(), own_int.run_integer(x).numpy())


class TiedConvolutions(nn.Module):
    """One convolution at two places (``conv`` and ``again``), on the two halves of the input."""

    def __init__(self, as_list: bool) -> None:
        super().__init__()
        self.as_list = as_list
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv = self.again = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halves = list(self.quant(x).chunk(2, 1)) if self.as_list else self.quant(x).chunk(2, 1)
        return self.dequant(torch.cat([self.conv(halves[0]), self.again(halves[1])], 1))


@pytest.mark.parametrize("as_list", [True, False])  # torch.export, torch.fx
def test_tied_weights_are_one_module_called_twice_under_either_capture(as_list):
    with pytest.raises(QuantizationError, match="Conv2d 'conv': called 2 times in the integer region"):
        prepare_qat_fx(TiedConvolutions(as_list), example_inputs=(torch.randn(1, 4, 8, 8),), target="npu-m")


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



def test_contiguous_under_torch_export_is_its_input_as_under_torch_fx():
    """TinyViT's window merge ends in ``.contiguous()``; torch.export records it as an aten op of its own."""

    class Merge(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.conv, self.dequant = QuantStub(), nn.Conv2d(4, 4, 1), DeQuantStub()

        def forward(self, x):
            y = list(self.quant(x).chunk(2, 1))  # torch.fx cannot trace it
            return self.dequant(self.conv(torch.cat(y, 1).transpose(2, 3).contiguous()))

    prepared = prepare_qat_fx(Merge(), example_inputs=(torch.randn(1, 4, 2, 3),), target="npu-m", strict=True)
    assert getattr(prepared, CAPTURE_ATTRIBUTE) is Capture.EXPORT
    assert not any("contiguous" in node.name for node in prepared.graph.nodes)

# ---- torch.export at any batch size -------------------------------------------------------------------------------


class Patches(nn.Module):
    """MobileViT's unfold by reshape (the map's 2x2 patch positions folded into the batch), a ViT class token expanded
    to that batch, a Linear over the tokens, the fold back: every size but the channels read from the input's shape,
    and MobileViT's branch on it (which torch.fx cannot trace)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub(scale=1 / 32)
        self.stem = ConvBnSiLU(3, 8, 3)
        self.cls = nn.Parameter(torch.randn(1, 1, 8) * 0.5)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Conv2d(8, 5, 1)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.quant(x))
        b, c, h, w = x.shape
        if h % 2 or w % 2:  # resize a map the patches do not tile
            x = F.interpolate(x, size=(h + h % 2, w + w % 2), mode="bilinear")
            h, w = h + h % 2, w + w % 2
        patches = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 2, 4, 1).reshape(b * 4, h * w // 4, c)
        tokens = self.mix(torch.cat([self.cls.expand(b * 4, -1, -1), patches], 1))[:, 1:]
        x = tokens.reshape(b, 2, 2, h // 2, w // 2, c).permute(0, 5, 3, 1, 4, 2).reshape(b, c, h, w)
        return self.dequant(self.head(x))


def calibrate_train_convert(model: nn.Module, example: torch.Tensor, calibration: int, training: int, target: str):
    """Calibrated on batches of ``calibration`` samples, the calibration state loaded into the QAT model, three
    SGD steps on batches of ``training`` samples, converted: (QAT model, integer model)."""
    shape = example.shape[1:]
    calib = prepare_qat_fx(model, default_calib_qconfig, example_inputs=(example,), target=target).eval()
    set_fake_quantize(calib, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for _ in range(2):
            calib(torch.randn(calibration, *shape))
    qat = prepare_qat_fx(model, default_qat_qconfig, example_inputs=(example,), target=target).train()
    qat.load_state_dict(calib.state_dict())
    set_fake_quantize(qat, FakeQuantState.QAT)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        qat(torch.randn(training, *shape)).square().mean().backward()
        optimizer.step()
    qat.eval()
    set_fake_quantize(qat, FakeQuantState.VALIDATION)
    return qat, convert_fx(qat)


def assert_batch_equals_samples(int_model, x: torch.Tensor) -> None:
    """The integer model on the batch ``x`` gives exactly its results on each sample alone."""
    samples = torch.cat([int_model.run_integer(x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_array_equal(int_model.run_integer(x).numpy(), samples.numpy())


def test_sizes_read_from_the_batch_follow_the_batch(tmp_path):
    """Captured at a batch of 1, calibrated at 2, trained at 4, run at 3, exported at 1."""
    torch.manual_seed(0)
    model = with_batchnorm_statistics(Patches(), (4, *SHAPE))
    example = torch.randn(1, *SHAPE)
    qat, int_model = calibrate_train_convert(model, example, calibration=2, training=4, target="npu-m")
    assert getattr(qat, CAPTURE_ATTRIBUTE) is Capture.EXPORT
    x = torch.randn(3, *SHAPE)
    assert_batch_equals_samples(int_model, x)
    np.testing.assert_array_equal(int_model.run_integer(x).numpy(), run_reference(int_model.graph_module, x.numpy()))

    path = to_onnx(int_model, (example,), tmp_path / "patches.onnx")
    graph = onnx.load(str(path)).graph
    dims = [[d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)]
    assert dims == [[1, *SHAPE], [1, 5, *SHAPE[1:]]]
    # TorchScript traces at the example too, and runs at any batch size, as for a model torch.fx traced.
    scripted = trace(int_model, (example,))
    np.testing.assert_array_equal(scripted(x).numpy(), int_model(x).numpy())
    compiled = compile_model(path, target="x86_64", out=tmp_path / "patches.edgeq")
    with Model.load(compiled.artifact) as artifact:
        (got,) = artifact.run(x[:1].numpy(), raw=True).values()
    np.testing.assert_array_equal(got, int_model.run_integer(x[:1]).numpy())


class FixedBatch(nn.Module):
    """Code that fixes the batch size: an offset per sample of a batch of ``rows``, or (``rows=None``) a check that
    the batch is one image."""

    def __init__(self, rows: int | None) -> None:
        super().__init__()
        self.rows = rows
        self.quant, self.conv, self.dequant = QuantStub(), nn.Conv2d(3, 4, 3), DeQuantStub()
        self.offsets = nn.Parameter(torch.zeros(rows or 1, 4, 6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None and x.shape[0] != 1:
            raise ValueError("one image at a time")
        x = self.conv(self.quant(x))
        if x.shape[-1] > 4:  # torch.fx cannot trace a branch on a shape
            x = x + self.offsets
        return self.dequant(x)


@pytest.mark.parametrize(("rows", "batch", "why"), [
    (4, 4, "its code fixes the batch size"),
    (None, 1, "capturing it at any batch size failed: ValueError: one image at a time"),
])
def test_code_that_fixes_the_batch_size_is_captured_at_the_example(rows, batch, why, caplog):
    example = torch.randn(batch, *SHAPE)
    with caplog.at_level(logging.INFO, logger="edgeq"):
        prepared = prepare_qat_fx(FixedBatch(rows), example_inputs=(example,), target="npu-m")
    assert getattr(prepared, CAPTURE_ATTRIBUTE) is Capture.EXPORT_FIXED_BATCH
    assert (f"FixedBatch: {why}, so it is captured at the example's shapes: calibrate and train it at batch size "
            f"{batch}") in caplog.text
    assert "prepared FixedBatch for npu-m (graph captured with torch.export at the example's batch size)" in caplog.text
    assert prepared(example).shape == (batch, 4, 6, 6)
    report = check_model(FixedBatch(rows), (example,), target="npu-m")
    assert any(note.startswith("graph captured with torch.export at the example's batch size: ") for note in report.notes)


@pytest.mark.flow
@pytest.mark.parametrize("name", ["mobilevitv2_050", "tiny_vit_5m_224"])
def test_timm_vision_transformers_run_at_any_batch_size(name):
    """timm's MobileViT (unfold by reshape) and TinyViT (window partitions) at 224, random init: captured at a
    batch of 1 by torch.export, calibrated at 2, trained at 4; the integer model at 3 equals each sample alone."""
    import timm

    torch.manual_seed(0)
    shape = (3, 224, 224)
    model = Wrapped(timm.create_model(name, pretrained=False, num_classes=10))
    for module in model.modules():  # timm zeroes the last BatchNorm of a residual branch; a trained model's is not
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
    model = with_batchnorm_statistics(model, (2, *shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FloatFallbackWarning)  # GroupNorm, softmax, attention stay float
        qat, int_model = calibrate_train_convert(model, torch.randn(1, *shape), calibration=2, training=4, target="x86_64")
    assert getattr(qat, CAPTURE_ATTRIBUTE) is Capture.EXPORT
    assert_batch_equals_samples(int_model, torch.randn(3, *shape))
