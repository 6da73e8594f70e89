"""Parameters an integer op reads as tensors (ViT's class token and position embedding, ConvNeXt's layer scale, a
product with a weight matrix) enter the integer region through a calibrated quantize of their own; what is computed
from parameters alone (``self.cls.expand(n, -1, -1)``) is a constant too. Exact through prepare, convert, export,
compile and both runtimes; ONNX Runtime runs the QDQ file."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from models import assert_within_float_region_bound, integer_model
from reference import run_reference
from torch import nn

from edgeq.check import check_model
from edgeq.compile import compile_model
from edgeq.errors import QuantizationError
from edgeq.export import to_onnx
from edgeq.export.peer import session, steps_apart
from edgeq.quantization import DeQuantStub, QuantStub, calibrate, convert_fx, prepare_qat_fx
from edgeq.quantization.capture import CAPTURE_ATTRIBUTE, Capture
from edgeq.quantization.prepare import FloatFallbackWarning
from edgeq.quantization.qat_modules import LeaveFloat
from edgeq.run import run_artifact
from edgeq_runtime import Model

DIM, PATCHES = 16, 4
EXAMPLE = torch.randn(1, 3, 8, 8)


class Tokens(nn.Module):
    """Patch embedding, a class token concatenated in front, a position embedding added, a per-channel layer scale
    multiplied, a product with a weight matrix, and a Linear head on the class token.

    With ``branch``, the layer-scale product is under an ``if`` on a shape, which torch.fx cannot trace (the model
    is then captured by torch.export)."""

    def __init__(self, branch: bool = False) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.embed = nn.Conv2d(3, DIM, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, PATCHES + 1, DIM) * 0.5)
        self.gamma = nn.Parameter(torch.rand(DIM) + 0.5)
        self.mix = nn.Parameter(torch.randn(DIM, DIM) * 0.3)
        self.head = nn.Linear(DIM, 10)
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.quant(x)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        if not self.branch or x.shape[-1] == DIM:
            x = x * self.gamma
        return self.dequant(self.head((x @ self.mix)[:, 0]))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    torch.manual_seed(0)
    int_model = integer_model(Tokens().eval(), EXAMPLE, "npu-m")
    return int_model, to_onnx(int_model, (EXAMPLE,), tmp_path_factory.mktemp("tokens") / "tokens.onnx")


def test_each_constant_gets_a_calibrated_quantize():
    prepared = prepare_qat_fx(Tokens(), example_inputs=(EXAMPLE,), target="npu-m", strict=True)
    quantizers = {name for name, module in prepared.named_modules() if isinstance(module, LeaveFloat)}
    assert quantizers == {"expand_quantize", "pos_quantize", "gamma_quantize", "mix_quantize"}


def test_the_integer_model_equals_the_reference(tokens):
    int_model, _ = tokens
    for seed in range(3):
        x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        np.testing.assert_array_equal(int_model.run_integer(x).numpy(), run_reference(int_model.graph_module, x.numpy()))


def test_export_writes_each_constant_as_int8_values_the_integer_model_computes(tokens):
    """The standard QDQ form of a quantized constant: int8 initializer -> DequantizeLinear; no float copy."""
    int_model, path = tokens
    graph = onnx.load(str(path)).graph
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    constants = {name: initializers[name] for name in ("expand_quantize.q", "pos_quantize.q", "gamma_quantize.q", "mix_quantize.q")}
    assert all(values.dtype == np.int8 for values in constants.values())
    assert not {"cls", "pos", "gamma", "mix", "expand"} & set(initializers)
    readers = {n.input[0]: n.op_type for n in graph.node if n.input and n.input[0] in constants}
    assert set(readers.values()) == {"DequantizeLinear"} and len(readers) == 4
    modules = dict(int_model.graph_module.named_modules())
    expected = modules["pos_quantize"](int_model.graph_module.get_parameter("pos").detach())
    np.testing.assert_array_equal(constants["pos_quantize.q"], expected.numpy())


def test_onnx_runtime_runs_the_file_within_a_step_per_op(tokens):
    int_model, path = tokens
    x = torch.randn(1, 3, 8, 8)
    (output,) = session(onnx.load(str(path))).run(None, {"x": x.numpy()})
    assert steps_apart(output, int_model.run_integer(x), int_model.output_quant()[0].scale).max() <= 2


@pytest.mark.parametrize("target", ["npu-s", "npu-m"])
def test_check_of_the_model_and_of_its_file_agree(tokens, target, tmp_path):
    """The ops reading constants are placed like any other; the product with a weight matrix is a linear layer."""
    torch.manual_seed(0)
    int_model = integer_model(Tokens().eval(), EXAMPLE, target)
    path = to_onnx(int_model, (EXAMPLE,), tmp_path / "tokens.onnx")
    reports = check_model(path, target=target), check_model(Tokens(), (EXAMPLE,), target=target)
    placed = [{node.record.op: node.where for node in report.nodes} for report in reports]
    assert placed[0] == placed[1]
    assert placed[0]["linear"] == placed[0]["concat"] == placed[0]["add"] == "NPU"
    assert "CPU (float)" not in placed[0].values()


@pytest.mark.parametrize("target", ["x86_64", "npu-m"])
def test_the_compiled_artifact_equals_the_integer_model(tokens, target, tmp_path):
    int_model, path = tokens
    result = compile_model(path, target=target, out=tmp_path / "t.edgeq", simulate=True)
    x = torch.randn(1, 3, 8, 8)
    expected = int_model.run_integer(x).numpy()
    with Model.load(result.artifact) as model:
        (got,) = model.run(x.numpy(), raw=True).values()
    np.testing.assert_array_equal(got, expected)
    np.save(tmp_path / "x.npy", x.numpy())
    run = run_artifact(result.artifact, [str(tmp_path / "x.npy")], tmp_path / "cpp", runtime="cpp", raw=True, say=lambda _: None)
    (cpp,) = run.outputs.values()
    np.testing.assert_array_equal(np.load(cpp), expected)


def test_qat_trains_the_parameters_through_their_quantize():
    torch.manual_seed(0)
    prepared = prepare_qat_fx(Tokens(), example_inputs=(EXAMPLE,), target="npu-m")
    prepared(torch.randn(4, 3, 8, 8)).square().mean().backward()
    for name in ("cls", "pos", "gamma", "mix"):
        assert prepared.get_parameter(name).grad.abs().sum() > 0, name


def test_torch_export_captures_the_constants_alike():
    torch.manual_seed(0)
    branching, plain = Tokens(branch=True).eval(), Tokens().eval()
    plain.load_state_dict(branching.state_dict())
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    # the class token is expanded to x.shape[0] rows at any batch size, under either capture
    prepared = [calibrate(m, batches, example_inputs=(EXAMPLE,), target="npu-m") for m in (branching, plain)]
    assert [getattr(p, CAPTURE_ATTRIBUTE) for p in prepared] == [Capture.EXPORT, Capture.FX]
    x = torch.randn(3, 3, 8, 8)
    got, expected = (convert_fx(p).run_integer(x).numpy() for p in prepared)
    np.testing.assert_array_equal(got, expected)


def test_a_float_tensor_a_model_input_flows_into_is_still_an_error():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dequant(self.quant(x) * (x.abs() * self.scale))

    with pytest.raises(QuantizationError, match=r"mul '.*': mixes quantized input 'quant' with float input 'mul', which a model input flows into"):
        prepare_qat_fx(Mixed(), example_inputs=(torch.randn(2, 3),), target="x86_64")


def test_an_op_left_in_float_reads_parameters_as_float_initializers(tmp_path):
    """Functional LayerNorm with its weight and bias parameters (float fallback): the QDQ file gives them to its
    arithmetic; the compiled artifact agrees with the integer model within the float fallback's bound."""

    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.fc_in, self.fc_out = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
            self.weight = nn.Parameter(torch.rand(DIM) + 0.5)
            self.bias = nn.Parameter(torch.randn(DIM))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            normed = F.layer_norm(self.fc_in(self.quant(x)), (DIM,), self.weight, self.bias)
            return self.dequant(self.fc_out(normed))

    torch.manual_seed(0)
    example = torch.randn(4, DIM)
    with pytest.warns(FloatFallbackWarning, match="layer_norm"):
        int_model = integer_model(Normed().eval(), example, "x86_64")
    path = to_onnx(int_model, (example,), tmp_path / "normed.onnx")
    initializers = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert {"weight", "bias"} <= initializers
    result = compile_model(path, target="x86_64", out=tmp_path / "n.edgeq")
    x = torch.randn(4, DIM) * 3
    with Model.load(result.artifact) as model:
        (got,) = model.run(x.numpy(), raw=True).values()
    assert_within_float_region_bound(got, int_model.run_integer(x).numpy())



