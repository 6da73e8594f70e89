"""The compiled graph (graph.json): every documented field on small models with hand-computed MACs and bytes,
the JSON round trip, and clear errors for what is not a readable artifact."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from models import SmallCNN, Wrapped, integer_model
from torch import nn

from edgeq.compile import compile_model
from edgeq.compile.compiled_graph import SCHEMA_VERSION, CompiledGraph, CompiledGraphError, load_compiled_graph
from edgeq.compile.cpu_features import dot_product, host_target
from edgeq.errors import EdgeqError
from edgeq.op_attrs import Conv2dAttrs


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """SmallCNN on npu-s, batch 2, 8x8 (every op on the NPU)."""
    torch.manual_seed(0)
    example = torch.rand(2, 1, 8, 8)
    int_model = integer_model(SmallCNN().eval(), example, "npu-s")
    return compile_model(int_model, (example,), out=tmp_path_factory.mktemp("graph") / "small.edgeq", simulate=True)


@pytest.fixture(scope="module")
def fallback(tmp_path_factory):
    """A 7x7 convolution (too large for npu-s: it falls back to the CPU) feeding a 3x3 one on the NPU."""
    torch.manual_seed(0)
    example = torch.rand(1, 3, 16, 16)
    model = Wrapped(nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)))
    int_model = integer_model(model.eval(), example, "npu-s")
    return compile_model(int_model, (example,), out=tmp_path_factory.mktemp("graph") / "fallback.edgeq", simulate=True)


def test_macs_and_bytes_of_every_op_kind(small):
    """Hand-computed: conv MACs = outputs x in_channels / groups x kh x kw; int8 activations 1 byte, int32 biases
    4 bytes per element."""
    ops = {op.name: op for op in small.graph.ops}
    expected = {  # name: (macs, ops, bytes_in, bytes_out, weight_bytes)
        "conv1/Conv": (2 * 16 * 8 * 8 * 1 * 9, 0, 2 * 64, 2 * 16 * 64, 16 * 9 + 16 * 4),
        "conv1/Relu": (0, 2048, 2048, 2048, 0),
        "conv2/Conv": (2048 * 16 * 9, 0, 2048, 2048, 16 * 16 * 9 + 16 * 4),
        "add/Add": (0, 2 * 2048, 2 * 2048, 2048, 0),
        "pool/MaxPool": (0, 2 * 16 * 4 * 4 * 4, 2048, 512, 0),
        "conv3/Conv": (2 * 32 * 16 * 16 * 9, 0, 512, 1024, 32 * 16 * 9 + 32 * 4),
        "adaptive_avg_pool2d/GlobalAveragePool": (0, 1024, 1024, 64, 0),
        "flatten/Reshape": (0, 64, 64, 64, 0),
        "fc/Gemm": (2 * 10 * 32, 0, 64, 20, 10 * 32 + 10 * 4),
    }
    for name, figures in expected.items():
        op = ops[name]
        assert (op.macs, op.non_mac_ops, op.bytes_in, op.bytes_out, op.weight_bytes) == figures, name


def test_ops_tensors_and_regions(small):
    graph = small.graph
    assert graph.schema_version == SCHEMA_VERSION and graph.arch == "x86_64"
    assert graph.dot_product == dot_product(host_target()).name  # simulated: built for this machine's CPU
    assert (graph.target.name, graph.target.kind, graph.target.host) == ("npu-s", "npu", "aarch64")
    conv = graph.op("conv1/Conv")
    assert conv.op == "conv2d" and conv.source_ops == ["Conv"] and conv.placement == "NPU" and conv.region == "region0_npu"
    assert conv.inputs == ["quant.q"] and conv.outputs == ["conv1.preact.q"] and conv.constants == ["conv1.weight_q", "conv1.bias_q"]
    assert conv.attributes == Conv2dAttrs(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, in_channels=1, out_channels=16)
    settings = {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "in_channels": 1, "out_channels": 16}
    assert conv.to_dict()["attributes"] == settings
    assert conv.requantization.per == "channel" and conv.requantization.axis == 1 and len(conv.requantization.multiplier) == 16
    assert graph.op("add/Add").requantization.per == "input" and graph.op("conv1/Relu").requantization is None
    assert conv.reasons == [] and "conv2d" in conv.kernel
    blocked = f"_nchw{dot_product(host_target()).lanes}c"  # between convolutions (edgeq/compile/layout_plan.py)
    assert graph.op("pool/MaxPool").kernel == f"max_pool2d{blocked}" and graph.op("conv1/Relu").kernel == conv.kernel
    assert graph.op("conv1/Relu").calls == conv.calls == [0]  # the kernel calls it runs in (compile/provenance.py)

    bias = graph.tensors["conv1.bias_q"]
    assert (bias.shape, bias.dtype, bias.bytes, bias.kind, bias.producer, bias.consumers) == ([16], "int32", 64, "constant", None, ["conv1/Conv"])
    source = graph.tensors["quant.q"]
    assert (source.shape, source.dtype, source.bytes, source.kind) == ([2, 1, 8, 8], "int8", 128, "input")
    assert source.quant.scale == [1 / 128] and source.quant.zero_point == [0] and source.quant.axis is None
    activation = graph.tensors["conv1.q"]
    assert activation.producer == "conv1/Relu" and activation.consumers == ["conv2/Conv", "add/Add"] and activation.kind == "activation"
    assert graph.inputs == ["quant.q"] and graph.outputs == ["fc.q"] and graph.tensors["fc.q"].kind == "output"
    (region,) = graph.regions
    assert region.ops == [op.name for op in graph.ops] and region.inputs == ["quant.q"] and region.outputs == ["fc.q"]


def test_cpu_fallback_ops_keep_shapes_and_attributes(fallback):
    graph = fallback.graph
    stem = graph.op("model.0/Conv")
    assert stem.placement == "CPU" and stem.region == "region0_cpu" and stem.reasons
    assert stem.attributes.kernel == (7, 7) and stem.attributes.stride == (2, 2)
    assert stem.macs == 8 * 8 * 8 * 3 * 49 and stem.bytes_in == 3 * 16 * 16 and stem.bytes_out == 8 * 8 * 8
    assert [r.placement for r in graph.regions] == ["CPU", "NPU"]
    border = graph.regions[0].outputs
    assert border == graph.regions[1].inputs and all(graph.tensors[t].producer in graph.regions[0].ops for t in border)
    assert all(op.kernel is not None for op in graph.ops if op.op == "conv2d")


def test_graph_json_is_to_dict_and_round_trips(small):
    data = json.loads(zipfile.ZipFile(small.artifact).read("graph.json"))
    assert data == json.loads(json.dumps(small.graph.to_dict()))
    assert CompiledGraph.from_dict(data) == small.graph
    assert load_compiled_graph(small.artifact) == small.graph
    program = json.loads(zipfile.ZipFile(small.artifact).read("npu_program.json"))
    assert [op["name"] for op in program["regions"][0]["ops"]] == [op.name for op in small.graph.ops]


def test_unknown_schema_version_and_missing_fields_are_refused(small):
    data = small.graph.to_dict()
    with pytest.raises(CompiledGraphError, match=rf"schema version {SCHEMA_VERSION + 1}; this edgeq reads version {SCHEMA_VERSION}"):
        CompiledGraph.from_dict({**data, "schema_version": SCHEMA_VERSION + 1})
    del data["ops"][0]["macs"]
    with pytest.raises(CompiledGraphError, match="missing or unexpected field"):
        CompiledGraph.from_dict(data)


def test_what_is_not_an_artifact_is_refused_clearly(small, tmp_path):
    text = tmp_path / "model.onnx"
    text.write_text("not a zip")
    with pytest.raises(EdgeqError, match="model.onnx: not an edgeq artifact"):
        load_compiled_graph(text)
    with pytest.raises(CompiledGraphError, match="absent.edgeq: no such file"):
        load_compiled_graph(tmp_path / "absent.edgeq")
    corrupt = tmp_path / "corrupt.edgeq"
    with zipfile.ZipFile(small.artifact) as source, zipfile.ZipFile(corrupt, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            target.writestr(name, data.replace(b'"macs": 0', b'"macs": 1') if name == "graph.json" else data)
    with pytest.raises(CompiledGraphError, match="corrupt.edgeq: member graph.json fails its sha256 check"):
        load_compiled_graph(corrupt)
