"""compile_model / edgeq compile: bit-exact artifacts on every target, the artifact's contents, the errors."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import tvm
from models import (
    BatchNorms1d,
    BilinearResizes,
    Clamps,
    DataMovement,
    EluBlock,
    FunctionalOps,
    GroupedBlock,
    Pads,
    SmallCNN,
    SqueezeExcitationBlock,
    Wrapped,
    calibrate,
    integer_model,
    torchvision_model,
    with_batchnorm_statistics,
)
from torch import nn
from tvm import relax

from edgeq.cli import main
from edgeq.compile import CompileResult, compile_model, plan_build
from edgeq.compile.codegen import fused_module
from edgeq.compile.cpu_features import dot_product, host_target
from edgeq.errors import CompileError, TargetError
from edgeq.export import to_onnx
from edgeq.export.onnx_reader import load_onnx
from edgeq.export.onnx_writer import build_onnx
from edgeq.quantization import DeQuantStub, FakeQuantState, QuantStub, convert_fx, default_qat_qconfig, prepare_qat_fx, set_fake_quantize
from edgeq.quantization.integer_model import IntegerModel
from edgeq.quantization.prepare import FloatFallbackWarning
from edgeq_runtime import Model


def as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def assert_artifact_exact(artifact, int_model, x: torch.Tensor) -> None:
    """The artifact's raw outputs equal the integer model's, from float inputs (the runtime quantizes them)
    and from raw integer inputs alike."""
    expected = [e.numpy() for e in as_tuple(int_model.run_integer(x))]
    with Model.load(artifact) as model:
        from_float = list(model.run(x.numpy(), raw=True).values())
        raw = int_model.graph_module.quant(x).numpy()
        from_raw = list(model.run(raw, raw=True).values())
        dequantized = list(model.run(x.numpy()).values())
    for e, f, r in zip(expected, from_float, from_raw):
        np.testing.assert_array_equal(f, e)
        np.testing.assert_array_equal(r, e)
        assert f.dtype == e.dtype
    for d, e in zip(dequantized, as_tuple(int_model(x))):
        np.testing.assert_array_equal(d, e.numpy())  # float outputs too: float32(q) * s, bit for bit


@pytest.mark.parametrize("opt_level", [0, 1, 2])
def test_every_optimisation_level_is_exact(opt_level, tmp_path):
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    int_model = integer_model(FunctionalOps().eval(), example, "npu-m")
    result = compile_model(int_model, (example,), out=tmp_path / "f.edgeq", opt_level=opt_level, simulate=True)
    assert result.manifest["opt_level"] == opt_level
    assert_artifact_exact(result.artifact, int_model, torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("target", ["x86_64", "npu-m"])
def test_bilinear_resizes_are_exact(target, tmp_path):
    """Every kind of bilinear resize, lowered to integer gathers and sums (on npu-m's NPU, and on the CPU)."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 7, 6)
    int_model = integer_model(BilinearResizes().eval(), example, target)
    result = compile_model(int_model, (example,), out=tmp_path / "b.edgeq", simulate=True)
    assert [r.placement.value for r in result.partition.regions] == (["CPU"] if target == "x86_64" else ["NPU"])
    assert_artifact_exact(result.artifact, int_model, torch.randn(2, 3, 7, 6))


@pytest.mark.flow
@pytest.mark.parametrize("target", ["x86_64", "npu-s"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small"])
def test_torchvision_models_are_exact(name, target, tmp_path):
    torch.manual_seed(0)
    example = torch.randn(1, 3, 224, 224)
    int_model = integer_model(torchvision_model(name), example, target)
    result = compile_model(int_model, (example,), out=tmp_path / "m.edgeq", simulate=True)
    assert result.arch == "x86_64"  # compile time is a benchmark figure (benchmarks/), not a test
    assert_artifact_exact(result.artifact, int_model, torch.randn(1, 3, 224, 224))
    if target == "npu-s" and name == "resnet18":  # the 7x7 stem falls back: one CPU region, then the NPU
        assert [r.placement.value for r in result.partition.regions] == ["CPU", "NPU"]


@pytest.mark.flow
def test_example_cnn_with_int32_output_is_exact(digits_integer_model, tmp_path):
    int_model, pixels = digits_integer_model
    x = (pixels[:32].to(torch.float32) - 128) / 128
    result = compile_model(int_model, (x,), out=tmp_path / "digits.edgeq", target="npu-m", simulate=True)
    (output,) = result.manifest["outputs"]
    assert output["dtype"] == "int32" and len(output["quant"]["scale"]) == 10 and output["quant"]["axis"] == 1
    assert_artifact_exact(result.artifact, int_model, x)
    with Model.load(result.artifact) as model:
        raw_pixels = (pixels[:32].numpy().astype(np.int16) - 128).astype(np.int8)
        np.testing.assert_array_equal(model.run({"pixels": raw_pixels}, raw=True)["dequant"], int_model.run_integer(x).numpy())


@pytest.mark.parametrize("width", [16, 12])
def test_activations_between_convolutions_are_blocked_exactly(width, tmp_path):
    """The layout plan: conv1's output, read only by conv2's kernel (as its input and as its residual add), is
    stored in blocks of channels by both kernels (12 channels: the last block padded). With 16 channels, whole
    blocks, conv2's output and the max pool's (read by conv3) are blocked too; padded ones stay NCHW there.
    conv3's output (read by the global pool's sum) stays NCHW. The artifact equals the integer model."""
    torch.manual_seed(0)
    example = torch.randn(2, 1, 8, 8)
    int_model = integer_model(SmallCNN(width=width).eval(), example, "x86_64")
    result = compile_model(int_model, (example,), out=tmp_path / "s.edgeq", target="x86_64", simulate=True)
    suffix = f"_nchw{dot_product(host_target()).lanes}c"
    blocked = {op.name: op.kernel.endswith(suffix) for op in result.graph.ops if op.op in ("conv2d", "max_pool2d")}
    whole_blocks = width % dot_product(host_target()).lanes == 0
    assert blocked == {"conv1/Conv": True, "conv2/Conv": True, "pool/MaxPool": whole_blocks, "conv3/Conv": whole_blocks}
    assert result.graph.op("add/Add").kernel == result.graph.op("conv2/Conv").kernel
    assert_artifact_exact(result.artifact, int_model, torch.randn(2, 1, 8, 8))


def test_grouped_block_with_projection_shortcut_is_exact_and_mapped(tmp_path):
    """RegNet's block: the grouped 3x3 (4 channels a group, so 4 groups share a block of output channels) takes
    the conv2d kernel, its tensors blocked between the 1x1 convolutions; the artifact equals the integer model.
    The projection shortcut and the branch's first convolution read the same input: the kernel map places each on
    its own kernel. The projection's kernel ends at its int8 output, blocked (:mod:`edgeq.compile.fusion_patterns`;
    TVM had fused it with the add's float64 term of it), and the branch's last convolution takes the add."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 12, 12)
    int_model = integer_model(with_batchnorm_statistics(GroupedBlock(), (4, 3, 12, 12)), example, "x86_64")
    result = compile_model(int_model, (example,), out=tmp_path / "g.edgeq", target="x86_64", simulate=True)
    assert_artifact_exact(result.artifact, int_model, torch.randn(2, 3, 12, 12))
    kernel = {op.name: op.kernel for op in result.graph.ops}
    assert kernel["c.0/Conv"] == kernel["add/Add"] == kernel["add/Relu"] != kernel["a.0/Conv"] == kernel["a.0/Relu"]
    assert len({kernel["proj.0/Conv"], kernel["a.0/Conv"], kernel["b.0/Conv"], kernel["c.0/Conv"]}) == 4
    assert {k.kernel: k.schedule for k in result.kernels}[kernel["b.0/Conv"]] == "conv2d"
    suffix = f"_nchw{dot_product(host_target()).lanes}c"
    assert kernel["b.0/Conv"].endswith(suffix) and kernel["proj.0/Conv"].endswith(suffix)


def _wide_activations(module) -> list[str]:
    """The tensors with rows and columns that a kernel of ``module`` (fused) writes for another to read, wider than
    int8."""
    wide = []
    for function in module.functions.values():
        if not isinstance(function, relax.Function):
            continue
        values = relax.analysis.get_var2val(function)
        read = {a for v in values.values() if isinstance(v, relax.Call) and v.args and isinstance(v.args[-1], relax.Tuple) for a in v.args[-1].fields}
        for var, value in values.items():
            shape = var.ty.shape.values if isinstance(var.ty, relax.TensorType) and var.ty.shape is not None else []
            spatial = len(shape) == 4 and int(shape[2]) * int(shape[3]) > 1
            if var in read and spatial and str(var.ty.dtype) != "int8":
                wide.append(f"{var.name}: {var.ty.dtype}{[int(d) for d in shape]}")
    return wide


@pytest.mark.parametrize(
    "block", [GroupedBlock, SqueezeExcitationBlock, pytest.param(lambda: SqueezeExcitationBlock(48), id="SqueezeExcitationBlock-48")]
)
def test_kernels_pass_int8_activations(block, tmp_path):
    """Kernels end at their int8 outputs (edgeq.compile.fusion_patterns): fused into the kernel making it, the
    widening that starts a residual add's term, a pool's sum or a product made that kernel write float64 (the
    projection shortcut's term of the add) or int32 (squeeze-and-excitation's input, for its pool and product).
    The artifact equals the integer model (48 channels: the scaling's blocked output fills whole blocks, and its
    epilogue iterates over them, schedules.blocked._vectorize_broadcast)."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 12, 12)
    int_model = integer_model(with_batchnorm_statistics(block(), (4, 3, 12, 12)), example, "x86_64")
    plan = plan_build(int_model, (example,), "x86_64", True, None, lambda _: None)
    assert _wide_activations(fused_module(plan.module, tvm.target.Target(plan.machine.llvm))) == []
    result = compile_model(int_model, (example,), out=tmp_path / "b.edgeq", target="x86_64", simulate=True)
    assert_artifact_exact(result.artifact, int_model, torch.randn(2, 3, 12, 12))


@pytest.mark.flow
def test_shufflenet_alternates_regions_exactly(tmp_path):
    torch.manual_seed(0)
    example = torch.randn(1, 3, 64, 64)
    int_model = integer_model(torchvision_model("shufflenet_v2_x1_0"), example, "npu-s")
    result = compile_model(int_model, (example,), out=tmp_path / "s.edgeq", simulate=True)
    placements = [r.placement.value for r in result.partition.regions]
    assert placements.count("CPU") > 10 and placements.count("NPU") > 10
    # identical regions (a channel shuffle's) run one function; each region's ops have its calls all the same
    assert all(op.calls for op in result.graph.ops if op.op != "reshape")
    assert result.graph.op("transpose_1/Transpose").calls == result.graph.op("transpose/Transpose").calls == [0]
    assert_artifact_exact(result.artifact, int_model, torch.randn(1, 3, 64, 64))


def test_aarch64_artifacts_build(tmp_path):
    torch.manual_seed(0)
    example = torch.rand(1, 1, 8, 8)
    int_model = integer_model(SmallCNN().eval(), example, "npu-s")
    for target in ("aarch64", "npu-s"):
        result = compile_model(int_model, (example,), target=target, out=tmp_path / f"{target}.edgeq")
        library = zipfile.ZipFile(result.artifact).read("model.so")
        assert result.arch == "aarch64" and result.manifest["library"]["arch"] == "aarch64"
        assert library[:4] == b"\x7fELF" and int.from_bytes(library[18:20], "little") == 183  # EM_AARCH64


# ---- third-party QDQ ------------------------------------------------------------------------------------------


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.fc, self.dequant = QuantStub(), nn.Linear(16, 6), DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(self.quant(x)))


@pytest.mark.parametrize("target", ["x86_64", "npu-m"])
def test_tiny_requantization_multiplier_compiles_to_exact_zeros(target, tmp_path):
    """A channel whose factor needs a shift above 62 (ORT's GoogLeNet: 1.3e-11 needs shift 67) is exactly the zero
    point wherever its accumulator bound proves it (docs/numerics.md section 4); the other channels are unchanged."""
    torch.manual_seed(0)
    example = torch.randn(4, 16)
    int_model = integer_model(_Classifier().eval(), example, target)
    model = onnx.load(str(to_onnx(int_model, (example,), tmp_path / "c.onnx")))
    initializers = {i.name: i for i in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    input_scale = float(onnx.numpy_helper.to_array(initializers[producers[gemm.input[0]].input[1]]))

    def scales(tensor: str) -> tuple[onnx.TensorProto, np.ndarray]:
        initializer = initializers[producers[tensor].input[1]]
        return initializer, onnx.numpy_helper.to_array(initializer).copy()

    (weight_init, weight_scales), (bias_init, bias_scales) = scales(gemm.input[1]), scales(gemm.input[2])
    weight_scales[3] = 1e-12
    bias_scales[3] = np.float32(input_scale * np.float32(1e-12))
    weight_init.CopyFrom(onnx.numpy_helper.from_array(weight_scales, weight_init.name))
    bias_init.CopyFrom(onnx.numpy_helper.from_array(bias_scales, bias_init.name))
    onnx.save(model, str(tmp_path / "tiny.onnx"))

    result = compile_model(tmp_path / "tiny.onnx", target=target, out=tmp_path / "tiny.edgeq", simulate=True)
    x = torch.randn(4, 16)
    expected = int_model.run_integer(x).numpy().copy()
    expected[:, 3] = 0
    assert expected[:, [0, 1, 2, 4, 5]].any()
    with Model.load(result.artifact) as runtime:
        np.testing.assert_array_equal(runtime.run(x.numpy(), raw=True)[runtime.outputs[0].name], expected)
    if target == "npu-m":
        with zipfile.ZipFile(result.artifact) as archive:
            (region,) = json.loads(archive.read("npu_program.json"))["regions"]
        requantization = region["ops"][0]["requantization"]
        assert requantization["per"] == "channel"
        assert (requantization["multiplier"][3], requantization["shift"][3]) == (0, 62)
        assert all(m >= 2**30 for i, m in enumerate(requantization["multiplier"]) if i != 3)


class _SwishNet(nn.Module):
    """Conv-BN-Hardswish, Conv-SiLU, SiLU written as x * sigmoid(x), GELU and its tanh form, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish()
        self.conv2, self.act2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.SiLU()
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(16, 10)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.bn1(self.conv1(self.quant(x))))))
        x = self.conv3(x)
        x = x * torch.sigmoid(x)
        x = F.gelu(self.gelu(x), approximate="tanh")
        return self.dequant(self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


def test_qat_with_table_activations_compiles_exactly(tmp_path):
    """prepare -> calibrate -> QAT -> convert -> to_onnx -> compile x86_64: the artifact equals the integer model."""
    torch.manual_seed(0)
    example = torch.randn(8, 1, 8, 8)
    model = _SwishNet()
    calib = calibrate(model.eval(), example, "x86_64", lambda: torch.randn(8, 1, 8, 8))
    qat = prepare_qat_fx(model.train(), default_qat_qconfig, example_inputs=(example,), target="x86_64")
    qat.load_state_dict(calib.state_dict())
    set_fake_quantize(qat, FakeQuantState.QAT)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    for _ in range(3):
        loss = F.cross_entropy(qat(torch.randn(8, 1, 8, 8)), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qat.eval()
    int_model = convert_fx(qat)
    ops = [type(m).__name__ + ":" + m.op.value for m in int_model.graph_module.modules() if hasattr(m, "table")]
    assert ops == [f"IntLookupTable:{op}" for op in ("hardswish", "silu", "silu", "gelu", "gelu_tanh")]
    onnx_path = to_onnx(int_model, (example,), tmp_path / "swish.onnx")
    result = compile_model(onnx_path, target="x86_64", out=tmp_path / "swish.edgeq")
    assert result.module.script().count("R.take(") == 5  # each activation lowered to a table gather
    for table in [op for op in result.graph.ops if op.op in ("hardswish", "silu", "gelu", "gelu_tanh")]:  # in the producer's epilogue
        assert "lookup" in table.kernel and table.kernel == result.graph.op(result.graph.tensors[table.inputs[0]].producer).kernel
    assert_artifact_exact(result.artifact, int_model, torch.randn(8, 1, 8, 8))


def test_table_activations_run_on_npus_that_have_tables(tmp_path):
    torch.manual_seed(0)
    example = torch.randn(2, 1, 8, 8)
    for target, placement in (("npu-m", "NPU"), ("npu-s", "CPU")):
        int_model = integer_model(_SwishNet().eval(), example, target)
        result = compile_model(int_model, (example,), target=target, out=tmp_path / f"{target}.edgeq", simulate=True)
        tables = [n for n in result.report.nodes if n.record.op in ("hardswish", "silu", "gelu", "gelu_tanh")]
        assert len(tables) == 5 and {n.placement.value for n in tables} == {placement}
        if target == "npu-s":
            assert tables[0].reasons[0].rule == "op_not_on_npu" and "relu6" in tables[0].advice[0]
        assert_artifact_exact(result.artifact, int_model, torch.randn(2, 1, 8, 8))


def compiled_for(int_model: IntegerModel, example: torch.Tensor, target: str, tmp_path: Path) -> CompileResult:
    """``int_model`` compiled for ``target`` into ``tmp_path``, an NPU target's regions as their simulation."""
    return compile_model(int_model, (example,), target=target, out=tmp_path / f"{target}.edgeq", simulate=target != "x86_64")


def test_elu_compiles_exactly_as_a_table(tmp_path):
    """ONNX ``Elu`` (TVM imports it as ``-alpha * relu(1 - exp(x)) + relu(x)``) lowers to a gather from the same
    table: on npu-m's NPU, on npu-s's host (its NPU has no tables) and on x86_64, equal to the integer model."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    for target, placement in (("npu-m", "NPU"), ("npu-s", "CPU"), ("x86_64", "CPU")):
        int_model = integer_model(EluBlock().eval(), example, target)
        result = compiled_for(int_model, example, target, tmp_path)
        tables = [n for n in result.report.nodes if n.record.op == "elu"]
        assert [n.record.attrs.alpha for n in tables] == [1.0, 0.5] and {n.placement.value for n in tables} == {placement}
        assert result.module.script().count("R.take(") == 2
        if target == "npu-s":
            assert tables[0].reasons[0].rule == "op_not_on_npu" and tables[0].advice == ["elu is not on npu-s: relu is"]
        assert_artifact_exact(result.artifact, int_model, torch.randn(2, 3, 8, 8))


def test_hardtanh_and_clamps_compile_exactly(tmp_path):
    """Hardtanh and clamps (ONNX ``Clip`` at the quantized bounds) lower to relu's integer clamp, on the NPUs and
    x86_64, equal to the integer model."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    for target in ("x86_64", "npu-m", "npu-s"):
        int_model = integer_model(Clamps().eval(), example, target)
        result = compiled_for(int_model, example, target, tmp_path)
        clamps = [n for n in result.report.nodes if n.record.op == "relu" and n.record.onnx_op in ("Clip", "Relu")]
        assert [n.record.onnx_op for n in clamps] == ["Clip"] * 5 + ["Relu"] * 2  # the fused clamp and ReLU6 at 0, 127
        assert {n.placement.value for n in clamps} == {"CPU" if target == "x86_64" else "NPU"}
        assert result.module.script().count("call_tir(cls.maximum") == 0
        assert_artifact_exact(result.artifact, int_model, torch.randn(2, 3, 8, 8))


def test_pads_compile_to_integer_pads_exactly(tmp_path):
    """ONNX ``Pad`` of constant zeros (every spelling of tests/models.py's Pads) lowers to a pad of the integers
    with the zero point, on the host of every target (no NPU lists pad), equal to the integer model."""
    torch.manual_seed(0)
    example = torch.randn(2, 4, 7, 7)
    for target in ("x86_64", "npu-m", "npu-s"):
        int_model = integer_model(Pads().eval(), example, target)
        result = compiled_for(int_model, example, target, tmp_path)
        pads = [n for n in result.report.nodes if n.record.op == "pad"]
        assert len(pads) == 6 and {n.placement.value for n in pads} == {"CPU"}
        assert result.module.script().count('dtype="int8") = R.nn.pad(') == 6
        assert_artifact_exact(result.artifact, int_model, torch.randn(2, 4, 7, 7))


def test_batchnorm1d_compiles_exactly(tmp_path):
    """tests/models.py's BatchNorms1d: the BatchNorm1d folded into linear layers are ONNX ``Gemm``s, the three
    alone depthwise 1x1 ``Conv``s between ``Reshape``s (on the NPU of npu-m and npu-s), equal to the integer model."""
    torch.manual_seed(0)
    example = torch.randn(2, 4, 6)
    model = with_batchnorm_statistics(BatchNorms1d(), (8, 4, 6))
    for target in ("x86_64", "npu-m", "npu-s"):
        int_model = integer_model(model, example, target)
        result = compiled_for(int_model, example, target, tmp_path)
        ops = [n.record.op for n in result.report.nodes]
        assert ops.count("linear") == 3 and ops.count("conv2d") == 3 and ops.count("reshape") == 7
        if target != "x86_64":
            assert {n.placement.value for n in result.report.nodes} == {"NPU"}
        assert_artifact_exact(result.artifact, int_model, torch.randn(2, 4, 6))


def test_data_movement_compiles_exactly(tmp_path):
    """tests/models.py's DataMovement (window partitions, roll as Slice + Concat, a roll of the flattened tensor as
    the same between two Reshapes, unbind as Split + Reshape, narrow, split with sizes, constant indexing, chunks
    swapped by a slice of their tuple) on x86_64 and the NPU targets, equal to the integer model."""
    torch.manual_seed(0)
    example = torch.randn(2, 4, 8, 8)
    for target in ("x86_64", "npu-m", "npu-s"):
        int_model = integer_model(DataMovement().eval(), example, target)
        result = compiled_for(int_model, example, target, tmp_path)
        ops = [n.record.op for n in result.report.nodes]
        assert ops.count("split") == 3 and ops.count("concat") == 8 and ops.count("transpose") == 3
        assert_artifact_exact(result.artifact, int_model, torch.randn(2, 4, 8, 8))


class FlattenedRoll(nn.Module):
    """A roll of the flattened tensor between two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.roll(self.conv(x), shifts=-29))


def test_a_roll_of_the_flattened_tensor_is_integer_and_the_artifact_equals(tmp_path):
    """``torch.roll`` without dims moves the integers (nothing falls back to float): the QDQ file rolls the tensor
    Reshaped to one axis (a Concat of two Slices) and Reshapes it back, and the x86_64 artifact equals the integer
    model."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatFallbackWarning)
        int_model = integer_model(Wrapped(FlattenedRoll()).eval(), example, "x86_64")
    path = to_onnx(int_model, (example,), tmp_path / "m.onnx")
    moved = [n.op_type for n in onnx.load(str(path)).graph.node if n.op_type in ("Reshape", "Slice", "Concat")]
    assert moved == ["Reshape", "Slice", "Slice", "Concat", "Reshape"]
    result = compile_model(path, target="x86_64", out=tmp_path / "m.edgeq")
    assert_artifact_exact(result.artifact, int_model, torch.randn(2, 3, 6, 6))


def test_relu6_below_127_levels_compiles_exactly(tmp_path):
    """A ReLU6 whose activation scale puts 6.0 below 127 levels is written as ONNX ``Clip`` (opset 13: TVM imports it
    as ``maximum`` / ``minimum`` kernels) and lowers to the integer clamp, on x86_64 and on npu-m's NPU, equal to the
    integer model."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    model = Wrapped(nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.ReLU6())).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(30)  # conv outputs far beyond 6: the ReLU6 ceiling is a few levels
    for target in ("x86_64", "npu-m"):
        int_model = integer_model(model, example, target)
        result = compiled_for(int_model, example, target, tmp_path)
        clamps = [n for n in result.report.nodes if n.record.op == "relu"]
        assert [(n.record.onnx_op, n.placement.value) for n in clamps] == [("Clip", "CPU" if target == "x86_64" else "NPU")]
        script = result.module.script()
        assert "call_tir(cls.maximum" not in script and "call_tir(cls.minimum" not in script
        assert_artifact_exact(result.artifact, int_model, torch.randn(2, 3, 8, 8))


def _gelu_file(int_model, example, rewrite) -> onnx.ModelProto:
    """The integer model's QDQ file with each GELU node changed by ``rewrite(node)``."""
    model = build_onnx(int_model, (example,))
    for node in model.graph.node:
        if node.op_type in ("Gelu", "FastGelu"):
            rewrite(node)
    return model


def _as_onnx_gelu(node: onnx.NodeProto) -> None:
    """ONNX's own Gelu of opset 20 (``approximate``) instead of ONNX Runtime's Gelu / FastGelu."""
    if node.op_type == "FastGelu":
        node.attribute.append(onnx.helper.make_attribute("approximate", "tanh"))
    node.op_type, node.domain = "Gelu", ""


def test_onnx_gelu_of_opset_20_compiles_exactly(tmp_path):
    """A file with ONNX's own ``Gelu`` (opset 20; TVM imports it as ``nn.gelu`` / ``nn.gelu_tanh``) is read as the same
    two tables and compiles to the integer model's numbers."""
    torch.manual_seed(0)
    example = torch.randn(2, 1, 8, 8)
    int_model = integer_model(_SwishNet().eval(), example, "x86_64")
    model = _gelu_file(int_model, example, _as_onnx_gelu)
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", 20))
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    onnx.save(model, str(tmp_path / "gelu20.onnx"))
    result = compile_model(tmp_path / "gelu20.onnx", target="x86_64", out=tmp_path / "gelu20.edgeq")
    assert [n.record.op for n in result.report.nodes if n.record.onnx_op == "Gelu"] == ["gelu", "gelu_tanh"]
    assert result.module.script().count("R.take(") == 5
    assert_artifact_exact(result.artifact, int_model, torch.randn(2, 1, 8, 8))


def test_fast_gelu_with_a_bias_is_not_a_table(tmp_path):
    """``FastGelu(x, bias)`` is ``gelu_tanh(x + bias)``, not a function of one int8 tensor: a finding, an op edgeq does
    not know (on the CPU, in TVM's float), never a table."""
    torch.manual_seed(0)
    example = torch.randn(2, 1, 8, 8)
    int_model = integer_model(_SwishNet().eval(), example, "x86_64")

    def add_bias(node: onnx.NodeProto) -> None:
        if node.op_type == "FastGelu":
            node.input.append("bias")

    model = _gelu_file(int_model, example, add_bias)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.full(4, 0.25, np.float32), "bias"))
    onnx.save(model, str(tmp_path / "biased.onnx"))
    qdq = load_onnx(tmp_path / "biased.onnx")
    assert [(f.op_type, f.message) for f in qdq.findings] == [("FastGelu", "FastGelu with a bias input has no integer implementation in edgeq")]
    result = compile_model(tmp_path / "biased.onnx", target="x86_64", out=tmp_path / "biased.edgeq")
    (node,) = [n for n in result.report.nodes if n.record.onnx_op == "FastGelu"]
    assert node.record.op == "fastgelu" and node.where == "CPU"
    assert result.module.script().count("R.take(") == 4


class _SqueezeExcite(nn.Module):
    """A squeeze-and-excitation block: x * sigmoid(fc(pool(x))), the product broadcast over H and W."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.conv = QuantStub(), nn.Conv2d(3, 8, 3, padding=1)
        self.reduce, self.expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(self.quant(x)))
        scale = torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return self.dequant(x * scale)


@pytest.mark.parametrize("target,placement", [("x86_64", "CPU"), ("npu-m", "NPU"), ("npu-s", "CPU")])
def test_squeeze_and_excitation_is_exact(target, placement, tmp_path):
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    int_model = integer_model(_SqueezeExcite().eval(), example, target)
    result = compile_model(int_model, (example,), target=target, out=tmp_path / "se.edgeq", simulate=True)
    (mul,) = [n for n in result.report.nodes if n.record.op == "mul"]
    assert mul.placement.value == placement
    assert_artifact_exact(result.artifact, int_model, torch.randn(2, 3, 8, 8))


# ---- the artifact ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory):
    torch.manual_seed(0)
    example = torch.rand(2, 1, 8, 8)
    int_model = integer_model(SmallCNN().eval(), example, "npu-s")
    path = tmp_path_factory.mktemp("artifact") / "small.edgeq"
    return compile_model(int_model, (example,), out=path, simulate=True), int_model


def test_weights_in_constant_nodes_are_read_as_constants(small_artifact, tmp_path):
    """Some exporters write weights and scales as Constant nodes instead of initializers: same placement, same
    numbers."""
    _, int_model = small_artifact
    example = torch.rand(2, 1, 8, 8)
    model = onnx.load(str(to_onnx(int_model, (example,), tmp_path / "s.onnx")))
    constants = [onnx.helper.make_node("Constant", [], [i.name], value=i) for i in model.graph.initializer]
    _assert_compiles_alike(model, [], constants, small_artifact, example, tmp_path)


def _assert_compiles_alike(model, initializers, constants, small_artifact, example, tmp_path) -> None:
    """``model`` with only ``initializers`` and the ``constants`` nodes first: placed and computing as the
    reference."""
    reference, int_model = small_artifact
    nodes = [*constants, *model.graph.node]
    del model.graph.initializer[:], model.graph.node[:]
    model.graph.initializer.extend(initializers)
    model.graph.node.extend(nodes)
    onnx.save(model, str(tmp_path / "constants.onnx"))
    result = compile_model(tmp_path / "constants.onnx", out=tmp_path / "c.edgeq", simulate=True)
    placed = [(n.record.name, n.record.inputs, n.placement) for n in result.report.nodes]
    assert placed == [(n.record.name, n.record.inputs, n.placement) for n in reference.report.nodes]
    assert_artifact_exact(result.artifact, int_model, example)


def test_scales_and_shapes_in_number_constant_nodes_are_read(small_artifact, tmp_path):
    """Scalar scales as Constant ``value_float`` and int64 shapes as ``value_ints`` (a Constant's number forms):
    read as the same constants, same placement, same numbers."""
    _, int_model = small_artifact
    example = torch.rand(2, 1, 8, 8)
    model = onnx.load(str(to_onnx(int_model, (example,), tmp_path / "s.onnx")))
    forms = {"value_float": [], "value_ints": []}
    kept, constants = [], []
    for initializer in model.graph.initializer:
        values = onnx.numpy_helper.to_array(initializer)
        if values.dtype == np.float32 and values.ndim == 0:
            forms["value_float"].append(initializer.name)
            constants.append(onnx.helper.make_node("Constant", [], [initializer.name], value_float=float(values)))
        elif values.dtype == np.int64 and values.ndim == 1:
            forms["value_ints"].append(initializer.name)
            constants.append(onnx.helper.make_node("Constant", [], [initializer.name], value_ints=values.tolist()))
        else:
            kept.append(initializer)
    assert all(forms.values()), forms
    _assert_compiles_alike(model, kept, constants, small_artifact, example, tmp_path)


def test_linear_over_more_axes_compiles_exactly(tmp_path):
    """A linear layer over a 4-D tensor is a MatMul and a bias Add in ONNX, one op for the check and the compiler."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 5, 5)
    int_model = integer_model(Wrapped(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Linear(5, 6), nn.ReLU())).eval(), example, "npu-m")
    result = compile_model(int_model, (example,), out=tmp_path / "l.edgeq", simulate=True)
    assert [r.nodes for r in result.partition.regions] == [["model.0/Conv", "model.1/MatMul", "model.1/Relu"]]
    assert_artifact_exact(result.artifact, int_model, example)


def test_artifact_contents(small_artifact):
    result, int_model = small_artifact
    archive = zipfile.ZipFile(result.artifact)
    names = [i.filename for i in archive.infolist()]
    assert names == ["manifest.json", "model.so", "npu_program.json", "graph.json", "check.json"]
    assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist())
    manifest = json.loads(archive.read("manifest.json"))
    assert manifest["schema_version"] == 2 and manifest["edgeq_version"] and manifest["tvm_version"].startswith("0.27")
    assert manifest["target"] == {"name": "npu-s", "kind": "npu", "host": "aarch64"}
    assert manifest["npu_execution"] == "simulated"
    assert manifest["inputs"] == [
        {"name": "x", "file": "x", "shape": [2, 1, 8, 8], "dtype": "int8", "quant": {"scale": [1 / 128], "zero_point": [0], "axis": None},
         "quantizer": "quantize_input0"}
    ]
    features = manifest["library"]["cpu_features"]  # simulated: this machine's CPU, every x86-64 one has SSE4.2
    assert manifest["library"]["arch"] == "x86_64" and "sse4_2" in features and features == sorted(features)
    assert manifest["placement"]["verdict"] == "NPU-ready: every op runs on npu-s"
    import hashlib

    for name in names[1:]:
        assert manifest["members"][name]["sha256"] == hashlib.sha256(archive.read(name)).hexdigest()
    program = json.loads(archive.read("npu_program.json"))
    (region,) = program["regions"]
    conv = next(op for op in region["ops"] if op["name"] == "conv1/Conv")
    module = int_model.graph_module.conv1
    assert conv["requantization"]["multiplier"] == module.multiplier.tolist()
    assert conv["requantization"]["shift"] == module.shift.tolist()
    plan = region["memory_plan"]
    assert plan["arena_fits_sram"] and plan["activation_arena_bytes"] >= max(t["bytes"] for t in plan["tensors"])
    graph = json.loads(archive.read("graph.json"))
    assert {op["placement"] for op in graph["ops"]} == {"NPU"}
    assert graph["tensors"]["quant.q"]["consumers"] == ["conv1/Conv"] and graph == result.graph.to_dict()


