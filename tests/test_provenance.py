"""Provenance (edgeq/compile/provenance.py): the graph op each kernel call computes, looked up from the build."""

from __future__ import annotations

import hashlib
import inspect

import onnx
import pytest
import torch
from models import SmallCNN, integer_model
from onnx import TensorProto, helper
from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

from edgeq.compile import compile_model
from edgeq.compile.kernel_map import kernel_calls, kernel_map
from edgeq.compile.provenance import import_onnx, node_owners
from edgeq.errors import CompileError

IMPORTER_SOURCES = {
    "_construct_nodes": "d12b2d4bae85d5957f8f5097eb77a4775595966389447e3c5bd182cfb2c398db",
    "_convert_operator": "88d6337c139fc647478364fa72e3713290714e196a77b621c5440b274aaabd80",
}
"""sha256 of the TVM 0.27.0.post1 importer methods provenance.py's importer relies on."""


def test_tvm_importer_is_the_one_provenance_overrides():
    """_RecordingImporter overrides TVM's private _construct_nodes, which must convert each node once, in order,
    through _convert_operator: a TVM that changes either fails here, naming what to check."""
    for method, digest in IMPORTER_SOURCES.items():
        source = inspect.getsource(getattr(ONNXGraphImporter, method))
        assert hashlib.sha256(source.encode()).hexdigest() == digest, (
            f"TVM's ONNXGraphImporter.{method} changed: check that edgeq/compile/provenance.py's _RecordingImporter still "
            "sees every node's conversion, in node order, then update IMPORTER_SOURCES"
        )


def _two_node_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="first"), helper.make_node("Neg", ["r"], ["y"], name="second")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_import_records_what_each_node_became():
    function, results, _ = import_onnx(_two_node_model())
    assert list(results) == ["first", "second"]
    bound = {binding.var: binding.value for block in function.body.blocks for binding in block.bindings}
    assert [bound.get(results[name], results[name]).op.name for name in results] == ["relax.nn.relu", "relax.negative"]


def test_node_owners_follow_quantizers_to_their_op():
    q = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="quant")
    dq = helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq")
    relu = helper.make_node("Relu", ["xd"], ["r"], name="relu")
    out = helper.make_node("QuantizeLinear", ["r", "s", "z"], ["rq"], name="out")
    graph = helper.make_graph([q, dq, relu, out], "g", [], [])
    assert node_owners(helper.make_model(graph), {"relu": "relu_op"}) == {"quant": "relu_op", "dq": "relu_op", "relu": "relu_op", "out": "relu_op"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """SmallCNN on x86_64 (-O2): fused convolutions, a residual add, a global average pool and a flatten."""
    torch.manual_seed(0)
    example = torch.rand(2, 1, 8, 8)
    path = tmp_path_factory.mktemp("provenance") / "small.edgeq"
    return compile_model(integer_model(SmallCNN().eval(), example, "x86_64"), (example,), out=path, simulate=True)


def test_each_kernel_call_maps_to_the_ops_it_computes(small):
    graph = small.graph
    (region,) = graph.regions
    calls = kernel_calls(_executable_text(small))[region.name]
    assert sorted({index for op in graph.ops for index in op.calls}) == list(range(len(calls)))  # every call is an op's
    for op in graph.ops:
        assert (op.kernel is None) == (op.calls == []) and (not op.calls or op.kernel == calls[op.calls[-1]].kernel), op.name
    assert graph.op("conv1/Relu").calls == graph.op("conv1/Conv").calls  # fused into the convolution's kernel
    assert graph.op("add/Add").calls == graph.op("conv2/Conv").calls  # the residual add in the second convolution's
    pool = graph.op("adaptive_avg_pool2d/GlobalAveragePool")
    assert len(pool.calls) == 2 and "sum" in calls[pool.calls[0]].kernel  # its sum, then the kernel requantizing it
    flatten = graph.op("flatten/Reshape")
    assert set(flatten.calls) <= set(pool.calls)  # a view, or fused into the pool's requantization


def _executable_text(result) -> str:
    import tempfile
    import zipfile
    from pathlib import Path

    import tvm

    with tempfile.TemporaryDirectory() as folder:
        library = Path(folder) / "model.so"
        library.write_bytes(zipfile.ZipFile(result.artifact).read("model.so"))
        return tvm.runtime.load_module(str(library))["as_text"]()


def test_traced_calls_that_are_not_the_executables_are_refused():
    class Executable:
        def as_text(self) -> str:
            return "@region0_cpu:\n  call conv2d in: %0, %1 dst: %2\n"

    traced = {"region0_cpu": ("region0_cpu", [("conv2d", frozenset({"a"}))]), "region1_cpu": ("region0_cpu", [("conv2d", frozenset({"b"}))])}
    assert kernel_map(Executable(), traced) == {"a": ("conv2d", [0]), "b": ("conv2d", [0])}  # region1 runs region0's function
    with pytest.raises(CompileError, match="region0_cpu: the kernel calls traced through the build are not the executable's"):
        kernel_map(Executable(), {"region0_cpu": ("region0_cpu", [("add", frozenset({"a"}))])})
