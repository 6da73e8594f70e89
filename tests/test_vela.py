"""The Vela driver: a TOSA graph from the TOSA writer compiled for each Ethos-U target's [vela] options, with the
command stream, memory sizes and estimates read back typed and named after edgeq's ops; a refusal is one error
naming the op and Vela's reason."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from models import SmallCNN, WideStride, integer_model

from edgeq.compile.vela import VelaLayer, VelaRefusal, compile_tosa, refuse_cpu_operators, vela_arguments
from edgeq.export.tosa import tosa_graph
from edgeq.export.tosa.builder import TosaOperator
from edgeq.export.tosa.writer import TosaGraph
from edgeq.targets import load_target
from edgeq.vela_configs import vela_version

TARGETS = ("ethos-u55-128", "ethos-u65-256", "ethos-u85-256")


@pytest.fixture(scope="module")
def digits() -> TosaGraph:
    """The digits CNN quantized for ethos-u65-256 (all Ethos-U targets share its rounding rule) as TOSA."""
    torch.manual_seed(0)
    example = torch.rand(1, 1, 8, 8) * 2 - 1
    return tosa_graph(integer_model(SmallCNN().eval(), example, "ethos-u65-256"), (example,))


@pytest.mark.parametrize("name", TARGETS)
def test_compiles_digits(digits, name):
    target = load_target(name)
    result = compile_tosa(digits, target.vela)
    stream = result.command_stream
    assert stream.commands[:4] == b"COP1" and len(stream.weights) > 0
    assert np.load(io.BytesIO(stream.raw))["cmd_data"].item() == stream.commands
    assert [t.shape[-1] for t in stream.inputs] == [1] and [t.shape[-1] for t in stream.outputs] == [10]
    assert result.version == vela_version()
    assert result.options == vela_arguments(target.vela)
    assert result.options[result.options.index("--accelerator-config") + 1] == name
    assert result.options[result.options.index("--system-config") + 1] == target.vela.system_config
    summary = result.summary
    assert summary.clock_hz == target.hardware.clock_hz
    assert summary.npu_cycles > 0 and summary.inference_time_s == pytest.approx(summary.total_cycles / summary.clock_hz, rel=1e-3)
    assert summary.sram_bytes > 0 and summary.encoded_weight_bytes > 0
    # the MACs of the layers add up to the summary's: every layer is read
    assert sum(layer.macs for layer in result.layers) == summary.macs
    ops = {layer.op for layer in result.layers}
    assert None not in ops
    assert {"conv1/Relu", "conv2/Conv", "add/Relu", "pool/MaxPool", "conv3/Relu", "fc/Gemm"} <= ops, ops
    assert all(layer.cycles >= 0 and 0 <= layer.mac_utilisation_percent <= 100 for layer in result.layers)


@pytest.mark.parametrize("name", ["ethos-u55-128", "ethos-u65-256"])
def test_refusal_names_op_and_reason(name):
    torch.manual_seed(0)
    example = torch.randn(1, 3, 16, 16)
    graph = tosa_graph(integer_model(WideStride().eval(), example, "ethos-u65-256"), (example,))
    with pytest.raises(VelaRefusal) as refused:
        compile_tosa(graph, load_target(name).vela, "NPU region 1")
    message = str(refused.value)
    assert message.startswith("NPU region 1: Vela refuses one of the ops 'first/Conv', 'wide/Conv' (Conv2D): "), message
    assert "could not run on NPU" in message and "Traceback" not in message
    assert refused.value.operator == "Conv2D" and refused.value.ops == ("first/Conv", "wide/Conv")


def test_layers_name_the_op_whose_form_wrote_them():
    """A tensor Vela makes from one of the graph's (``conv.q_int32``: the first half of a RESCALE it splits in two)
    is the work of the op whose form rescales that tensor or a SLICE of it (Vela runs a slice as no command), where
    one does or one alone rescales it to the suffix's type; else of the op that wrote it."""
    operators = (
        TosaOperator("CONV2D", "conv.q", "conv/Conv", ("x", "conv.w")),
        TosaOperator("RESCALE", "add.term0", "add/Add", ("conv.q", "add.m")),
        TosaOperator("CONV2D", "next.q", "next/Conv", ("conv.q", "next.w")),
        TosaOperator("RESCALE", "cat.part0", "cat/Concat", ("next.q",)),
        TosaOperator("RESCALE", "cat2.part0", "cat2/Concat", ("next.q",)),
        TosaOperator("CONV2D", "cv1.q", "cv1/Conv", ("x", "cv1.w")),
        TosaOperator("SLICE", "chunk.0", "chunk/Split", ("cv1.q", "chunk.0.start", "chunk.0.size")),
        TosaOperator("SLICE", "chunk.1", "chunk/Split", ("cv1.q", "chunk.1.start", "chunk.1.size")),
        TosaOperator("RESCALE", "res.term0", "res/Add", ("chunk.1", "res.m"), "INT32"),
        TosaOperator("RESCALE", "c2f.part0", "c2f/Concat", ("chunk.0", "c2f.m"), "INT8"),
        TosaOperator("RESCALE", "c2f.part1", "c2f/Concat", ("chunk.1", "c2f.m"), "INT8"),
    )
    graph = TosaGraph(b"", (), (), operators)
    assert graph.source_of("conv.q") == "conv/Conv" and graph.source_of("add.term0") == "add/Add"
    assert graph.source_of("conv.q_int32") == "add/Add"
    assert graph.source_of("next.q_int32") == "next/Conv"  # two ops rescale it: the op that wrote it
    assert graph.source_of("cv1.q_int32") == "res/Add"  # through the split, the one rescaling to int32
    assert graph.source_of("x") is None and graph.source_of("unknown_int32") is None


def test_refusal_of_a_broken_graph(digits):
    """Bytes that are no TOSA graph: Vela's own message, no traceback."""
    broken = TosaGraph(digits.flatbuffer[: len(digits.flatbuffer) // 3], digits.inputs, digits.outputs, digits.operators)
    with pytest.raises(VelaRefusal) as refused:
        compile_tosa(broken, load_target("ethos-u65-256").vela)
    assert str(refused.value).startswith("the TOSA graph: Vela refuses the graph: ")
    assert "Traceback" not in str(refused.value) and refused.value.reason


def test_operators_left_to_a_cpu_are_a_refusal():
    """Vela may exit 0 with operators it places on a CPU; TOSA input has no CPU fallback, so they are refused,
    named by the layers Vela marks CPU (its per-layer Target column) or counted from its summary line."""
    npu = VelaLayer("conv1.q", "conv1/Relu", "Conv2D", "Conv2D", "NPU", 10, 10, 0, 0, 0, 0, 100, 1.0, 0)
    cpu = replace(npu, name="up.q", op="up/Resize", original_operator="Resize", operator="Resize", target="CPU")
    refuse_cpu_operators("region0_npu", "CPU operators = 0 (0.0%)\nNPU operators = 1 (100.0%)", (npu,))
    with pytest.raises(VelaRefusal) as refused:
        refuse_cpu_operators("region0_npu", "CPU operators = 1 (50.0%)", (npu, cpu))
    assert str(refused.value) == "region0_npu: Vela leaves 'up/Resize' (Resize) to a CPU; a TOSA graph has no CPU fallback"
    assert refused.value.ops == ("up/Resize",) and refused.value.operator == "Resize"
    with pytest.raises(VelaRefusal, match=r"^region0_npu: Vela leaves 2 operator\(s\) to a CPU; "):
        refuse_cpu_operators("region0_npu", "CPU operators = 2 (50.0%)", (npu,))
