"""EdgeqQuantizer in torchao's PT2E flow: the converted graph's scales and int8 weights, and the integer model
from_pt2e makes of it, are edgeq's own flow's on the same model, qconfig and calibration data (issue 33)."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from models import torchvision_model
from onnx import numpy_helper
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from edgeq.errors import QuantizationError
from edgeq.export import build_onnx
from edgeq.quantization import (
    DeQuantStub,
    FakeQuantState,
    IntegerModel,
    QuantStub,
    calibrate,
    convert_fx,
    default_calib_int32_output_qconfig,
    default_qat_qconfig,
    prepare_qat_fx,
    set_fake_quantize,
)
from edgeq.quantization.fake_quantize import ActivationFakeQuantize
from edgeq.quantization.float_boundaries import FloatFallbackWarning
from edgeq.quantization.integer_ops import IntConv2d, IntLinear

pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")
from edgeq.quantization import EdgeqQuantizer, from_pt2e  # noqa: E402

decomposed = torch.ops.quantized_decomposed


class ConvBlocks(nn.Module):
    """Conv + ReLU, a residual add, a concat, a max pool, global average pooling and a linear layer."""

    def __init__(self, input_scale: float | None = None) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(scale=input_scale), DeQuantStub()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.classifier = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(self.quant(x)))
        merged = torch.cat([self.pointwise(features) + features, features], 1)
        pooled = F.adaptive_avg_pool2d(F.max_pool2d(merged, 2), 1).flatten(1)
        return self.dequant(self.classifier(pooled))


def _both_flows(
    model: nn.Module, target: str, shape: tuple[int, ...] = (2, 3, 8, 8)
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """The PT2E-converted graph and edgeq's calibrated model of ``model``, on the same batches."""
    model = model.eval()
    example = torch.randn(shape)
    batches = [torch.randn(shape) for _ in range(3)]
    prepared = pt2e.prepare_pt2e(torch.export.export(model, (example,)).module(), EdgeqQuantizer(target))
    for batch in batches:
        prepared(batch)
    converted = pt2e.convert_pt2e(prepared)
    calibrated = calibrate(model, batches, example_inputs=(example,), target=target)
    return converted, calibrated


@pytest.mark.parametrize("target", ["npu-m", "ethos-u65-256"])
def test_scales_and_weights_equal_edgeqs_flow(target: str) -> None:
    torch.manual_seed(0)
    converted, calibrated = _both_flows(ConvBlocks(), target)
    pt2e_scales = {n.args[1] for n in converted.graph.nodes if n.target == decomposed.quantize_per_tensor.default}
    edgeq_scales = {q.scale() for q in calibrated.modules() if isinstance(q, ActivationFakeQuantize)}
    assert pt2e_scales == edgeq_scales
    weights = [n for n in converted.graph.nodes if n.target == decomposed.dequantize_per_channel.default]
    layers = [m for m in convert_fx(calibrated).modules() if isinstance(m, (IntConv2d, IntLinear))]
    assert len(weights) == len(layers) == 3
    for weight, layer in zip(weights, layers):
        assert torch.equal(getattr(converted, weight.args[0].target), layer.weight)
        assert getattr(converted, weight.args[1].target).tolist() == list(layer.weight_scales)


@pytest.mark.parametrize("target", ["npu-m", "npu-s", "ethos-u65-256"])
def test_from_pt2e_equals_edgeqs_integer_model(target: str) -> None:
    torch.manual_seed(0)
    converted, calibrated = _both_flows(ConvBlocks(), target)
    integer_model, expected = from_pt2e(converted), convert_fx(calibrated)
    assert list(integer_model.tensor_quant.values()) == list(expected.tensor_quant.values())
    x = torch.randn(4, 3, 8, 8)
    np.testing.assert_array_equal(integer_model.run_integer(x).numpy(), expected.run_integer(x).numpy())


def _train(model: nn.Module, batches: list[torch.Tensor]) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in batches:
        optimizer.zero_grad()
        model(batch).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("target", ["npu-m", "npu-s", "ethos-u65-256"])
def test_qat_equals_edgeqs_flow(target: str) -> None:
    """prepare_qat_pt2e with EdgeqQuantizer(is_qat=True) trains as prepare_qat_fx does (edgeq's fake quantizers,
    same weights after every step), and set_fake_quantize reaches its quantizers: equal integer models."""
    torch.manual_seed(0)
    model, example = ConvBlocks(), torch.randn(2, 3, 8, 8)
    batches = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    quantizer = EdgeqQuantizer(target, default_qat_qconfig, is_qat=True)
    prepared = pt2e.prepare_qat_pt2e(torch.export.export(copy.deepcopy(model), (example,)).module(), quantizer)
    qat = prepare_qat_fx(model, default_qat_qconfig, example_inputs=(example,), target=target)
    for trained in (prepared, qat):
        _train(trained, batches)
        set_fake_quantize(trained, FakeQuantState.VALIDATION)
        trained(batches[0])  # frozen ranges: a forward changes nothing
    integer_model, expected = from_pt2e(pt2e.convert_pt2e(prepared)), convert_fx(qat)
    assert list(integer_model.tensor_quant.values()) == list(expected.tensor_quant.values())
    np.testing.assert_array_equal(integer_model.run_integer(example).numpy(), expected.run_integer(example).numpy())


