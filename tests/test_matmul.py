"""The matrix product of two activations (attention's ``q @ k^T`` and ``attention @ v``) is one integer op through
prepare, convert, export, check, compile and both runtimes: exact where the graph is integer, within the float
fallback's bound after the softmax between the two products."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from models import DIM, HEADS, TOKENS, AttentionBlock, assert_within_float_region_bound, integer_model
from reference import run_reference
from torch import nn

from edgeq.check import Placement, check_model
from edgeq.compile import compile_model
from edgeq.errors import QuantizationError
from edgeq.export import to_onnx
from edgeq.quantization import DeQuantStub, QuantStub, calibrate, convert_fx, prepare_qat_fx
from edgeq.quantization.capture import CAPTURE_ATTRIBUTE, Capture
from edgeq.quantization.integer_model import IntegerModel
from edgeq.quantization.prepare import FloatFallbackWarning
from edgeq.quantization.qat_modules import MatMul
from edgeq.run import run_artifact
from edgeq_runtime import Model

EXAMPLE = torch.randn(2, TOKENS, DIM)


class Product(nn.Module):
    """One product of two activations, spelled ``spelling``."""

    def __init__(self, spelling) -> None:
        super().__init__()
        self.quant_a, self.quant_b, self.dequant = QuantStub(), QuantStub(), DeQuantStub()
        self.spelling = spelling

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.spelling(self.quant_a(a), self.quant_b(b)))


SPELLINGS = {
    "@": lambda a, b: a @ b,
    "torch.matmul": torch.matmul,
    "torch.matmul(input=, other=)": lambda a, b: torch.matmul(input=a, other=b),
    "torch.bmm": torch.bmm,
    "Tensor.matmul": lambda a, b: a.matmul(b),
    "Tensor.bmm": lambda a, b: a.bmm(b),
}


def product_model(spelling, a: torch.Tensor, b: torch.Tensor) -> IntegerModel:
    """``Product(spelling)`` prepared for x86_64 (no op left float), calibrated on random batches, converted."""
    batches = [(torch.randn_like(a), torch.randn_like(b)) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatFallbackWarning)
        prepared = calibrate(Product(spelling), batches, example_inputs=(a, b), target="x86_64")
    (matmul,) = [m for m in prepared.modules() if isinstance(m, MatMul)]
    assert matmul.reduction_size == a.shape[-1]
    return convert_fx(prepared)


@pytest.mark.parametrize("spelling", SPELLINGS.values(), ids=SPELLINGS)
def test_every_spelling_is_the_integer_op(spelling):
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 12), torch.randn(2, 12, 7)
    int_model = product_model(spelling, a, b)
    got = int_model.run_integer(a, b).numpy()
    np.testing.assert_array_equal(got, run_reference(int_model.graph_module, a.numpy(), b.numpy()))


def test_a_product_of_vectors_stays_float_with_the_reason():
    with pytest.warns(FloatFallbackWarning, match=r"matmul '.*': matrix product of 1-D and 2-D tensors \(allowed: 2-D or more\)"):
        prepare_qat_fx(Product(torch.matmul), example_inputs=(torch.randn(12), torch.randn(12, 4)), target="x86_64")


def test_a_reduction_too_long_for_int32_is_a_clear_error():
    """K * 128 * 128 must fit int32: K = 131072 products per output cannot."""
    with pytest.raises(QuantizationError, match=r"^matmul 'matmul': int32 accumulator may overflow; got 131072 products"):
        product_model(torch.matmul, torch.randn(1, 1, 2**17), torch.randn(1, 2**17, 1))


@pytest.fixture(scope="module")
def attention(tmp_path_factory):
    """The block for each target, calibrated and converted, and its QDQ file."""
    folder = tmp_path_factory.mktemp("attention")
    models = {}
    for target in ("npu-s", "npu-m"):
        torch.manual_seed(0)
        with pytest.warns(FloatFallbackWarning) as caught:
            int_model = integer_model(AttentionBlock().eval(), EXAMPLE, target)
        # the head scale (a product with a constant) and the softmax stay float; both products are integer
        assert sorted(str(w.message).split(" ")[0] for w in caught) == ["Tensor.softmax", "mul"]
        models[target] = int_model, to_onnx(int_model, (EXAMPLE,), folder / f"{target}.onnx")
    return models


def test_the_integer_model_equals_the_reference(attention):
    int_model, _ = attention["npu-m"]
    x = torch.randn(2, TOKENS, DIM)
    expected = run_reference(int_model.graph_module, x.numpy())
    for got, want in zip(int_model.run_integer(x), expected):
        np.testing.assert_array_equal(got.numpy(), want)


def test_export_writes_dequantize_matmul_quantize(attention):
    _, path = attention["npu-m"]
    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    products = [n for n in graph.node if n.op_type == "MatMul" and n.name in ("matmul/MatMul", "matmul_1/MatMul")]
    assert len(products) == 2
    for node in products:
        assert [producer[i].op_type for i in node.input] == ["DequantizeLinear", "DequantizeLinear"]
        assert not any(producer[i].input[0] in {t.name for t in graph.initializer} for i in node.input)
        (quantize,) = [n for n in graph.node if node.output[0] in n.input]
        assert quantize.op_type == "QuantizeLinear" and not node.doc_string


@pytest.mark.parametrize("target, where", [("npu-s", Placement.CPU), ("npu-m", Placement.NPU)])
def test_check_says_where_the_matmul_runs_and_why(attention, target, where):
    _, path = attention[target]
    for report in (check_model(path, target=target), check_model(AttentionBlock().eval(), (EXAMPLE,), target=target)):
        products = [n for n in report.nodes if n.record.op == "matmul"]
        assert [n.record.attrs.reduction_size for n in products] == [DIM // HEADS, TOKENS]
        assert [n.record.macs for n in products] == [2 * HEADS * TOKENS * TOKENS * (DIM // HEADS), 2 * HEADS * TOKENS * DIM // HEADS * TOKENS]
        for node in products:
            assert node.placement is where, (target, node.record.name, node.reasons)
            reasons = [(r.rule, r.message) for r in node.reasons]
            assert reasons == ([] if where is Placement.NPU else [("op_not_on_npu", "matmul is not among npu-s's ops")])


@pytest.mark.parametrize("target", ["x86_64", "npu-m"])
def test_compiled_attention_equals_the_integer_model(attention, target, tmp_path, monkeypatch):
    """The scores (integer all the way) equal the integer model's; the block's output, after the float softmax,
    is within the float fallback's bound (docs/numerics.md); the C++ runtime equals the Python runtime."""
    int_model, _ = attention["npu-m"]
    result = compile_model(int_model, (EXAMPLE,), target=target, out=tmp_path / "a.edgeq", simulate=True)
    products = [op for op in result.graph.ops if op.op == "matmul"]
    assert len(products) == 2 and all(op.requantization.per == "tensor" for op in products)
    assert {op.placement for op in products} == {"NPU" if target == "npu-m" else "CPU"}
    torch.manual_seed(1)
    for _ in range(3):
        x = torch.randn(2, TOKENS, DIM)
        out, scores = (t.numpy() for t in int_model.run_integer(x))
        with Model.load(result.artifact) as model:
            got = model.run(x.numpy(), raw=True)
        got_out, got_scores = got.values()
        np.testing.assert_array_equal(got_scores, scores)
        assert_within_float_region_bound(got_out, out)
    np.save(tmp_path / "x.npy", x.numpy())
    run = run_artifact(result.artifact, [str(tmp_path / "x.npy")], tmp_path / "cpp", runtime="cpp", raw=True, say=lambda _: None)
    for name, path in run.outputs.items():
        np.testing.assert_array_equal(np.load(path), got[name])


