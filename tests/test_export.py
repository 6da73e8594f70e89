"""Export: TorchScript and QDQ ONNX files of the integer model, ONNX Runtime as a peer, and reading files back."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from models import (
    SPPF,
    BatchNorms1d,
    BilinearResizes,
    FunctionalOps,
    SmallCNN,
    Wrapped,
    float_onnx,
    integer_model,
    ort_quantize_static,
    random_batches,
    torchvision_model,
    with_batchnorm_statistics,
)
from onnx import helper, numpy_helper
from torch import nn

from edgeq.errors import ExportError, ModelFileError
from edgeq.export import OPSET, build_onnx, load_model_file, load_onnx, load_torchscript, save_torchscript, to_onnx, trace
from edgeq.export.peer import (
    PRECISE_INT8,
    onnx_runtime_int8_is_exact,
    peer_path,
    per_op_differences,
    probe_model,
    session,
    steps_apart,
)
from edgeq.quantization import DeQuantStub, QuantStub


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    example = torch.rand(2, 1, 8, 8) * 2 - 1
    return integer_model(SmallCNN().eval(), example, "npu-s"), example


@pytest.fixture(scope="module")
def functional():
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    return integer_model(FunctionalOps().eval(), example, "npu-m"), example


def as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


# ---- the QDQ ONNX file ------------------------------------------------------------------------------------------


def test_onnx_file_is_clean_qdq(small, tmp_path):
    int_model, example = small
    path = to_onnx(int_model, (example,), tmp_path / "small.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import] == [OPSET] and model.ir_version == 7
    assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["dequant"]
    op_types = {n.op_type for n in model.graph.node}
    assert op_types <= {"QuantizeLinear", "DequantizeLinear", "Conv", "Relu", "Clip", "Add", "MaxPool", "GlobalAveragePool", "Reshape", "Gemm"}
    assert "BatchNormalization" not in op_types and "Identity" not in op_types
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names)) and "conv1/Conv" in names and "fc/Gemm" in names
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale, zero = constants[node.input[1]], constants[node.input[2]]
            assert not zero.any()
            if node.input[0].endswith("weight_q"):
                assert zero.dtype == np.int8 and scale.ndim == 1 and helper.get_attribute_value(node.attribute[0]) == 0
            elif node.input[0].endswith("bias_q"):
                assert zero.dtype == np.int32 and constants[node.input[0]].dtype == np.int32
            else:
                assert zero.dtype == np.int8 and scale.shape == ()
    input_quantize = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert constants[input_quantize.input[1]] == np.float32(1 / 128)  # the fixed QuantStub scale
    assert {p.key: p.value for p in model.metadata_props}["edgeq.target"] == "npu-s"


def test_chosen_input_and_output_names(functional, tmp_path):
    int_model, example = functional
    to_onnx(int_model, (example,), tmp_path / "f.onnx", input_names=["image"], output_names=["logits", "features"])
    model = onnx.load(str(tmp_path / "f.onnx"))
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits", "features"]
    with pytest.raises(ExportError, match=r"output_names: expected 2 distinct names; got \['logits'\]"):
        to_onnx(int_model, (example,), tmp_path / "g.onnx", output_names=["logits"])


def test_qat_model_is_converted_on_export(tmp_path):
    from models import calibrate

    torch.manual_seed(0)
    example = torch.rand(2, 1, 8, 8)
    prepared = calibrate(SmallCNN().eval(), example, "npu-m", lambda: torch.rand(4, 1, 8, 8))
    to_onnx(prepared, (example,), tmp_path / "q.onnx")
    assert load_onnx(tmp_path / "q.onnx").fits_edgeq_numerics


def test_each_call_of_a_module_is_its_own_op(tmp_path):
    """SPPF calls one max pool three times: three ops, each with a name of its own."""
    torch.manual_seed(0)
    example = torch.randn(2, 8, 16, 16)
    int_model = integer_model(Wrapped(SPPF(8, 8)).eval(), example, "npu-m")
    model = onnx.load(str(to_onnx(int_model, (example,), tmp_path / "sppf.onnx")))
    assert [n.name for n in model.graph.node if n.op_type == "MaxPool"] == [
        "model.m/MaxPool", "model.m_1/MaxPool", "model.m_2/MaxPool"
    ]


def test_loader_recovers_every_tensor_quantization(functional, tmp_path):
    int_model, example = functional
    path = to_onnx(int_model, (example,), tmp_path / "f.onnx")
    qdq = load_onnx(path)
    assert qdq.fits_edgeq_numerics and qdq.target == "npu-m"
    modules = dict(int_model.graph_module.named_modules())
    checked = 0
    for node in int_model.graph_module.graph.nodes:
        path_name = str(node.target) if node.op == "call_module" else node.name
        quant = int_model.tensor_quant.get(node.name)
        if quant is not None and quant.dtype == "int8" and f"{path_name}.q" in qdq.quant:
            recovered = qdq.quant[f"{path_name}.q"]
            assert recovered.scales == tuple(np.float32(s) for s in quant.scales) and recovered.symmetric
            checked += 1
        module = modules.get(node.target) if node.op == "call_module" else None
        if hasattr(module, "weight_scales"):
            weight = qdq.quant[f"{node.target}.weight_q"]
            assert weight.axis == 0 and weight.dtype == "int8"
            assert weight.scales == tuple(float(np.float32(s)) for s in module.weight_scales)
    assert checked >= 10


# ---- ONNX Runtime as a peer ---------------------------------------------------------------------------------------


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


def test_onnx_runtime_int8_probe_needs_more_than_int16_pair_sums():
    """The probe's exact output needs pair sums beyond int16 once ORT shifts int8 activations to u8; a kernel that
    saturates them (vpmaddubsw) gives another output, so the probe tells the two apart."""
    model, x, exact = probe_model()
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    w = weights["w"].astype(np.int64).ravel()
    q = x.astype(np.int64).ravel()
    scale = float(weights["s_out"])
    assert np.abs(q).max() == 127 and np.abs(w).max() == 127
    u8 = q + 128
    pairs = u8.reshape(-1, 2) * w.reshape(-1, 2)
    assert pairs.sum(1).max() > np.iinfo(np.int16).max
    assert exact.ravel()[0] == np.round((q * w).sum() / scale) * scale == 8 * scale
    saturated = np.clip(pairs.sum(1), -(2**15), 2**15 - 1).sum() - 128 * w.sum()
    assert np.round(saturated / scale) * scale != exact.ravel()[0]


def test_onnx_runtime_int8_probe_agrees_with_the_fused_session(tmp_path):
    """ORT's default session fuses the probe into an integer kernel, and the probe's answer is what that kernel
    gives; on x86-64 it is 'not exact' without VNNI (int16 saturation) and 'exact' with it."""
    model, x, exact = probe_model()
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    (got,) = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})
    assert "QLinearConv" in [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert onnx_runtime_int8_is_exact() == np.array_equal(got, exact)
    flags = _cpu_flags()
    if flags & {"avx512_vnni", "avx_vnni"}:
        assert onnx_runtime_int8_is_exact()
    elif "avx2" in flags:
        assert not onnx_runtime_int8_is_exact()


def test_onnx_runtime_peer_path_is_exact_on_the_probe():
    """The session the agreement tests use computes the probe exactly, and keeps the fused kernels where they are."""
    model, x, exact = probe_model()
    path = peer_path()
    (got,) = session(model).run(None, {"x": x})
    np.testing.assert_array_equal(got, exact)
    if onnx_runtime_int8_is_exact():
        assert path.name == "fused" and path.config == () and path.optimized
    else:
        assert path.name in ("fused-u8u8", "float")
        assert path.name == "float" or dict(path.config) == {PRECISE_INT8: "1"}


def test_onnx_runtime_session_threads():
    model, _, _ = probe_model()
    assert session(model, threads=2).get_session_options().intra_op_num_threads == 2
    assert session(model).get_session_options().intra_op_num_threads == 0  # ORT's default: one per physical core


@pytest.mark.flow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0"])
@pytest.mark.parametrize("target", ["npu-m", "npu-s"])
def test_onnx_runtime_agrees_op_by_op(name, target):
    """Each op alone, fed the integer model's exact inputs: ORT requantizes with a float32 multiplier, edgeq with a
    31-bit fixed-point one, both rounding half to even: at most 1 step apart, and rarely at all."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 64, 64)
    int_model = integer_model(torchvision_model(name), example, target)
    differences = per_op_differences(build_onnx(int_model, (example,)), int_model, torch.randn(2, 3, 64, 64))
    assert len(differences) >= 30
    assert max(int(d.max()) for d in differences.values()) <= 1
    fraction = sum(int((d > 0).sum()) for d in differences.values()) / sum(d.size for d in differences.values())
    assert fraction <= 1e-4, fraction