class FloatSoftmax(nn.Module):
    """A softmax between two convolutions: edgeq runs it in float."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.head(torch.softmax(self.conv(self.quant(x)), 1)))


def test_float_fallback_equals_edgeqs_flow() -> None:
    torch.manual_seed(0)
    with pytest.warns(FloatFallbackWarning, match="softmax 'softmax'"):  # edgeq's own flow says it too
        converted, calibrated = _both_flows(FloatSoftmax(), "npu-m")
    with pytest.warns(FloatFallbackWarning, match="softmax 'softmax'"):
        integer_model = from_pt2e(converted)
    expected = convert_fx(calibrated)
    assert list(integer_model.tensor_quant.values()) == list(expected.tensor_quant.values())
    x = torch.randn(4, 3, 8, 8)
    np.testing.assert_array_equal(integer_model.run_integer(x).numpy(), expected.run_integer(x).numpy())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with each BatchNorm2d that follows a Conv2d in a Sequential folded into it (torch's
    ``fuse_conv_bn_eval``): PT2E folds BatchNorm in float before any quantizer sees the graph, edgeq at convert, and
    the two folds differ in the last bit (docs/quantization.md), so the flows are compared on the folded model."""
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            for index in reversed(range(len(module) - 1)):
                if isinstance(module[index], nn.Conv2d) and isinstance(module[index + 1], nn.BatchNorm2d):
                    module[index] = fuse_conv_bn_eval(module[index], module[index + 1])
                    del module[index + 1]
    return model


def _onnx_integers(integer_model: IntegerModel, example: torch.Tensor) -> tuple[list[str], list[bytes], np.ndarray]:
    """The QDQ ONNX file's op types, its initializers (sorted: names differ between the flows) and its output
    under ONNX Runtime."""
    model = build_onnx(integer_model, (example,))
    initializers = sorted(numpy_helper.to_array(t).tobytes() + str(t.data_type).encode() for t in model.graph.initializer)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    return sorted(node.op_type for node in model.graph.node), initializers, output


@pytest.mark.flow
@pytest.mark.parametrize("target", ["npu-m", "npu-s"])
def test_mobilenet_v3_small_equals_edgeqs_flow(target: str) -> None:
    """mobilenet_v3_small at 32x32 (BatchNorm folded first): from_pt2e's integer model and edgeq's have the same
    scales and integer outputs, and their QDQ ONNX files the same integers."""
    model = fold_batchnorm(torchvision_model("mobilenet_v3_small"))
    torch.manual_seed(1)
    converted, calibrated = _both_flows(model, target, (2, 3, 32, 32))
    integer_model, expected = from_pt2e(converted), convert_fx(calibrated)
    assert list(integer_model.tensor_quant.values()) == list(expected.tensor_quant.values())
    x = torch.randn(4, 3, 32, 32)
    np.testing.assert_array_equal(integer_model.run_integer(x).numpy(), expected.run_integer(x).numpy())
    ops, initializers, output = _onnx_integers(integer_model, x)
    expected_ops, expected_initializers, expected_output = _onnx_integers(expected, x)
    assert ops == expected_ops and initializers == expected_initializers
    np.testing.assert_array_equal(output, expected_output)


@pytest.mark.parametrize("is_qat", [False, True])
def test_fixed_input_scale(is_qat: bool) -> None:
    """input_scales is QuantStub(scale=...): the same integer model after calibration or QAT, on a half-up target
    (the fixed input's fake quantization rounds as the target does)."""
    torch.manual_seed(0)
    model, example = ConvBlocks(input_scale=1 / 64), torch.randn(2, 3, 8, 8)
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    quantizer = EdgeqQuantizer("ethos-u65-256", default_qat_qconfig, input_scales={"x": 1 / 64}, is_qat=is_qat)
    exported = torch.export.export(copy.deepcopy(model), (example,)).module()
    prepared = (pt2e.prepare_qat_pt2e if is_qat else pt2e.prepare_pt2e)(exported, quantizer)
    expected_model = prepare_qat_fx(model, default_qat_qconfig, example_inputs=(example,), target="ethos-u65-256")
    set_fake_quantize(expected_model, FakeQuantState.QAT if is_qat else FakeQuantState.CALIBRATION)
    for trained in (prepared, expected_model):
        if is_qat:
            _train(trained, batches)
        else:
            with torch.no_grad():
                for batch in batches:
                    trained(batch)
    converted = pt2e.convert_pt2e(prepared)
    first = next(n for n in converted.graph.nodes if n.target == decomposed.quantize_per_tensor.default)
    assert first.args[0].name == "x" and first.args[1] == 1 / 64
    integer_model, expected = from_pt2e(converted), convert_fx(expected_model)
    assert list(integer_model.tensor_quant.values()) == list(expected.tensor_quant.values())
    np.testing.assert_array_equal(integer_model.run_integer(example).numpy(), expected.run_integer(example).numpy())


def test_refusals() -> None:
    with pytest.raises(QuantizationError, match="not a power of two"):
        EdgeqQuantizer("npu-s", input_scales={"x": 0.01})
    with pytest.raises(QuantizationError, match="int32 outputs"):
        EdgeqQuantizer("npu-m", default_calib_int32_output_qconfig)
    exported = torch.export.export(ConvBlocks().eval(), (torch.randn(1, 3, 8, 8),)).module()
    with pytest.raises(QuantizationError, match=r"input_scales names \['image'\]"):
        pt2e.prepare_pt2e(exported, EdgeqQuantizer("npu-m", input_scales={"image": 1 / 64}))
    with pytest.raises(QuantizationError, match="not quantized with an EdgeqQuantizer"):
        from_pt2e(torch.export.export(ConvBlocks().eval(), (torch.randn(1, 3, 8, 8),)).module())


def test_edgeq_imports_without_torchao() -> None:
    """Importing edgeq needs no torchao; EdgeqQuantizer without it says how to install it."""
    code = (
        "import sys; sys.modules['torchao'] = None\n"
        "import edgeq, edgeq.quantization\n"
        "try:\n    edgeq.quantization.EdgeqQuantizer\nexcept ImportError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install edgeq[pt2e]" in result.stdout
