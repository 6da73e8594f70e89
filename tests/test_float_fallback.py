"""The float fallback: ops with no integer form and modules whose qconfig is None stay float, never silently,
through prepare, convert, export, check, compile and the runtimes; the integer ops around them stay exact."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from models import assert_within_float_region_bound, integer_model
from torch import nn

from edgeq.check import check_model
from edgeq.compile import compile_model
from edgeq.compile.resize_coordinates import with_resize_coordinates_of_onnx
from edgeq.errors import CompileError, UnsupportedOpError
from edgeq.export import to_onnx
from edgeq.export.peer import PEER_PATHS, session
from edgeq.quantization import DeQuantStub, QuantStub, default_calib_qconfig, prepare_qat_fx
from edgeq.quantization.prepare import FloatFallbackWarning
from edgeq.run import run_artifact
from edgeq_runtime import Model


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.gelu = nn.GELU()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.gelu(self.fc(x)))


class TokenMixer(nn.Module):
    """Conv stem, then LayerNorm, attention (integer matmuls) with softmax, a GELU MLP (the GELU an integer table)
    and a float (qconfig None) head with a float GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.qkv = nn.Linear(16, 48)
        self.fc1 = nn.Linear(16, 32)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(32, 16)
        self.head = _Head()
        self.head.qconfig = None
        self.out = nn.Linear(16, 10)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(self.quant(x)))
        x = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        attention = F.softmax(q @ k.transpose(1, 2) / math.sqrt(16), dim=-1)
        x = x + attention @ v
        x = x + self.fc2(self.gelu(self.fc1(x)))
        return self.dequant(self.out(self.head(x)))


EXAMPLE = (torch.randn(2, 3, 4, 4),)
FLOAT_OPS = {"norm": "LayerNorm", "softmax": "softmax", "head.fc": "Linear", "head.gelu": "GELU", "head.act": "ReLU"}


def test_prepare_warns_naming_each_float_op():
    with pytest.warns(FloatFallbackWarning) as caught:
        prepare_qat_fx(TokenMixer(), example_inputs=EXAMPLE, target="npu-m")
    messages = [str(w.message) for w in caught if issubclass(w.category, FloatFallbackWarning)]
    for name, op in FLOAT_OPS.items():
        assert any(m.startswith(f"{op} '{name}'") for m in messages), (name, messages)
    assert any(m.startswith("truediv '") and "not a constant" not in m for m in messages)  # scores / sqrt(16)
    assert not any("matmul" in m for m in messages)  # the products of q, k and attention, v are integer
    assert any("'head.fc': its qconfig is None" in m for m in messages)
    assert not any(m.startswith("GELU 'gelu'") for m in messages)  # the MLP's GELU is a lookup table


@pytest.mark.parametrize("model", [TokenMixer(), nn.Sequential(QuantStub(), nn.LayerNorm(4), DeQuantStub())])
def test_strict_refuses_float_ops_naming_node_and_op(model):
    with pytest.raises(UnsupportedOpError, match=r"LayerNorm '(norm|1)'.*strict=True"):
        prepare_qat_fx(model, example_inputs=(torch.randn(2, 4, 4, 4),) if isinstance(model, nn.Sequential) else EXAMPLE, target="npu-m", strict=True)


def test_qconfig_none_in_the_dict_form_leaves_the_module_float():
    model = nn.Sequential(QuantStub(), nn.Linear(4, 4), nn.Linear(4, 4), DeQuantStub())
    with pytest.warns(FloatFallbackWarning, match=r"Linear '2': its qconfig is None"):
        prepared = prepare_qat_fx(model, {"module_name": {"2": None}}, example_inputs=(torch.randn(2, 4),), target="x86_64")
    assert type(prepared.get_submodule("2")) is nn.Linear


@pytest.fixture(scope="module")
def token_mixer(tmp_path_factory):
    torch.manual_seed(0)
    with pytest.warns(FloatFallbackWarning):
        qconfig = {"": default_calib_qconfig, "module_name": {"head": None}}
        int_model = integer_model(TokenMixer().eval(), EXAMPLE[0], "npu-m", qconfig=qconfig)
    path = to_onnx(int_model, EXAMPLE, tmp_path_factory.mktemp("fallback") / "mixer.onnx")
    return int_model, path