@pytest.mark.flow
@pytest.mark.parametrize(
    "name,target,within_one_step", [("mobilenet_v2", "npu-m", 0.99), ("mobilenet_v2", "npu-s", 1.0), ("resnet18", "npu-s", 1.0)]
)
def test_onnx_runtime_agrees_on_model_outputs(name, target, within_one_step):
    """End to end, differences can propagate and grow (npu-m: mobilenet_v2 99.4-100 % of outputs within one step,
    docs/numerics.md); on power-of-two scales (npu-s) ORT's float products are exact and it computes edgeq's numbers.
    (resnet18 on npu-m: see benchmarks/onnx_runtime_fidelity.py and docs/numerics.md.)"""
    torch.manual_seed(0)
    example = torch.randn(16, 3, 64, 64)
    int_model = integer_model(torchvision_model(name), example, target)
    x = torch.randn(16, 3, 64, 64)
    (output,) = session(build_onnx(int_model, (example,))).run(None, {"x": x.numpy()})
    apart = steps_apart(output, int_model.run_integer(x), int_model.output_quant()[0].scale)
    assert (apart <= 1).mean() >= within_one_step


@pytest.mark.flow
def test_onnx_runtime_agrees_on_the_example_cnn(digits_integer_model):
    """The trained digits CNN on its 540 test images. Its classifier keeps an int32 output, which ORT computes as
    a float Gemm; the two are compared in steps of the int8 scale this output would have had (its range / 127),
    and ORT must pick the same class for every image."""
    int_model, pixels = digits_integer_model
    inputs = (pixels.to(torch.float32) - 128) / 128
    (outputs,) = session(build_onnx(int_model, (inputs,))).run(None, {"pixels": inputs.numpy()})
    exact = int_model(inputs).numpy()
    step = np.abs(exact).max() / 127
    assert (np.abs(outputs - exact) <= step).mean() >= 0.999
    assert np.array_equal(outputs.argmax(1), exact.argmax(1))


