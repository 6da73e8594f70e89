"""The float fallback's one general path: ops edgeq has no integer form of and had no hand-written float form of
(flip, reflect padding, a lower triangle, einsum, cumsum, topk, sort, a function of the user's own...) are exported
by torch's ONNX exporter, placed CPU (float) by check with their reason, compiled for x86_64, and the artifact agrees
with ONNX Runtime on the same file within the float fallback's bound (docs/numerics.md)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from models import Wrapped, assert_within_float_region_bound, integer_model
from torch import nn

from edgeq.check import check_model
from edgeq.compile import compile_model
from edgeq.errors import CompileError
from edgeq.export import to_onnx
from edgeq.export.peer import PEER_PATHS, session
from edgeq.quantization import DeQuantStub, QuantStub
from edgeq.quantization.prepare import FloatFallbackWarning
from edgeq_runtime import Model


def _arc_tangent_gate(x: torch.Tensor) -> torch.Tensor:
    """A function of the user's own: arithmetic edgeq has no op for."""
    return torch.atan(x) * x


OPS = {
    "flip": lambda x: torch.flip(x, dims=(3,)),
    "pad-reflect": lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect"),
    "tril": lambda x: torch.tril(x),
    "einsum": lambda x: torch.einsum("bchw,bcwk->bchk", x, x.transpose(2, 3)),
    "cumsum": lambda x: x.cumsum(dim=3),
    "topk": lambda x: torch.topk(x, 4, dim=3)[0],
    "custom-function": _arc_tangent_gate,
    "sort": lambda x: torch.sort(x, dim=3)[0],
    "argsort": lambda x: x * torch.argsort(x, dim=2, descending=True).float(),
    "topk-of-a-shape": lambda x: torch.topk(x, x.shape[3] // 2, dim=3)[0],
    "tile": lambda x: torch.tile(x[:, :, :3], (1, 1, 2, 1)),
    "group-norm": lambda x: F.group_norm(x, 2),
    "unflatten": lambda x: torch.atan(x).flatten(2).unflatten(2, (6, 6)),
    "local-response-norm": lambda x: F.local_response_norm(x, 2),
    "channel-shuffle": lambda x: F.channel_shuffle(x, 2),
    "nearest-exact": lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest-exact"),
    "diag-embed": lambda x: torch.diag_embed(x[:, :, 0]),
    "min-values": lambda x: x - torch.min(x, dim=3, keepdim=True).values,
    "index-with-a-tensor": lambda x: x[:, :, torch.tensor([3, 0, 5, 1, 1, 2])],
}
"""Ops torch writes with shape arithmetic (``Shape`` -> ``Gather`` / ``Slice`` / ``Concat``, an ``If`` on a shape)
too: ``sort``'s and ``argsort``'s ``TopK`` take their ``k`` from the input's shape, GroupNorm and ``unflatten``
``Reshape`` to a shape computed from the input's, ``tile`` and LocalResponseNorm branch on a shape. torch's
exporter writes ``channel_shuffle``, ``nearest-exact`` and ``diag_embed`` only as their decompositions into core
ATen ops; ``.values`` is an output of the float ``min``; indexing with a tensor is a float gather."""

SWEEP = {
    "gather": lambda x: torch.gather(x, 3, torch.argsort(x, dim=3)),
    "index-select": lambda x: torch.index_select(x, 3, torch.tensor([3, 0, 5, 1, 1, 2])),
    "masked-fill": lambda x: x.masked_fill(x > 0.5, 0.5),
    "where": lambda x: torch.where(x > 0, x, 0.1 * x),
    "expand": lambda x: torch.atan(x[:, :, :1]).expand(-1, -1, 6, -1),
    "pixel-shuffle": lambda x: F.pixel_shuffle(torch.atan(x).repeat(1, 4, 1, 1), 2)[:, :, ::2, ::2],
    "pixel-unshuffle": lambda x: F.pixel_unshuffle(torch.atan(x), 2)[:, :4].repeat_interleave(2, 2).repeat_interleave(2, 3),
    "argmax": lambda x: x * torch.argmax(x, dim=1, keepdim=True).float(),
    "amax": lambda x: x - torch.amax(x, dim=(2, 3), keepdim=True),
    "logsumexp": lambda x: x - torch.logsumexp(x, dim=1, keepdim=True),
    "std-var": lambda x: x / (x.std(dim=(2, 3), keepdim=True) + x.var(dim=1, keepdim=True) + 1),
    "norm": lambda x: F.normalize(x, dim=1) + x / (x.norm(dim=3, keepdim=True) + 1),
    "erf": lambda x: torch.erf(x),
    "atan2": lambda x: torch.atan2(x, x.abs() + 0.5),
    "remainder-fmod": lambda x: torch.remainder(x, 0.7) + torch.fmod(x, 0.7),
    "floor-ceil-round": lambda x: torch.floor(x * 4) + torch.ceil(x * 3) + torch.round(x * 2),
    "sign": lambda x: torch.sign(x) * x * x,
    "grid-sample": lambda x: F.grid_sample(x, torch.tanh(x[:, :2].permute(0, 2, 3, 1)), align_corners=False),
    "bicubic": lambda x: F.interpolate(x, size=(9, 9), mode="bicubic", align_corners=False)[:, :, ::3, ::3].repeat(1, 1, 2, 2),
    "area": lambda x: F.interpolate(x, size=(3, 3), mode="area").repeat(1, 1, 2, 2),
    "einsum": lambda x: torch.einsum("bchw,bcwk->bchk", x, x.transpose(2, 3)),
    "baddbmm": lambda x: torch.baddbmm(x.flatten(0, 1), x.flatten(0, 1), x.flatten(0, 1).transpose(1, 2)).reshape(x.shape),
    "softmax": lambda x: torch.softmax(x, dim=1) + torch.log_softmax(x, dim=3),
    "scatter": lambda x: torch.zeros_like(x).scatter(3, torch.argsort(x, dim=3), x),
    "causal-attention": lambda x: F.scaled_dot_product_attention(x, x, x, is_causal=True),
    "max-dim": lambda x: x - torch.max(x, dim=1, keepdim=True)[0],
}
"""More ops vision, detection and transformer models use, each left in float."""
OPS.update(SWEEP)


class Between(nn.Module):
    """A conv, the op under test, a conv: the op sits inside the quantized region."""

    def __init__(self, op) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv, self.out = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.out(self.op(self.conv(self.quant(x)))))