def test_export_writes_dequantize_float_ops_quantize(token_mixer):
    _, path = token_mixer
    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    softmax = next(n for n in graph.node if n.op_type == "Softmax")
    assert softmax.doc_string == "float fallback: softmax 'softmax': edgeq has no integer implementation of this op"
    (consumer,) = [n for n in graph.node if softmax.output[0] in n.input]
    assert consumer.op_type == "QuantizeLinear"  # attention @ v is an integer matmul
    (matmul,) = [n for n in graph.node if consumer.output[0] in {producer[i].input[0] for i in n.input if i in producer}]
    assert matmul.op_type == "MatMul" and not matmul.doc_string
    (quantize,) = [n for n in graph.node if "gelu.out" in n.input]
    assert quantize.op_type == "QuantizeLinear"
    first = next(n for n in graph.node if n.name.startswith("norm/"))
    assert producer[first.input[0]].op_type == "DequantizeLinear"
    assert [(n.op_type, n.domain) for n in graph.node if n.name == "gelu/Gelu"] == [("Gelu", "com.microsoft")]
    assert {n.op_type for n in graph.node if n.name.startswith("head.gelu/")} == {"Div", "Erf", "Add", "Mul"}


@pytest.mark.parametrize("target", ["npu-m", "x86_64"])
def test_check_places_float_ops_on_the_cpu_in_float_with_the_reason(token_mixer, target):
    _, path = token_mixer
    for report in (check_model(path, target=target), check_model(TokenMixer(), EXAMPLE, target=target)):
        nodes = {n.record.name: n for n in report.nodes}
        softmax = [n for name, n in nodes.items() if name.startswith("softmax")]
        head = [n for name, n in nodes.items() if name.startswith("head.fc")]
        assert softmax and head
        for node in softmax + head:
            assert node.where == "CPU (float)" and node.to_dict()["placement"] == "CPU (float)"
        assert "no integer implementation" in softmax[0].reasons[0].message
        assert "its qconfig is None" in head[0].reasons[0].message
        assert {n.where for name, n in nodes.items() if name.startswith("conv")} == {"NPU" if target == "npu-m" else "CPU"}


@pytest.mark.parametrize("target", ["x86_64", "npu-m"])
def test_compiled_float_regions_agree_with_the_integer_model_within_the_bound(token_mixer, target, tmp_path):
    """Both runtimes: the Python runtime within the bound of the integer model, the C++ runtime equal to it."""
    int_model, path = token_mixer
    result = compile_model(int_model, EXAMPLE, target=target, out=tmp_path / "m.edgeq", simulate=True)
    assert "CPU (float)" in {op.placement for op in result.graph.ops}
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 4)
    with Model.load(result.artifact) as model:
        (got,) = model.run(x.numpy(), raw=True).values()
    assert_within_float_region_bound(got, int_model.run_integer(x).numpy())
    np.save(tmp_path / "x.npy", x.numpy())
    run = run_artifact(result.artifact, [str(tmp_path / "x.npy")], tmp_path / "cpp", runtime="cpp", raw=True, say=lambda _: None)
    (cpp,) = run.outputs.values()
    np.testing.assert_array_equal(np.load(cpp), got)


class Resized(nn.Module):
    """A conv, a resize edgeq has no integer form of (it stays float), a conv."""

    def __init__(self, resize: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.resize = resize
        self.out = nn.Conv2d(8, 4, 1)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.out(self.resize(self.conv(self.quant(x)))))


RESIZES = {
    # 7 columns by 1.5 is 10.5: torch's coordinates follow the factor, not the sizes, so no integer form
    "bilinear-x1.5": functools.partial(F.interpolate, scale_factor=1.5, mode="bilinear"),
    "nearest-size": functools.partial(F.interpolate, size=(12, 5), mode="nearest"),
    "nearest-x1.5": functools.partial(F.interpolate, scale_factor=1.5, mode="nearest"),
    "Upsample-bilinear-x1.5": nn.Upsample(scale_factor=1.5, mode="bilinear"),
    # 7 columns by 0.2 is one: torch samples it at the factor's coordinate (column 2), not at column 0
    "bilinear-to-one-column": functools.partial(F.interpolate, scale_factor=(0.5, 0.2), mode="bilinear"),
}