# ---- TorchScript --------------------------------------------------------------------------------------------------


def _round_trip(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(module, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)


@pytest.mark.parametrize("which", ["small", "functional"])
def test_torchscript_round_trip_is_exact(which, small, functional):
    int_model, example = small if which == "small" else functional
    loaded = _round_trip(trace(int_model, (example,)))
    x = torch.randn(5, *example.shape[1:])
    for expected, got in zip(as_tuple(int_model(x)), as_tuple(loaded(x))):
        assert torch.equal(expected, got)


def test_torchscript_of_shufflenet_is_exact():
    torch.manual_seed(0)
    example = torch.randn(2, 3, 64, 64)
    int_model = integer_model(torchvision_model("shufflenet_v2_x1_0"), example, "npu-s")
    loaded = _round_trip(trace(int_model, (example,)))
    x = torch.randn(3, 3, 64, 64)
    assert torch.equal(loaded(x), int_model(x))


def test_torchscript_guards_its_assumptions(small):
    int_model, example = small
    loaded = _round_trip(trace(int_model, (example,)))
    with pytest.raises(torch.jit.Error, match=r"edgeq: input 0 has shape \[1, 1, 16, 16\] but the integer model was converted for \[2, 1, 8, 8\]"):
        loaded(torch.rand(1, 1, 16, 16))
    with pytest.raises(torch.jit.Error, match="edgeq: input 0 must be a float tensor"):
        loaded(torch.zeros(1, 1, 8, 8, dtype=torch.int8))


def test_torchscript_file_reads_as_the_same_qdq_model(small, tmp_path):
    int_model, example = small
    save_torchscript(int_model, (example,), tmp_path / "int_model.pt")
    to_onnx(int_model, (example,), tmp_path / "int_model.onnx")
    from_script = load_model_file(tmp_path / "int_model.pt")
    from_onnx = load_model_file(tmp_path / "int_model.onnx")
    assert from_script.model == from_onnx.model and from_script.quant == from_onnx.quant


def test_plain_torch_jit_trace_has_no_description(small, tmp_path):
    int_model, example = small
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(int_model, (example,), check_trace=False), str(tmp_path / "plain.pt"))
    with pytest.raises(ModelFileError,
                       match=r"plain.pt: TorchScript module without edgeq's graph description; trace the integer model with edgeq.export.trace"):
        load_torchscript(tmp_path / "plain.pt")


