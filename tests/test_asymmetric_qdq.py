"""Third-party QDQ files with zero points (ONNX Runtime's ``quantize_static``) compile to integer kernels and
compute docs/numerics.md section 9 exactly: the artifact equals an independent int64 reference bit for bit, and
ONNX Runtime within one step per op."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import tvm_ffi
from models import float_onnx, ort_quantize_static, random_batches, rewrite_artifact
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic
from qdq_reference import run_qdq_reference
from torch import nn

from edgeq.compile import CompileResult, compile_model
from edgeq.compile.artifact import LIBRARY
from edgeq.compile.int8_activations import as_int8_activations
from edgeq.errors import ModelFileError
from edgeq.export.onnx_reader import load_onnx
from edgeq.export.peer import session
from edgeq.export.qoperator import qdq_from_qoperator
from edgeq.op_attrs import Conv2dAttrs
from edgeq.run import run_artifact
from edgeq_runtime import Model
from edgeq_runtime.model import aligned
from edgeq_runtime.vm import load_library, new_vm

INPUT_SHAPE = (1, 3, 32, 32)


class _Branchy(nn.Module):
    """Every op kind ONNX Runtime quantizes in edge models: padded, strided, depthwise, grouped and 1x1 convs with
    odd channel counts, max and average pools, a residual add, squeeze-and-excitation (Hardsigmoid, Mul), concat,
    attention-like products of two activations (MatMul of tokens and their transpose), a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.depthwise = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.ReLU6())
        self.expand = nn.Conv2d(12, 20, 3, padding=1, groups=4)  # 3 input and 5 output channels a group
        self.shortcut = nn.Conv2d(12, 20, 1)
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(20, 5, 1), nn.ReLU(), nn.Conv2d(5, 20, 1), nn.Hardsigmoid())
        self.side = nn.Sequential(nn.Conv2d(20, 7, 3, padding=2, dilation=2), nn.Hardswish())
        self.average = nn.AvgPool2d(2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(27, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        x = self.expand(self.depthwise(x)) + self.shortcut(x)
        x = x * self.squeeze(x)
        x = torch.cat([x, self.side(x)], dim=1)
        tokens = self.average(x).reshape(1, 27, 16)  # 27 tokens of 16 values (static shapes: no Shape ops)
        scores = tokens @ tokens.transpose(1, 2)
        return self.head(torch.matmul(scores, tokens).reshape(1, 27, 4, 4))


VARIANTS = {
    "uint8": dict(activation=QuantType.QUInt8, symmetric=False, per_channel=False),
    "int8-per-channel": dict(activation=QuantType.QInt8, symmetric=False, per_channel=True),
}


def branchy_float_onnx(folder: Path) -> Path:
    torch.manual_seed(0)
    model = _Branchy().eval()
    with torch.no_grad():  # non-zero biases, so that the bias and zero-point corrections both matter
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.bias.uniform_(-0.3, 0.3)
    return float_onnx(model, torch.randn(INPUT_SHAPE), folder / "f.onnx")


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def ort_file(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("asymmetric")
    return ort_quantize_static(branchy_float_onnx(folder), folder / "q.onnx", random_batches(INPUT_SHAPE, count=4), **VARIANTS[request.param])


@pytest.fixture(scope="module")
def compiled(ort_file, tmp_path_factory) -> Callable[[int], CompileResult]:
    """``compiled(opt_level)``: ``ort_file`` compiled for x86_64 at that optimisation level, once per file and level
    (the tests read the artifacts, none changes one)."""
    folder = tmp_path_factory.mktemp("asymmetric_compiled")
    results: dict[int, CompileResult] = {}

    def at(opt_level: int) -> CompileResult:
        if opt_level not in results:
            out = folder / f"q-O{opt_level}.edgeq"
            results[opt_level] = compile_model(ort_file, target="x86_64", out=out, opt_level=opt_level, progress=lambda _: None)
        return results[opt_level]

    return at


def inputs(count: int = 3) -> Iterator[np.ndarray]:
    generator = np.random.default_rng(7)
    for _ in range(count):
        yield generator.normal(size=INPUT_SHAPE).astype(np.float32) * 1.5


def float_ops(result: CompileResult) -> set[str]:
    """The float quantize/dequantize calls left in the lowered module (none: everything runs in integers)."""
    text = result.module.script()
    return {name for name in ("R.quantize(", "R.dequantize(") if name in text}


def misaligned(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` whose data starts one byte past a 64-byte boundary."""
    buffer = np.empty(array.nbytes + 65, dtype=np.uint8)
    start = -buffer.ctypes.data % 64 + 1
    copy = buffer[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    copy[...] = array
    return copy


@pytest.mark.parametrize("opt_level", [0, 2])
def test_artifact_equals_the_int64_reference(ort_file, compiled, opt_level):
    result = compiled(opt_level)
    assert not float_ops(result)
    model_file = onnx.load(str(ort_file))
    with Model.load(result.artifact) as artifact:
        name = artifact.outputs[0].name
        for x in inputs():
            expected = run_qdq_reference(model_file, {"x": x})[name]
            ours = artifact.run({"x": x}, raw=True)[name]
            assert ours.dtype == np.dtype(result.manifest["outputs"][0]["dtype"])
            np.testing.assert_array_equal(ours.astype(np.int64), expected)


def _conv_schedule(attributes: Conv2dAttrs) -> str:
    """The schedule edgeq gives a convolution of these settings."""
    if attributes.groups == attributes.in_channels == attributes.out_channels:
        return "depthwise_conv2d"
    return "conv2d_1x1" if attributes.kernel == (1, 1) else "conv2d"


def test_every_convolution_is_mapped_to_a_kernel_of_its_kind(compiled):
    """The compiled graph's op -> kernel map (the report's per-layer figures) stays aligned where kernels no op
    anchors run: the conversion of the uint8 input, zero-point paddings folded into the kernels."""
    result = compiled(2)
    schedules = {k.kernel: k.schedule for k in result.kernels}
    convolutions = [op for op in result.graph.ops if op.op == "conv2d"]
    assert {_conv_schedule(op.attributes) for op in convolutions} == {"conv2d", "conv2d_1x1", "depthwise_conv2d"}
    for op in convolutions:
        assert schedules.get(op.kernel) == _conv_schedule(op.attributes), op.name
    assert "pad" not in " ".join(schedules)  # folded into the kernels' packing


def test_unaligned_inputs_reach_the_kernels_aligned(compiled, tmp_path):
    """An unfused build's first kernel (the zero-point padding of the int8 input) loads the program input with
    aligned vector instructions: both runtimes hand TVM 64-byte-aligned tensors whatever the caller's array."""
    result = compiled(0)
    x = next(inputs())
    np.save(tmp_path / "x.npy", x)
    with Model.load(result.artifact) as artifact:
        quantized = artifact.inputs[0].quantize(x)
        expected = artifact.run({"x": quantized}, raw=True)
        for _ in range(3):
            for got, want in zip(artifact.run({"x": misaligned(quantized)}, raw=True).values(), expected.values()):
                np.testing.assert_array_equal(got, want)
    run = run_artifact(result.artifact, [str(tmp_path / "x.npy")], tmp_path / "cpp", runtime="cpp", raw=True, say=lambda _: None)
    for name, path in run.outputs.items():
        np.testing.assert_array_equal(np.load(path), expected[name])


def _steps_from_onnx_runtime(path: Path, result: CompileResult, samples: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """Per sample, |artifact - ONNX Runtime| in output steps (ORT's float output quantized to the output's steps),
    ``result`` being ``path`` compiled."""
    peer = session(onnx.load(str(path)))
    quant = result.manifest["outputs"][0]["quant"]
    with Model.load(result.artifact) as artifact:
        name = artifact.outputs[0].name
        for x in samples:
            (theirs,) = peer.run(None, {"x": x})
            steps = np.rint(theirs / np.float32(quant["scale"][0])) + quant["zero_point"][0]
            yield np.abs(artifact.run({"x": x}, raw=True)[name].astype(np.int64) - steps)


def test_onnx_runtime_agrees_within_two_steps_end_to_end(ort_file, compiled):
    """ORT's one-step differences per op (its float32 requantization) start at the average pool and pass through
    the two chained products: at most 2 steps at the output (docs/numerics.md section 9)."""
    for steps in _steps_from_onnx_runtime(ort_file, compiled(2), inputs()):
        assert steps.max() <= 2


class _Scores(nn.Module):
    """One product of two activations, as attention's scores: ``x @ x^T`` of 5 tokens of 12 values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ x.transpose(1, 2)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_onnx_runtime_agrees_on_a_matmul_within_one_step(variant, tmp_path):
    """Per op: ORT's MatMul of two activations with zero points, fed identical integers, within 1 step of the
    artifact (which equals the int64 reference)."""
    shape = (1, 5, 12)
    float_path = float_onnx(_Scores().eval(), torch.randn(shape), tmp_path / "f.onnx")
    path = ort_quantize_static(float_path, tmp_path / "q.onnx", random_batches(shape, count=4), **VARIANTS[variant])
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node if n.op_type == "MatMul"] == ["MatMul"]
    samples = [x.astype(np.float32) for x in random_batches(shape, count=3, seed=5)]
    result = compile_model(path, target="x86_64", out=tmp_path / "q.edgeq", progress=lambda _: None)
    for steps in _steps_from_onnx_runtime(path, result, iter(samples)):
        assert steps.max() <= 1
    assert not float_ops(result)
    with Model.load(result.artifact) as artifact:
        for x in samples:
            (name,) = [o.name for o in artifact.outputs]
            np.testing.assert_array_equal(artifact.run({"x": x}, raw=True)[name].astype(np.int64), run_qdq_reference(model, {"x": x})[name])


def test_uint8_activations_become_int8_with_shifted_zero_points(ort_file):
    """The rewrite is exact: ONNX Runtime computes the same numbers on the rewritten graph (shifted by 128)."""
    model = onnx.load(str(ort_file))
    rewritten = as_int8_activations(model)
    onnx.checker.check_model(rewritten, full_check=True)
    zero_points = {
        t.name: onnx.numpy_helper.to_array(t) for t in rewritten.graph.initializer if t.name.endswith("zero_point__int8")
    }
    if not any(t.data_type == onnx.TensorProto.UINT8 for t in model.graph.initializer):
        assert rewritten is model
        return
    assert zero_points and all(z.dtype == np.int8 for z in zero_points.values())
    x = next(inputs())
    (original,) = session(model).run(None, {"x": x})
    (shifted,) = session(rewritten).run(None, {"x": x})
    np.testing.assert_array_equal(original, shifted)


# ---- resnet18 as ONNX Runtime quantizes it by default -----------------------------------------------------------


@pytest.fixture(scope="module")
def ort_uint8_resnet18(tmp_path_factory) -> Path:
    """ONNX Runtime's quantize_static of resnet18: uint8 activations with zero points, per-tensor weights."""
    import torchvision

    folder = tmp_path_factory.mktemp("ort")
    torch.manual_seed(0)
    float_path = float_onnx(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64), folder / "f.onnx")
    return ort_quantize_static(float_path, folder / "q.onnx", random_batches((1, 3, 64, 64)))


@pytest.mark.flow
def test_resnet18_from_onnx_runtime_runs_in_integers(ort_uint8_resnet18, tmp_path):
    """The artifact keeps the file's uint8 input and output, computes no float, equals the int64 reference and
    is within one step of ONNX Runtime."""
    result = compile_model(ort_uint8_resnet18, target="x86_64", out=tmp_path / "q.edgeq", progress=lambda _: None)
    assert result.manifest["inputs"][0]["dtype"] == "uint8" and result.manifest["outputs"][0]["dtype"] == "uint8"
    assert not float_ops(result)
    model_file = onnx.load(str(ort_uint8_resnet18))
    peer = session(model_file)
    quant = result.manifest["outputs"][0]["quant"]
    with Model.load(result.artifact) as artifact:
        name = artifact.outputs[0].name
        for x in random_batches((1, 3, 64, 64), count=2, seed=1):
            ours = artifact.run({"x": x}, raw=True)[name].astype(np.int64)
            np.testing.assert_array_equal(ours, run_qdq_reference(model_file, {"x": x})[name])
            (theirs,) = peer.run(None, {"x": x})
            steps = np.rint(theirs / np.float32(quant["scale"][0])) + quant["zero_point"][0]
            assert (np.abs(ours - steps) <= 1).mean() >= 0.99


@pytest.mark.flow
def test_resnet18_from_onnx_runtime_falls_back_to_the_cpu_on_npu_targets(ort_uint8_resnet18, tmp_path):
    result = compile_model(ort_uint8_resnet18, target="npu-m", out=tmp_path / "q.edgeq", simulate=True, progress=lambda _: None)
    assert [r.placement.value for r in result.partition.regions] == ["CPU"]
    conv = next(n for n in result.report.nodes if n.record.op == "conv2d")
    assert "is uint8 with zero point" in conv.reasons[0].message


# ---- ONNX's operator form (QOperator) and dynamic quantization --------------------------------------------------


def test_qoperator_file_compiles_to_integers(tmp_path):
    """quantize_static with QuantFormat.QOperator (QLinearConv, QGemm, QLinearAdd, QLinearMul,
    QLinearGlobalAveragePool, QLinearConcat...) reads as QDQ: the artifact equals the int64 reference of that QDQ
    form, which ONNX Runtime itself computes like the original file, and ONNX Runtime agrees within one step."""
    qoperator = ort_quantize_static(branchy_float_onnx(tmp_path), tmp_path / "qop.onnx", random_batches(INPUT_SHAPE, count=4),
                                    quant_format=QuantFormat.QOperator)
    original = onnx.load(str(qoperator))
    assert {"QLinearConv", "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat"} <= {n.op_type for n in original.graph.node}
    read = load_onnx(qoperator)
    assert read.form == "QOperator" and not any(n.domain == "com.microsoft" for n in read.model.graph.node)
    result = compile_model(qoperator, target="x86_64", out=tmp_path / "q.edgeq", progress=lambda _: None)
    assert not float_ops(result)
    peer, rewritten_peer = session(original), session(read.model)
    quant = result.manifest["outputs"][0]["quant"]
    with Model.load(result.artifact) as artifact:
        name = artifact.outputs[0].name
        for x in inputs():
            ours = artifact.run({"x": x}, raw=True)[name].astype(np.int64)
            np.testing.assert_array_equal(ours, run_qdq_reference(read.model, {"x": x})[name])
            (theirs,), (rewritten,) = peer.run(None, {"x": x}), rewritten_peer.run(None, {"x": x})
            step = np.float32(quant["scale"][0])
            assert np.abs(np.rint(theirs / step) - np.rint(rewritten / step)).max() <= 1
            assert np.abs(ours - (np.rint(theirs / step) + quant["zero_point"][0])).max() <= 1


def test_dynamic_quantization_is_refused_with_the_reason(tmp_path):
    float_path = branchy_float_onnx(tmp_path)
    dynamic = tmp_path / "dynamic.onnx"
    quantize_dynamic(str(float_path), str(dynamic), weight_type=QuantType.QInt8)
    with pytest.raises(ModelFileError, match="DynamicQuantizeLinear.*dynamic quantization.*quantize_static"):
        compile_model(dynamic, target="x86_64", out=tmp_path / "d.edgeq")
    assert not (tmp_path / "d.edgeq").exists()


def _qoperator_model(node: onnx.NodeProto) -> onnx.ModelProto:
    """One contrib-op node on uint8 x (scales and zero points as initializers), for the rewrite's refusals."""
    constants = [
        onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        onnx.numpy_helper.from_array(np.array(128, np.uint8), "z"),
        onnx.numpy_helper.from_array(np.ones((4, 4), np.int8), "w"),
        onnx.numpy_helper.from_array(np.array(0.1, np.float32), "ws"),
        onnx.numpy_helper.from_array(np.array(0, np.int8), "wz"),
    ]
    inputs = [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [1, 4, 2, 2])]
    outputs = [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, None)]
    graph = onnx.helper.make_graph([node], "g", inputs, outputs, constants)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13), onnx.helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize(
    "node, message",
    [
        (onnx.helper.make_node("QLinearGlobalAveragePool", ["x", "s", "z", "s", "z"], ["y"], "pool", domain="com.microsoft", channels_last=1),
         "QLinearGlobalAveragePool 'pool': channels_last=1 is not supported"),
        (onnx.helper.make_node("QGemm", ["x", "s", "z", "w", "ws", "wz", "", "s", "z"], ["y"], "fc", domain="com.microsoft", alpha=2.0),
         "QGemm 'fc': alpha other than 1 is not supported"),
        (onnx.helper.make_node("QGemm", ["x", "s", "z", "w", "ws", "wz"], ["y"], "fc", domain="com.microsoft"),
         r"QGemm 'fc': a QGemm without an output scale \(float output\) is not supported"),
        (onnx.helper.make_node("MatMulInteger", ["x", "w", "z", "x"], ["y"], "mm"),
         r"MatMulInteger 'mm': zero point 'x' is computed when the model runs \(dynamic quantization\) and has no fixed integer program"),
    ],
)
def test_qoperator_nodes_edgeq_cannot_rewrite_are_named(node, message):
    with pytest.raises(ModelFileError, match=rf"^m\.onnx: {message}"):
        qdq_from_qoperator(_qoperator_model(node), "m.onnx")


class _ResizedByAFactor(nn.Module):
    """A bilinear resize by 1.5 of 7 columns: 10 columns, sampled at the factor's coordinates."""

    def __init__(self) -> None:
        super().__init__()
        self.head, self.tail = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(F.interpolate(self.head(x), scale_factor=1.5, mode="bilinear"))


def test_a_resize_by_scales_computes_onnx_coordinates(tmp_path):
    """ONNX Runtime's file keeps torch's ``scales``: edgeq computes that Resize in float at the scale's
    coordinates (not at the sizes' ratio TVM would take), within one output step of ONNX Runtime."""
    torch.manual_seed(0)
    shape = (1, 3, 8, 7)
    path = ort_quantize_static(float_onnx(_ResizedByAFactor().eval(), torch.randn(shape), tmp_path / "f.onnx"), tmp_path / "q.onnx", random_batches(shape))
    result = compile_model(path, target="x86_64", out=tmp_path / "q.edgeq", progress=lambda _: None)
    (resize,) = [n for n in result.report.nodes if n.record.op == "resizelinear"]
    assert resize.where == "CPU"  # not upsample_bilinear2d: no integer form at these coordinates
    x = random_batches(shape, count=1, seed=3)[0]
    (expected,) = session(onnx.load(str(path))).run(None, {"x": x})
    step = result.manifest["outputs"][0]["quant"]["scale"][0]
    with Model.load(result.artifact) as artifact:
        (got,) = artifact.run({"x": x}).values()
    assert np.abs(got - expected).max() <= step * 1.01


def _awkward_floats(scale: float) -> np.ndarray:
    """Inputs that test a quantizer: ties at every step (``(k + 0.5) * s``), values past both limits, infinities,
    NaN, signed zeros, and ordinary values."""
    generator = np.random.default_rng(3)
    values = generator.normal(size=INPUT_SHAPE).astype(np.float32) * 2
    special = np.float32([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, -0.0, 3e-39])
    ties = (np.arange(-140, 140, dtype=np.float32) + np.float32(0.5)) * np.float32(scale)
    flat = values.reshape(-1)
    flat[: special.size] = special
    flat[special.size : special.size + ties.size] = ties
    return values


def _without_quantizer(manifest: dict, members: dict) -> None:
    del manifest["inputs"][0]["quantizer"]


def test_the_library_quantizes_float_inputs_as_the_runtimes_do(compiled, tmp_path):
    """The artifact's input quantizer (a kernel of the library, which both runtimes call on float inputs) gives
    exactly the integers of ``TensorInfo.quantize``; an artifact without one is quantized by the runtimes
    themselves (numpy, the C++ runtime's loop), to the same integers, zero point included."""
    result = compiled(2)
    without = rewrite_artifact(result.artifact, tmp_path / "without.edgeq", _without_quantizer)
    with Model.load(result.artifact) as artifact, Model.load(without) as plain:
        info = artifact.inputs[0]
        assert info.quantizer == "quantize_input0" and plain.inputs[0].quantizer is None
        x = _awkward_floats(float(info.scale[0]))
        by_numpy = info.quantize(x)
        with zipfile.ZipFile(result.artifact) as archive:
            archive.extract(LIBRARY, tmp_path)
        by_library = np.from_dlpack(new_vm(load_library(tmp_path / LIBRARY))[info.quantizer](tvm_ffi.from_dlpack(aligned(x))))
        np.testing.assert_array_equal(by_library, by_numpy)
        expected = artifact.run({"x": by_numpy}, raw=True)
        for model in (artifact, plain):
            for got, want in zip(model.run({"x": misaligned(x)}, raw=True).values(), expected.values()):
                np.testing.assert_array_equal(got, want)
    np.save(tmp_path / "x.npy", x)
    for path in (result.artifact, without):
        run = run_artifact(path, [str(tmp_path / "x.npy")], tmp_path / path.stem, runtime="cpp", raw=True, say=lambda _: None)
        for name, output in run.outputs.items():
            np.testing.assert_array_equal(np.load(output), expected[name])