@pytest.mark.parametrize("resize", RESIZES.values(), ids=RESIZES)
def test_exported_resize_computes_as_torch(resize, tmp_path):
    """The QDQ file's float Resize, run by ONNX Runtime as written, gives the integer model's output within the
    bound: its coordinates are torch's (a wrong coordinate mode moves most values by many steps)."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 7)
    with pytest.warns(FloatFallbackWarning, match=r"(interpolate|Upsample) '.*': (upsampling|bilinear resize by)"):
        int_model = integer_model(Resized(resize).eval(), example, "npu-m")
    path = to_onnx(int_model, (example,), tmp_path / "resized.onnx")
    x = torch.randn(2, 3, 8, 7)
    (got,) = session(onnx.load(str(path)), PEER_PATHS["float"]).run(None, {"x": x.numpy()})
    scale = int_model.output_quant()[0].scales[0]
    assert_within_float_region_bound(np.round(got / np.float32(scale)), int_model.run_integer(x).numpy())


@pytest.mark.parametrize("resize", RESIZES.values(), ids=RESIZES)
def test_compiled_resize_by_a_scale_samples_where_torch_does(resize, tmp_path):
    """TVM's importer samples every Resize at the sizes' ratio; a resize by a scale factor that is not it compiles
    to matrix products at the scale's coordinates, and the artifact gives the integer model's output within the
    bound (at the wrong coordinates most values move by many steps)."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 7)
    with pytest.warns(FloatFallbackWarning):
        int_model = integer_model(Resized(resize).eval(), example, "x86_64")
    result = compile_model(int_model, (example,), out=tmp_path / "r.edgeq", progress=lambda _: None)
    x = torch.randn(2, 3, 8, 7)
    with Model.load(result.artifact) as artifact:
        (got,) = artifact.run({"x": x.numpy()}, raw=True).values()
    assert_within_float_region_bound(got, int_model.run_integer(x).numpy())


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(mode="cubic"), "mode 'cubic'"),
        (dict(mode="linear", coordinate_transformation_mode="tf_crop_and_resize"), "coordinate_transformation_mode 'tf_crop_and_resize'"),
        (dict(mode="linear", coordinate_transformation_mode="unheard_of"), "coordinate_transformation_mode 'unheard_of'"),
    ],
)
def test_a_resize_by_scales_the_compiler_cannot_sample_is_a_clear_error(settings, named):
    source = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 7])
    target = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 6, 10])
    scales = onnx.numpy_helper.from_array(np.array([1, 1, 1.5, 1.5], dtype=np.float32), "scales")
    resize = onnx.helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", **settings)
    model = onnx.helper.make_model(onnx.helper.make_graph([resize], "g", [source], [target], [scales]))
    with pytest.raises(CompileError, match=rf"Resize 'up': resizing by scales \[1.0, 1.0, 1.5, 1.5\] .* with {named}, is not supported"):
        with_resize_coordinates_of_onnx(model)


def test_a_bicubic_resize_runs_as_torch_computes_it(tmp_path):
    """Bicubic has a float ONNX form (torch writes it): ONNX Runtime and the compiled artifact run it as torch
    computes it."""
    torch.manual_seed(0)
    example = torch.randn(1, 3, 8, 7)
    with pytest.warns(FloatFallbackWarning):
        int_model = integer_model(Resized(functools.partial(F.interpolate, scale_factor=2, mode="bicubic")).eval(), example, "x86_64")
    path = to_onnx(int_model, (example,), tmp_path / "bicubic.onnx")
    x = torch.randn(1, 3, 8, 7)
    (got,) = session(onnx.load(str(path)), PEER_PATHS["float"]).run(None, {"x": x.numpy()})
    scale = int_model.output_quant()[0].scales[0]
    assert_within_float_region_bound(np.round(got / np.float32(scale)), int_model.run_integer(x).numpy())
    result = compile_model(path, target="x86_64", out=tmp_path / "b.edgeq")
    with Model.load(result.artifact) as artifact:
        (compiled,) = artifact.run({"x": x.numpy()}, raw=True).values()
    assert_within_float_region_bound(compiled, int_model.run_integer(x).numpy())


class ScaledByItsWidth(nn.Module):
    """Attention's ``x * d ** -0.5`` with ``d`` read from the tensor's shape: a number, not a second tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.linear, self.dequant = QuantStub(), nn.Linear(12, 12), DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(self.quant(x))
        return self.dequant(y * (y.shape[-1] ** -0.5))


def test_a_product_with_a_number_computed_from_a_shape_stays_float(tmp_path):
    """The number is not an activation: the product stays float (with its reason) instead of failing at convert,
    the QDQ file carries the number's value for these shapes, and the artifact agrees within the bound."""
    torch.manual_seed(0)
    example = torch.randn(2, 5, 12)
    with pytest.warns(FloatFallbackWarning, match=r"mul '.*': only the product of two quantized tensors"):
        int_model = integer_model(ScaledByItsWidth().eval(), example, "x86_64")
    result = compile_model(int_model, (example,), out=tmp_path / "s.edgeq", progress=lambda _: None)
    x = torch.randn(2, 5, 12)
    with Model.load(result.artifact) as artifact:
        (got,) = artifact.run({"x": x.numpy()}, raw=True).values()
    assert_within_float_region_bound(got, int_model.run_integer(x).numpy())