# ---- files from other tools ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ort_quantized(tmp_path_factory):
    """ONNX Runtime's quantize_static output (QDQ) for resnet18 and mobilenet_v2, two configurations each."""
    import torchvision
    from onnxruntime.quantization import QuantType

    folder = tmp_path_factory.mktemp("ort")
    files = {}
    for name in ("resnet18", "mobilenet_v2"):
        float_path = float_onnx(getattr(torchvision.models, name)().eval(), torch.randn(1, 3, 64, 64), folder / f"{name}.onnx")
        for label, activation, symmetric, per_channel in (("uint8", QuantType.QUInt8, False, False), ("int8", QuantType.QInt8, True, True)):
            files[(name, label)] = ort_quantize_static(float_path, folder / f"{name}-{label}.onnx", random_batches((1, 3, 64, 64)),
                                                       activation, symmetric, per_channel)
    return files


@pytest.mark.flow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_onnx_runtime_quantize_static_files(ort_quantized, name):
    asymmetric = load_onnx(ort_quantized[(name, "uint8")])
    assert not asymmetric.fits_edgeq_numerics and asymmetric.target is None
    assert {f.kind for f in asymmetric.findings} == {"asymmetric_activation"}
    assert "is uint8 with zero point" in asymmetric.findings[0].message
    weights = [q for t, q in asymmetric.quant.items() if t.endswith("weight_quantized")]
    assert weights and all(q.axis is None and q.dtype == "int8" for q in weights)
    symmetric = load_onnx(ort_quantized[(name, "int8")])
    assert symmetric.fits_edgeq_numerics
    weights = [q for t, q in symmetric.quant.items() if t.endswith("weight_quantized")]
    assert weights and all(q.axis == 0 and len(q.scales) > 1 and q.symmetric for q in weights)


# ---- bad files -------------------------------------------------------------------------------------------------


@pytest.fixture()
def good_file(small, tmp_path):
    int_model, example = small
    return to_onnx(int_model, (example,), tmp_path / "good.onnx")


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match=r"absent.onnx: no such file"):
        load_onnx(tmp_path / "absent.onnx")
    with pytest.raises(ModelFileError, match=r"absent.pt: no such file"):
        load_model_file(tmp_path / "absent.pt")


def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file, not a model\n" * 20)
    with pytest.raises(ModelFileError, match=r"notes.onnx: not an ONNX file, or truncated"):
        load_onnx(path)


def test_truncated_file(good_file):
    data = good_file.read_bytes()
    good_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"good.onnx: not an ONNX file, or truncated"):
        load_onnx(good_file)


def test_truncated_torchscript(small, tmp_path):
    int_model, example = small
    path = save_torchscript(int_model, (example,), tmp_path / "m.pt")
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ModelFileError, match=r"m.pt: not a TorchScript file, or truncated"):
        load_torchscript(path)


def edit(path: Path, change) -> Path:
    """Load an ONNX file, apply ``change(model)``, save it back."""
    model = onnx.load(str(path))
    change(model)
    onnx.save(model, str(path))
    return path


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(i for i in model.graph.initializer if i.name == name)