def test_memory_plan_never_overlaps_live_tensors(small_artifact):
    result, _ = small_artifact
    program = json.loads(zipfile.ZipFile(result.artifact).read("npu_program.json"))
    tensors = program["regions"][0]["memory_plan"]["tensors"]
    for a in tensors:
        for b in tensors:
            if a is not b and a["first_op"] <= b["last_op"] and b["first_op"] <= a["last_op"]:
                assert a["offset"] + a["bytes"] <= b["offset"] or b["offset"] + b["bytes"] <= a["offset"]


def test_compiled_graph_is_inspectable_after_compile(small_artifact):
    result, _ = small_artifact
    script = result.module.script()
    assert "R.nn.conv2d" in script and "out_dtype=\"int32\"" in script and "def region0_npu" in script
    assert result.report.summary.ops == 11 and result.partition.regions[0].name == "region0_npu"


# ---- errors -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    torch.manual_seed(0)
    example = torch.rand(2, 1, 8, 8)
    return to_onnx(integer_model(SmallCNN().eval(), example, "npu-s"), (example,), tmp_path_factory.mktemp("onnx") / "s.onnx")


def test_unknown_target_lists_the_known_ones(small_onnx, tmp_path):
    with pytest.raises(TargetError, match="unknown target 'npu-x'; known targets: aarch64, ethos-u55-128, ethos-u65-256, ethos-u85-256, npu-m, npu-s, x86_64"):
        compile_model(small_onnx, target="npu-x", out=tmp_path / "x.edgeq")