SHAPE = (2, 3, 6, 6)


def _integer_model(op, example: torch.Tensor):
    with pytest.warns(FloatFallbackWarning):
        return integer_model(Between(op).eval(), example, "x86_64")


def _steps(values: np.ndarray, scale: float) -> np.ndarray:
    return np.round(values / np.float32(scale))


@pytest.mark.parametrize("op", OPS.values(), ids=OPS)
def test_an_op_without_a_float_form_of_its_own_exports_and_checks_cpu_float(op, tmp_path):
    """Every float node carries its reason, check places it CPU (float) with it, and ONNX Runtime on the file
    agrees with the integer model within the bound."""
    torch.manual_seed(0)
    example = torch.randn(SHAPE)
    int_model = _integer_model(op, example)
    path = to_onnx(int_model, (example,), tmp_path / "m.onnx")
    float_nodes = [n for n in onnx.load(str(path)).graph.node if n.doc_string.startswith("float fallback: ")]
    assert float_nodes
    placed = {n.record.name: n for n in check_model(path, target="x86_64").nodes}
    for node in float_nodes:
        assert placed[node.name].where == "CPU (float)", node.name
        assert placed[node.name].reasons[0].message.endswith(placed[node.name].record.float_reason)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    (reference,) = session(onnx.load(str(path)), PEER_PATHS["float"]).run(None, {"x": x.numpy()})
    assert_within_float_region_bound(_steps(reference, int_model.output_quant()[0].scales[0]), int_model.run_integer(x).numpy())