def test_file_failing_the_checker(good_file):
    def disconnect(model):
        next(n for n in model.graph.node if n.op_type == "Conv").input[0] = "nowhere"

    edit(good_file, disconnect)
    with pytest.raises(ModelFileError, match=r"good.onnx: fails the ONNX checker: .*nowhere"):
        load_onnx(good_file)


def test_inconsistent_scales(good_file):
    def rescale_dequantize(model):
        dequantize = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "conv1.q")
        model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, dtype=np.float32), "other.scale"))
        dequantize.input[1] = "other.scale"

    edit(good_file, rescale_dequantize)
    with pytest.raises(ModelFileError, match=r"good.onnx: DequantizeLinear 'conv1.q.dq/DequantizeLinear': quantizes 'conv1.q' with scale \[0.5\]"
                                             r".*'conv1/QuantizeLinear' uses scale .*: inconsistent scales"):
        load_onnx(good_file)


def test_non_positive_scale(good_file):
    edit(good_file, lambda m: _initializer(m, "conv1.q.scale").CopyFrom(
        numpy_helper.from_array(np.array(-0.5, dtype=np.float32), "conv1.q.scale")))
    with pytest.raises(ModelFileError,
                       match=r"good.onnx: QuantizeLinear 'conv1/QuantizeLinear': scale 'conv1.q.scale' is out of range; got -0.5 \(allowed: normal float32"):
        load_onnx(good_file)


def test_bias_at_another_scale_is_a_finding(good_file):
    def triple(model):  # a power-of-two multiple of s_in * s_w would mean the integers times it (test_numerics)
        scale = _initializer(model, "conv1.bias_q.scale")
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 3, "conv1.bias_q.scale"))

    edit(good_file, triple)
    qdq = load_onnx(good_file)
    assert [(f.node, f.kind) for f in qdq.findings] == [("conv1/Conv", "bias_scale")]

    def zero(model):
        bias = _initializer(model, "conv1.bias_q")
        bias.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(bias)), "conv1.bias_q"))

    edit(good_file, zero)
    assert load_onnx(good_file).findings == []  # an all-zero bias joins the accumulator at any scale


# ---- export errors and atomic writes ----------------------------------------------------------------------------


class _FloatTail(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.conv, self.dequant = QuantStub(), nn.Conv2d(3, 4, 1), DeQuantStub()

    def forward(self, x):
        return F.softmax(self.dequant(self.conv(self.quant(x))), dim=1)


def test_float_ops_outside_the_region_are_not_exported(tmp_path):
    example = torch.randn(1, 3, 4, 4)
    int_model = integer_model(_FloatTail().eval(), example, "x86_64")
    path = tmp_path / "tail.onnx"
    with pytest.raises(ExportError, match=r"'softmax' \(.*softmax.*\): float ops outside the QuantStub/DeQuantStub region"):
        to_onnx(int_model, (example,), path)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(small, tmp_path, monkeypatch):
    int_model, example = small
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")

    def broken_save(model, target):
        Path(target).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        to_onnx(int_model, (example,), path)
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_example_inputs_must_be_float(small, tmp_path):
    int_model, example = small
    with pytest.raises(ExportError, match="example input 0 must be a float tensor"):
        to_onnx(int_model, (example.to(torch.int8),), tmp_path / "x.onnx")


def test_qdq_graph_tells_an_unknown_rank_from_a_scalar(tmp_path):
    from edgeq.export.onnx_reader import read_qdq
    from edgeq.export.qdq_graph import QDQGraph

    def info(name, element, shape):
        return helper.make_tensor_value_info(name, element, shape)

    float_ = onnx.TensorProto.FLOAT
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"]), helper.make_node("Relu", ["y"], ["z"]), helper.make_node("Relu", ["s"], ["t"])]
    inputs = [info("x", float_, [2, 3]), info("shape", onnx.TensorProto.INT64, ["K"]), info("s", float_, [])]
    graph = helper.make_graph(nodes, "g", inputs, [info("z", float_, ["a", "b"]), info("t", float_, [])])
    qdq_graph = QDQGraph(read_qdq(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), tmp_path / "m.onnx"))
    assert qdq_graph.static_shape("y") is None  # a reshape to a shape of unknown length: even the rank is unknown
    assert (qdq_graph.static_shape("x"), qdq_graph.static_shape("s"), qdq_graph.static_shape("t")) == ((2, 3), (), ())