def test_a_model_without_a_recorded_target_needs_one(small_onnx, tmp_path):
    model = onnx.load(str(small_onnx))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "foreign.onnx"))
    with pytest.raises(TargetError, match=r"foreign.onnx: the model records no target; name one \(target='npu-s'"):
        compile_model(tmp_path / "foreign.onnx", out=tmp_path / "f.edgeq")
    assert not (tmp_path / "f.edgeq").exists()


def test_unsupported_op_on_a_cpu_target_names_node_and_op(small_onnx, tmp_path):
    from onnx import helper

    model = onnx.load(str(small_onnx))
    model.graph.node.append(helper.make_node("Celu", [model.graph.output[0].name], ["extra"], name="extra/Celu"))
    model.graph.output[0].name = "extra"
    onnx.save(model, str(tmp_path / "celu.onnx"))
    with pytest.raises(CompileError, match="Celu 'extra/Celu' cannot run on x86_64: Celu has no converter in TVM's ONNX frontend"):
        compile_model(tmp_path / "celu.onnx", target="x86_64", out=tmp_path / "c.edgeq")
    assert not (tmp_path / "c.edgeq").exists()


def test_an_artifact_is_not_a_model(small_artifact, tmp_path):
    from edgeq.errors import ModelFileError

    with pytest.raises(ModelFileError, match=r"small.edgeq: an edgeq artifact \(already compiled\)"):
        compile_model(small_artifact[0].artifact, out=tmp_path / "again.edgeq")