class Products(nn.Module):
    """q @ k^T and its product with v, of a qkv Linear's chunks; ``as_list``: ``list(...chunk(3, -1))``, which torch.fx
    cannot trace (torch.export captures it: ``aten.bmm``, ``aten.matmul``)."""

    def __init__(self, as_list: bool) -> None:
        super().__init__()
        self.as_list = as_list
        self.quant, self.qkv, self.dequant = QuantStub(), nn.Linear(DIM, 3 * DIM), DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.qkv(self.quant(x)).chunk(3, -1)
        q, k, v = list(parts) if self.as_list else parts
        return self.dequant(torch.bmm(q, k.transpose(1, 2)) @ v)


def test_torch_export_captures_the_products_alike():
    torch.manual_seed(0)
    listed = Products(as_list=True).eval()
    unpacked = Products(as_list=False).eval()
    unpacked.load_state_dict(listed.state_dict())
    batches = [torch.randn(2, TOKENS, DIM) for _ in range(3)]
    prepared = [calibrate(m, batches, example_inputs=(EXAMPLE,), target="npu-m") for m in (listed, unpacked)]
    assert [getattr(p, CAPTURE_ATTRIBUTE) for p in prepared] == [Capture.EXPORT, Capture.FX]
    assert all(sum(isinstance(m, MatMul) for m in p.modules()) == 2 for p in prepared)
    x = torch.randn(2, TOKENS, DIM)
    got, expected = (convert_fx(p).run_integer(x).numpy() for p in prepared)
    np.testing.assert_array_equal(got, expected)
