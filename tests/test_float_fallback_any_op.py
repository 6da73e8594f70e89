"""The float fallback's one general path: ops edgeq has no integer form of and had no hand-written float form of
(unbind, reflect padding, roll, einsum, cumsum, a function of the user's own) are exported by torch's ONNX
exporter, placed CPU (float) by check with their reason, compiled for x86_64, and the artifact agrees with ONNX
Runtime on the same file within the float fallback's bound (docs/numerics.md)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from models import assert_within_float_region_bound, integer_model
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


def _unbind(x: torch.Tensor) -> torch.Tensor:
    rows = x.unbind(1)
    return torch.stack([rows[1], rows[0], rows[3], rows[2]], 1)


OPS = {
    "unbind": _unbind,
    "pad-reflect": lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect"),
    "roll": lambda x: torch.roll(x, shifts=(1, -2), dims=(2, 3)),
    "einsum": lambda x: torch.einsum("bchw,bcwk->bchk", x, x.transpose(2, 3)),
    "cumsum": lambda x: x.cumsum(dim=3),
    "custom-function": _arc_tangent_gate,
}


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


COMPILED = ("unbind", "roll", "custom-function")
"""The ops above TVM's importer converts into Relax operators (the others: below, and cumsum's kernel, which TVM
0.27's x86 schedule cannot build)."""


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
        assert "no integer" in placed[node.name].reasons[0].message
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    (reference,) = session(onnx.load(str(path)), PEER_PATHS["float"]).run(None, {"x": x.numpy()})
    assert_within_float_region_bound(_steps(reference, int_model.output_quant()[0].scales[0]), int_model.run_integer(x).numpy())


@pytest.mark.parametrize("name", COMPILED)
def test_the_compiled_float_op_agrees_with_onnx_runtime_within_the_bound(name, tmp_path):
    torch.manual_seed(0)
    example = torch.randn(SHAPE)
    int_model = _integer_model(OPS[name], example)
    path = to_onnx(int_model, (example,), tmp_path / "m.onnx")
    result = compile_model(path, target="x86_64", out=tmp_path / "m.edgeq")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    (reference,) = session(onnx.load(str(path)), PEER_PATHS["float"]).run(None, {"x": x.numpy()})
    with Model.load(result.artifact) as artifact:
        (got,) = artifact.run({"x": x.numpy()}, raw=True).values()
    assert_within_float_region_bound(got, _steps(reference, int_model.output_quant()[0].scales[0]))


@pytest.mark.parametrize("op, named", [(OPS["pad-reflect"], r"Pad 'pad/Pad_1'"), (OPS["einsum"], r"Einsum 'einsum/Einsum_1'")])
def test_a_float_op_the_compiler_cannot_carry_is_one_clear_error_naming_the_node(op, named, tmp_path):
    """Exported and checked as any float op; compile refuses in one line naming the node and why it is float."""
    torch.manual_seed(0)
    example = torch.randn(SHAPE)
    path = to_onnx(_integer_model(op, example), (example,), tmp_path / "m.onnx")
    with pytest.raises(CompileError, match=rf"^{named}: TVM .* builds it as a kernel of its own.* \(float fallback: ") as caught:
        compile_model(path, target="x86_64", out=tmp_path / "m.edgeq")
    assert "\n" not in str(caught.value)