def test_float_model_is_refused(tmp_path):
    with pytest.raises(CompileError, match="SmallCNN is not quantized yet"):
        compile_model(SmallCNN(), (torch.rand(1, 1, 8, 8),), target="npu-s", out=tmp_path / "f.edgeq")


def test_unknown_optimisation_level(small_onnx, tmp_path):
    with pytest.raises(CompileError, match=r"optimisation level 3 is unknown \(allowed: 0, 1, 2\)"):
        compile_model(small_onnx, opt_level=3, out=tmp_path / "o.edgeq")


def test_missing_cross_compiler_is_explained(small_onnx, tmp_path, monkeypatch):
    import shutil

    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name.startswith("aarch64") else real_which(name))
    with pytest.raises(CompileError, match=r"needs the cross compiler aarch64-linux-gnu-g\+\+.*--simulate"):
        compile_model(small_onnx, target="aarch64", out=tmp_path / "a.edgeq")
    assert not (tmp_path / "a.edgeq").exists()


def test_simulation_needs_a_known_build_machine(small_onnx, tmp_path, monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    with pytest.raises(CompileError, match="simulation needs an x86_64 or aarch64 build machine; this one is riscv64"):
        compile_model(small_onnx, simulate=True, out=tmp_path / "r.edgeq")
    assert not (tmp_path / "r.edgeq").exists()


def test_dynamic_input_needs_a_shape(tmp_path):
    torch.manual_seed(0)
    int_model = integer_model(Wrapped(nn.Conv2d(3, 4, 1)).eval(), torch.randn(1, 3, 4, 4), "x86_64")
    path = to_onnx(int_model, (torch.randn(1, 3, 4, 4),), tmp_path / "d.onnx")
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(model, str(path))
    with pytest.raises(CompileError, match=r"input 'x' has no static shape \(\[-1, 3, 4, 4\]\); give it one"):
        compile_model(path, out=tmp_path / "d.edgeq", simulate=True)
    result = compile_model(path, out=tmp_path / "d.edgeq", simulate=True, input_shapes={"x": [1, 3, 4, 4]})
    assert result.manifest["inputs"][0]["shape"] == [1, 3, 4, 4]
    with pytest.raises(CompileError, match=r"the model has no input 'y' \(inputs: x\)"):
        compile_model(path, out=tmp_path / "d.edgeq", simulate=True, input_shapes={"y": [1]})
    with pytest.raises(CompileError, match=r"--input-shape x: 3 dimensions given; the input has 4"):
        compile_model(path, out=tmp_path / "d.edgeq", simulate=True, input_shapes={"x": [3, 4, 4]})


# ---- the command line ---------------------------------------------------------------------------------------------


def test_command_line_compile(small_onnx, tmp_path, capsys):
    out = tmp_path / "cli.edgeq"
    assert main(["compile", str(small_onnx), "-o", str(out), "-O", "1", "--simulate"]) == 0
    printed = capsys.readouterr().out
    assert "import region0_npu" in printed and "lower to integers" in printed and "NPU execution is simulated" in printed and "compile time:" in printed
    assert json.loads(zipfile.ZipFile(out).read("manifest.json"))["opt_level"] == 1
    assert main(["compile", str(small_onnx), "--target", "npu-x", "-o", str(out)]) == 1
    assert "known targets: aarch64, ethos-u55-128, ethos-u65-256, ethos-u85-256, npu-m, npu-s, x86_64" in capsys.readouterr().err