@pytest.mark.parametrize("name", OPS)
def test_the_compiled_float_op_agrees_with_onnx_runtime_within_the_bound(name, tmp_path):
    """The file's shape arithmetic is folded to constants (the file has static shapes): no ``Shape`` or ``If`` is
    left, and every compiled region, shapes inferred, passes the ONNX checker's full check (compile warns of
    nothing). At -O2 (the default): cumsum and TopK become TVM's extern scan and sort kernels, which keep their loops
    (schedule ``loops``)."""
    torch.manual_seed(0)
    example = torch.randn(SHAPE)
    int_model = _integer_model(OPS[name], example)
    path = to_onnx(int_model, (example,), tmp_path / "m.onnx")
    kinds = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not kinds & {"Shape", "Size", "If"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compile_model(path, target="x86_64", out=tmp_path / "m.edgeq")
    assert [str(w.message) for w in caught] == []
    for region in (r for r in result.partition.regions if r.model is not None):
        onnx.checker.check_model(onnx.shape_inference.infer_shapes(region.model, strict_mode=True), full_check=True)
    assert any(k.schedule == "loops" for k in result.kernels) is bool(kinds & {"CumSum", "TopK"})
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    (reference,) = session(onnx.load(str(path)), PEER_PATHS["float"]).run(None, {"x": x.numpy()})
    with Model.load(result.artifact) as artifact:
        (got,) = artifact.run({"x": x.numpy()}, raw=True).values()
    assert_within_float_region_bound(got, _steps(reference, int_model.output_quant()[0].scales[0]))


def _scaled_by_determinants(x: torch.Tensor) -> torch.Tensor:
    """Each 6x6 plane times its determinant: ONNX Det, which TVM's importer has no converter for."""
    return x * torch.linalg.det(x).unsqueeze(-1).unsqueeze(-1)


def test_a_float_op_the_compiler_cannot_import_is_one_clear_error_naming_the_node(tmp_path):
    """Exported as any float op; check says compile cannot run it (TVM has no converter) and keeps why it is float;
    compile refuses it in one line naming the node and why it is float."""
    torch.manual_seed(0)
    example = torch.randn(SHAPE)
    path = to_onnx(_integer_model(_scaled_by_determinants, example), (example,), tmp_path / "m.onnx")
    (det,) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Det"]
    placed = {n.record.name: n for n in check_model(path, target="x86_64").nodes}
    assert placed[det.name].where == "unsupported" and "no integer" in placed[det.name].record.float_reason
    assert "Det has no converter in TVM's ONNX frontend" in placed[det.name].reasons[0].message
    with pytest.raises(CompileError, match=rf"^Det '{det.name}' cannot run on x86_64: Det has no converter in TVM's ONNX frontend$") as caught:
        compile_model(path, target="x86_64", out=tmp_path / "m.edgeq")
    assert "\n" not in str(caught.value)


def test_a_float_node_tvm_fails_to_convert_is_one_clear_error_naming_it(tmp_path):
    """A converter TVM has that raises on the node (a cumulative sum whose axis is two numbers): one line naming the
    node, TVM's reason and why the node is float, not TVM's traceback."""
    torch.manual_seed(0)
    example = torch.randn(SHAPE)
    model = onnx.load(str(to_onnx(_integer_model(OPS["cumsum"], example), (example,), tmp_path / "m.onnx")))
    (cumsum,) = [n for n in model.graph.node if n.op_type == "CumSum"]
    (axis,) = [i for i in model.graph.initializer if i.name == cumsum.input[1]]
    axis.CopyFrom(onnx.numpy_helper.from_array(np.array([3, 3], dtype=np.int64), axis.name))
    onnx.save(model, tmp_path / "two-axes.onnx")
    with pytest.raises(CompileError, match=rf"^CumSum '{cumsum.name}': TVM .*'s ONNX importer cannot convert it: CumSum axis .* \(float fallback: ") as caught:
        compile_model(tmp_path / "two-axes.onnx", target="x86_64", out=tmp_path / "m.edgeq")
    assert "\n" not in str(caught.value)


@pytest.mark.flow
def test_timm_edgenext_xx_small_runs_end_to_end(tmp_path):
    """edgenext_xx_small (random init, 64x64), which stopped at export (its unbind had no float form): exported,
    every op placed on the CPU, compiled for x86_64, and the artifact gives the integer model's output within the
    bound."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    example = torch.randn(1, 3, 64, 64)
    with pytest.warns(FloatFallbackWarning):
        int_model = integer_model(Wrapped(timm.create_model("edgenext_xx_small", pretrained=False)).eval(), example, "x86_64")
    path = to_onnx(int_model, (example,), tmp_path / "edgenext.onnx")
    placements = {n.where for n in check_model(path, target="x86_64").nodes}
    assert placements == {"CPU", "CPU (float)"}
    result = compile_model(path, target="x86_64", out=tmp_path / "edgenext.edgeq")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with Model.load(result.artifact) as artifact:
        (got,) = artifact.run({"x": x.numpy()}, raw=True).values()
    assert_within_float_region_bound(got, int_model.run_integer(x).numpy())


class SharedFloatResult(nn.Module):
    """A float op's result read twice: quantized by an integer add, and as it is by the next float op (YOLOv8's
    box decoding: ``x1y1 = anchors - lt`` feeds ``x1y1 + x2y2`` and ``x2y2 - x1y1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature = self.conv(self.quant(x))
        gate = torch.atan(feature)
        return self.dequant(torch.cat([gate + feature, torch.atan(gate)], 1))


def test_a_float_result_read_quantized_and_as_it_is_compiles_within_the_bound(tmp_path):
    torch.manual_seed(0)
    example = torch.randn(SHAPE)
    with pytest.warns(FloatFallbackWarning, match="atan"):
        int_model = integer_model(SharedFloatResult().eval(), example, "x86_64")
    result = compile_model(to_onnx(int_model, (example,), tmp_path / "m.onnx"), target="x86_64", out=tmp_path / "m.edgeq")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with Model.load(result.artifact) as artifact:
        (got,) = artifact.run({"x": x.numpy()}, raw=True).values()
    assert_within_float_region_bound(got, int_model.run_integer(x).numpy())


def test_a_float_op_of_the_shapes_alone_is_a_constant_of_the_file(tmp_path):
    """``torch.zeros_like(x)`` falls back to float (it reads an activation), but the file's static shapes alone
    determine it: a constant of the file (no node), which the float ``+ 1`` reads; the integer add of the result is
    named apart from that float ``add`` node. The artifact equals the integer model."""
    torch.manual_seed(0)
    example = torch.randn(SHAPE)
    int_model = _integer_model(lambda x: x + (torch.zeros_like(x) + 1), example)
    path = to_onnx(int_model, (example,), tmp_path / "m.onnx")
    model = onnx.load(str(path))
    assert [(n.op_type, n.input[0]) for n in model.graph.node if n.doc_string.startswith("float fallback: ")] == [("Add", "zeros_like")]
    assert "zeros_like" in {i.name for i in model.graph.initializer}
    assert {n.where for n in check_model(path, target="x86_64").nodes} == {"CPU", "CPU (float)"}
    result = compile_model(path, target="x86_64", out=tmp_path / "m.edgeq")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with Model.load(result.artifact) as artifact:
        (got,) = artifact.run({"x": x.numpy()}, raw=True).values()
    np.testing.assert_array_equal(got, int_model.run_integer(x).numpy())