class _TableActivations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.hardswish, self.silu, self.leaky, self.gelu = nn.Hardswish(), nn.SiLU(), nn.LeakyReLU(0.1), nn.GELU()
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        y = torch.tanh(self.silu(self.hardswish(x))) + torch.sigmoid(self.leaky(x)) + F.hardsigmoid(x)
        y = y + self.gelu(x) + F.gelu(x, approximate="tanh")
        return self.dequant(y * torch.sigmoid(y) * torch.sigmoid(x.mean((2, 3), keepdim=True)))


def test_onnx_runtime_agrees_on_bilinear_resizes():
    """Each bilinear Resize alone (half_pixel and align_corners, odd sizes, down): ORT interpolates the dequantized
    input in float32, edgeq with 11-bit weights; docs/numerics.md bounds the difference by 1 step."""
    torch.manual_seed(0)
    example = torch.randn(4, 3, 7, 6)
    int_model = integer_model(BilinearResizes().eval(), example, "npu-m")
    model = build_onnx(int_model, (example,))
    modes = {a.s for n in model.graph.node if n.op_type == "Resize" for a in n.attribute if a.name == "coordinate_transformation_mode"}
    assert modes == {b"half_pixel", b"align_corners"}
    differences = per_op_differences(model, int_model, torch.randn(4, 3, 7, 6))
    resizes = [d for name, d in differences.items() if name.startswith(("upsample", "corners"))]
    assert len(resizes) == 6
    assert max(int(d.max()) for d in resizes) <= 1
    assert sum(int((d > 0).sum()) for d in resizes) <= 0.02 * sum(d.size for d in resizes)


@pytest.mark.parametrize("target", ["npu-s", "npu-m"])
def test_onnx_runtime_agrees_on_batchnorm1d(target):
    """BatchNorm1d folded into ``Gemm`` / ``MatMul`` or alone as a depthwise ``Conv`` between ``Reshape``s
    (tests/models.py's BatchNorms1d): ONNX Runtime runs the file; on power-of-two scales (npu-s) it computes the
    integer model's numbers exactly, op by op and end to end, elsewhere each op within docs/numerics.md's 1 step."""
    torch.manual_seed(0)
    example = torch.randn(2, 4, 6)
    int_model = integer_model(with_batchnorm_statistics(BatchNorms1d(), (8, 4, 6)), example, target)
    model = build_onnx(int_model, (example,))
    assert [n.op_type for n in model.graph.node].count("Reshape") == 7
    x = torch.randn(2, 4, 6)
    differences = per_op_differences(model, int_model, x)
    assert len(differences) == 13 and max(int(d.max()) for d in differences.values()) <= (0 if target == "npu-s" else 1)
    if target == "npu-s":
        (output,) = session(model).run(None, {"x": x.numpy()})
        assert steps_apart(output, int_model.run_integer(x), int_model.output_quant()[0].scale).max() == 0


def test_onnx_runtime_agrees_on_table_activations():
    """Each table activation alone, fed every int8 value, and a broadcast product (x * sigmoid(pool(x))): ORT
    evaluates them in float32 (docs/numerics.md states the bound: at most 1 step)."""
    torch.manual_seed(0)
    example = torch.randn(4, 2, 16, 8) * 4
    int_model = integer_model(_TableActivations(), example, "npu-m")
    everything = (torch.arange(-128, 128, dtype=torch.float32) / 32).reshape(1, 2, 16, 8).repeat(4, 1, 1, 1)
    model = build_onnx(int_model, (example,))
    assert {"Sigmoid", "Tanh", "HardSigmoid", "LeakyRelu", "Mul", "Gelu", "FastGelu"} <= {n.op_type for n in model.graph.node}
    differences = per_op_differences(model, int_model, everything)
    tables = [d for name, d in differences.items() if any(f in name for f in ("hardswish", "silu", "leaky", "tanh", "sigmoid", "gelu", "mul"))]
    assert len(tables) >= 11
    assert max(int(d.max()) for d in tables) <= 1