class Attending(nn.Module):
    """``nn.MultiheadAttention`` between two Linears (self-attention, no masks unless given), left in float."""

    def __init__(self, batch_first: bool, call=lambda attention, x: attention(x, x, x, need_weights=False)[0], key_size: int = 8) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.fc_in, self.fc_out = nn.Linear(8, 8), nn.Linear(8, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=key_size, vdim=key_size)
        self.call = call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc_out(self.call(self.attention, self.fc_in(self.quant(x)))))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
def test_multihead_attention_runs_in_float_within_the_bound(batch_first, tmp_path):
    """Its ONNX form (projections, heads, softmax) in either layout."""
    torch.manual_seed(0)
    example = torch.randn(5, 3, 8)
    with pytest.warns(FloatFallbackWarning, match="MultiheadAttention 'attention'"):
        int_model = integer_model(Attending(batch_first).eval(), example, "x86_64")
    path = to_onnx(int_model, (example,), tmp_path / "a.onnx")
    result = compile_model(path, target="x86_64", out=tmp_path / "a.edgeq")
    for seed in range(3):
        x = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(seed))
        with Model.load(result.artifact) as model:
            (got,) = model.run(x.numpy(), raw=True).values()
        assert_within_float_region_bound(got, int_model.run_integer(x).numpy())


ATTENTION_CALLS = {
    "a mask": (lambda attention, x: attention(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.bool))[0], 8),
    "its weights": (lambda attention, x: attention(x, x, x)[1].sum(-1, keepdim=True) * x, 8),
    "smaller keys": (lambda attention, x: attention(x, x[..., :4], x[..., :4])[0], 4),
}


@pytest.mark.parametrize("call, key_size", ATTENTION_CALLS.values(), ids=ATTENTION_CALLS)
def test_attention_with_masks_weights_or_other_key_sizes_exports_within_the_bound(call, key_size, tmp_path):
    """Every form of attention is written by torch's exporter (a tuple's second item too): ONNX Runtime on the file
    agrees with the integer model within the bound."""
    torch.manual_seed(0)
    example = torch.randn(5, 3, 8)
    with pytest.warns(FloatFallbackWarning):
        int_model = integer_model(Attending(True, call, key_size).eval(), example, "x86_64")
    path = to_onnx(int_model, (example,), tmp_path / "a.onnx")
    x = torch.randn(5, 3, 8)
    (got,) = session(onnx.load(str(path)), PEER_PATHS["float"]).run(None, {"x": x.numpy()})
    scale = int_model.output_quant()[0].scales[0]
    assert_within_float_region_bound(np.round(got / np.float32(scale)), int_model.run_integer(x).numpy())


class GroupNormed(nn.Module):
    """A conv and a GroupNorm of one group (MobileViTv2's), left in float: statistics over every value."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.conv, self.norm, self.dequant = QuantStub(), nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(1, 16), DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.norm(self.conv(self.quant(x))))


def test_a_group_norm_over_many_values_computes_its_statistics_as_torch_does(tmp_path):
    """Mean and variance over 262,144 values of an input off zero, summed in float64 by the compiled artifact
    (edgeq.compile.float_reductions): the region equals the integer model's PyTorch GroupNorm. TVM's float32
    sums moved 1,484 of the values one step."""
    torch.manual_seed(0)
    example = torch.randn(1, 3, 128, 128) + 2
    with pytest.warns(FloatFallbackWarning, match="GroupNorm 'norm'"):
        int_model = integer_model(GroupNormed().eval(), example, "x86_64")
    result = compile_model(int_model, (example,), target="x86_64", out=tmp_path / "g.edgeq", progress=lambda _: None)
    x = torch.randn(1, 3, 128, 128) + 2
    with Model.load(result.artifact) as artifact:
        (got,) = artifact.run(x.numpy(), raw=True).values()
    np.testing.assert_array_equal(got, int_model.run_integer(x).numpy())