class GridOffsets(nn.Module):
    """YOLO's anchors and strides in small: ``torch.arange(w).type_as(feature)`` and ``feature.new_full(...)`` read
    the feature only for its dtype; the integer add reads their product as a constant. With ``branch``, an ``if`` on
    a shape makes torch.fx fail and torch.export capture it (aten ops, as YOLOv8's C2f does)."""

    def __init__(self, branch: bool = False) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature = self.conv(self.quant(x))
        width = feature.shape[-1]
        if self.branch and width < 1:
            raise ValueError("an empty feature map")
        grid = torch.arange(width).type_as(feature) + 0.5
        stride = feature.new_full((1, 1, 1, width), 2.0)
        return self.dequant(feature + grid * stride)


@pytest.mark.parametrize(("branch", "capture"), [(False, Capture.FX), (True, Capture.EXPORT)])
def test_an_op_reading_a_tensor_only_for_its_dtype_makes_a_constant(branch, capture):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatFallbackWarning)
        prepared = calibrate(GridOffsets(branch).eval(), [torch.randn(2, 3, 8, 8)], example_inputs=(EXAMPLE,), target="x86_64")
    assert getattr(prepared, CAPTURE_ATTRIBUTE) is capture
    assert not [n for n in prepared.graph.nodes if "type_as" in str(n.target) or "new_full" in str(n.target)]
    int_model = convert_fx(prepared)
    x = torch.randn(1, 3, 8, 8)
    expected = prepared.conv(x).detach() + (torch.arange(8) + 0.5) * 2.0
    assert float((int_model(x) - expected).abs().max()) <= 2 * int_model.output_quant()[0].scales[0]
