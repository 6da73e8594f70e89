"""Hardening of check and of the ONNX reader under it (issue 29): every model that ``compile`` would refuse is
refused by ``check`` first, with one line naming the file and the input, output, node or tensor, and ``compile``
refuses it with the same line (never a traceback). Each bad model is a tiny QDQ graph built with onnx.helper."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.check import Placement, check_model
from edgeq.cli import EXIT_ERROR, main
from edgeq.compile import compile_model
from edgeq.errors import CompileError, ModelFileError, TargetError

OPSET = 13
SHAPE = (1, 2, 4, 4)


def quantize(tensor: str, scale: float = 0.05) -> tuple[list[TensorProto], list[onnx.NodeProto]]:
    """``tensor`` quantized to int8 (node ``<tensor>_Q``, scale ``<tensor>_scale``, zero point ``<tensor>_zp``)
    and dequantized again (node ``<tensor>_DQ``, output ``<tensor>_dq``)."""
    constants = [
        numpy_helper.from_array(np.array(scale, np.float32), f"{tensor}_scale"),
        numpy_helper.from_array(np.array(0, np.int8), f"{tensor}_zp"),
    ]
    parameters = [f"{tensor}_scale", f"{tensor}_zp"]
    nodes = [
        helper.make_node("QuantizeLinear", [tensor, *parameters], [f"{tensor}_q"], f"{tensor}_Q"),
        helper.make_node("DequantizeLinear", [f"{tensor}_q", *parameters], [f"{tensor}_dq"], f"{tensor}_DQ"),
    ]
    return constants, nodes


def qdq_convs(count: int = 1, shape: tuple[int | str, ...] = SHAPE) -> onnx.ModelProto:
    """``x`` through ``count`` 1x1 convolutions ``Conv_<i>`` (output ``y<i>``) of 2 channels, in QDQ form: int8
    activations, int8 weights ``w<i>_q`` with per-channel scales ``w<i>_scale``, no bias."""
    constants, nodes = quantize("x")
    source = "x_dq"
    for i in range(count):
        constants += [
            numpy_helper.from_array(np.ones((2, 2, 1, 1), np.int8), f"w{i}_q"),
            numpy_helper.from_array(np.full(2, 0.01, np.float32), f"w{i}_scale"),
        ]
        nodes += [
            helper.make_node("DequantizeLinear", [f"w{i}_q", f"w{i}_scale"], [f"w{i}_dq"], f"w{i}_DQ", axis=0),
            helper.make_node("Conv", [source, f"w{i}_dq"], [f"y{i}"], f"Conv_{i}"),
        ]
        more_constants, more_nodes = quantize(f"y{i}")
        constants += more_constants
        nodes += more_nodes
        source = f"y{i}_dq"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(source, TensorProto.FLOAT, shape)], constants,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def pooled(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with a global average pool ``Pool_0`` (output ``p``, quantized) after its output."""
    constants, nodes = quantize("p")
    output = model.graph.output[0]
    model.graph.initializer.extend(constants)
    model.graph.node.extend([helper.make_node("GlobalAveragePool", [output.name], ["p"], "Pool_0"), *nodes])
    output.name = "p_dq"
    for dim in output.type.tensor_type.shape.dim[2:]:
        dim.dim_value = 1
    return model


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def replace_constant(model: onnx.ModelProto, tensor: TensorProto) -> None:
    """Put ``tensor`` in place of the initializer of its name."""
    next(i for i in model.graph.initializer if i.name == tensor.name).CopyFrom(tensor)


def scale(name: str, value: float | list[float]) -> Callable[[onnx.ModelProto], None]:
    return lambda model: replace_constant(model, numpy_helper.from_array(np.array(value, np.float32), name))


def stored_as_int32(name: str, data_type: int, value: int) -> Callable[[onnx.ModelProto], None]:
    """An int8/uint8 constant written in ONNX's ``int32_data`` field, which holds values outside the type."""
    return lambda model: replace_constant(model, TensorProto(name=name, data_type=data_type, int32_data=[value]))


def without_nodes(model: onnx.ModelProto) -> None:
    del model.graph.node[:]
    del model.graph.initializer[:]
    model.graph.output[0].name = "x"


def input_as_initializer(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(SHAPE, np.float32), "x"))
    del model.graph.input[:]


def without_outputs(model: onnx.ModelProto) -> None:
    del model.graph.output[:]


def input_as_output(model: onnx.ModelProto) -> None:
    """The input itself is also an output: no op computes it (a quantization of an input, x -> QuantizeLinear ->
    DequantizeLinear -> output, is computed: issue 32)."""
    model.graph.output.append(model.graph.input[0])


def input_dimension(size: int) -> Callable[[onnx.ModelProto], None]:
    def change(model: onnx.ModelProto) -> None:
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = size

    return change


def conv_1_renamed(name: str, unnamed_conv_1: bool = False) -> Callable[[onnx.ModelProto], None]:
    """Two convolutions; ``Conv_1`` renamed ``name`` (or left unnamed, named after its output ``y1``, while
    ``Conv_0`` is renamed ``name``)."""

    def change(model: onnx.ModelProto) -> None:
        model.CopyFrom(qdq_convs(count=2))
        if unnamed_conv_1:
            node(model, "Conv_1").name = ""
            node(model, "Conv_0").name = name
        else:
            node(model, "Conv_1").name = name

    return change


def two_nodes_writing_one_tensor(model: onnx.ModelProto) -> None:
    model.CopyFrom(qdq_convs(count=2))
    node(model, "Conv_1").output[0] = "y0"


def float_weights_quantized_when_run(model: onnx.ModelProto) -> None:
    weights = next(i for i in model.graph.initializer if i.name == "w0_q")
    weights.CopyFrom(numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w0_float"))
    model.graph.node.insert(0, helper.make_node("QuantizeLinear", ["w0_float", "w0_scale"], ["w0_q"], "w0_Q", axis=0))


RANGE = re.escape("(allowed: normal float32 numbers from 1.1754944e-38 to 1.5845632e+29); quantize the model again")

BAD_MODELS = {
    "scale too large": (scale("x_scale", 1e30), rf"QuantizeLinear 'x_Q': scale 'x_scale' is out of range; got 1e\+30 {RANGE}"),
    "subnormal scale": (scale("y0_scale", 1e-40), rf"QuantizeLinear 'y0_Q': scale 'y0_scale' is out of range; got 1e-40 {RANGE}"),
    "NaN scale": (scale("x_scale", float("nan")), rf"QuantizeLinear 'x_Q': scale 'x_scale' is out of range; got nan {RANGE}"),
    "infinite scale": (scale("x_scale", float("inf")), rf"QuantizeLinear 'x_Q': scale 'x_scale' is out of range; got inf {RANGE}"),
    "zero scale": (scale("x_scale", 0.0), rf"QuantizeLinear 'x_Q': scale 'x_scale' is out of range; got 0.0 {RANGE}"),
    "negative scale": (scale("x_scale", -0.5), rf"QuantizeLinear 'x_Q': scale 'x_scale' is out of range; got -0.5 {RANGE}"),
    "zero scale of one channel": (
        scale("w0_scale", [0.01, 0.0]),
        rf"DequantizeLinear 'w0_DQ': scale 'w0_scale' is out of range; got 0.0 for channel 1 {RANGE}",
    ),
    "int8 zero point 1000": (
        stored_as_int32("x_zp", TensorProto.INT8, 1000),
        re.escape("tensor 'x_zp' is int8 but holds 1000 (allowed: -128..127), which readers wrap to -24; write it with values"),
    ),
    "uint8 zero point -3": (
        stored_as_int32("x_zp", TensorProto.UINT8, -3),
        re.escape("tensor 'x_zp' is uint8 but holds -3 (allowed: 0..255), which readers wrap to 253"),
    ),
    "no nodes": (without_nodes, re.escape("the graph has no nodes (nothing to compute); export the model with its nodes")),
    "no inputs": (input_as_initializer, re.escape("the graph has no inputs (a compiled model reads at least one tensor)")),
    "no outputs": (without_outputs, re.escape("the graph has no outputs (a compiled model returns at least one tensor)")),
    "output no op computes": (input_as_output, re.escape("output 'x' is an input ('x'), which no op computes")),
    "input dimension 0": (input_dimension(0), re.escape("input 'x': dimension 0 is 0 (shape [0, 2, 4, 4]); sizes must be at least")),
    "input dimension -5": (input_dimension(-5), re.escape("input 'x': dimension 0 is -5 (shape [-5, 2, 4, 4])")),
    "duplicate node names": (conv_1_renamed("Conv_0"), re.escape("2 nodes are named 'Conv_0' (Conv, Conv); give each node its own")),
    "name of an unnamed node taken": (conv_1_renamed("y1", unnamed_conv_1=True), re.escape("2 nodes are named 'y1' (Conv, Conv)")),
    "two nodes writing one tensor": (
        two_nodes_writing_one_tensor,
        re.escape("tensor 'y0' is written by two nodes, Conv 'Conv_0' and Conv 'Conv_1'; give each node's output its own name"),
    ),
    "constant quantized when run": (
        float_weights_quantized_when_run,
        re.escape("QuantizeLinear 'w0_Q': quantizes the constant 'w0_float' when the model runs; store it quantized instead"),
    ),
}


def saved(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "m.onnx"
    onnx.save(model, str(path))
    return path


def test_the_model_the_cases_change_checks_and_compiles(tmp_path):
    path = saved(qdq_convs(count=2), tmp_path)
    assert check_model(path, target="x86_64").summary.verdict == "runs on the x86_64 CPU"
    assert check_model(path, target="npu-m").summary.verdict == "NPU-ready: every op runs on npu-m"
    assert compile_model(path, target="x86_64", out=tmp_path / "m.edgeq", opt_level=0).artifact.is_file()


@pytest.mark.parametrize("change, message", BAD_MODELS.values(), ids=BAD_MODELS.keys())
def test_check_and_compile_refuse_the_model_with_one_line(change, message, tmp_path):
    model = qdq_convs()
    change(model)
    path = saved(model, tmp_path)
    with pytest.raises(ModelFileError, match=rf"^{re.escape(str(path))}: {message}") as refused:
        check_model(path, target="x86_64")
    assert "\n" not in str(refused.value)
    with pytest.raises(ModelFileError) as refused_by_compile:
        compile_model(path, target="x86_64", out=tmp_path / "m.edgeq")
    assert str(refused_by_compile.value) == str(refused.value)
    assert not (tmp_path / "m.edgeq").exists()


def test_the_command_line_prints_the_one_line(tmp_path, capsys):
    model = qdq_convs()
    scale("x_scale", 1e-40)(model)
    path = saved(model, tmp_path)
    expected = f"{path}: QuantizeLinear 'x_Q': scale 'x_scale' is out of range; got 1e-40 "
    assert main(["check", str(path), "--target", "x86_64"]) == EXIT_ERROR
    assert capsys.readouterr().err.startswith(f"edgeq check: error: {expected}")
    assert main(["compile", str(path), "--target", "x86_64", "-o", str(tmp_path / "m.edgeq")]) == EXIT_ERROR
    error = capsys.readouterr().err
    assert f"edgeq compile: error: {expected}" in error and "Traceback" not in error


@pytest.mark.parametrize("target", ["x86_64", "npu-m"])
def test_scales_without_a_requantization_multiplier_make_the_op_unsupported(target, tmp_path):
    """x_scale 1e20 is a float32 scale, but Conv_0's multiplier 1e20 * 0.01 / 0.05 needs a left shift: check says
    unsupported, and compile refuses the op with the same reason (not with TVM's traceback)."""
    model = qdq_convs()
    scale("x_scale", 1e20)(model)
    path = saved(model, tmp_path)
    reason = "'Conv_0' channel 0: requantization multiplier 2e+19 needs shift -34; allowed: multipliers in [2**-32, 2**30)"
    conv = check_model(path, target=target).node("Conv_0")
    assert conv.placement is Placement.UNSUPPORTED and conv.reasons[0].message.startswith(reason)
    with pytest.raises(CompileError, match=rf"^Conv 'Conv_0' cannot run on {target}: {re.escape(reason)}"):
        compile_model(path, target=target, out=tmp_path / "m.edgeq")
    assert not (tmp_path / "m.edgeq").exists()


def test_a_dynamic_dimension_is_checked_and_compile_asks_for_its_size(tmp_path):
    """The pool's requantization depends on its input's size: the check places it without its constants."""
    path = saved(pooled(qdq_convs(shape=("N", 2, 4, 4))), tmp_path)
    assert check_model(path, target="x86_64").summary.verdict == "runs on the x86_64 CPU"
    asked = re.escape("input 'x' has no static shape ([-1, 2, 4, 4]); give it one (edgeq compile --input-shape")
    with pytest.raises(CompileError, match=asked):
        compile_model(path, target="x86_64", out=tmp_path / "m.edgeq")
    with pytest.raises(ModelFileError, match=re.escape("input 'x': dimension 0 is 0 (shape [0, 2, 4, 4])")):
        compile_model(path, target="x86_64", out=tmp_path / "m.edgeq", input_shapes={"x": (0, 2, 4, 4)})


def test_unnamed_nodes_are_named_after_their_outputs(tmp_path):
    model = qdq_convs(count=2)
    for each in model.graph.node:
        each.name = ""
    assert [n.record.name for n in check_model(saved(model, tmp_path), target="x86_64").nodes] == ["y0", "y1"]


def test_quantize_nodes_may_share_a_name(tmp_path):
    """Only the ops' names reach reports, placements and regions: QuantizeLinear / DequantizeLinear names may repeat."""
    model = qdq_convs()
    node(model, "y0_Q").name = "Conv_0"
    node(model, "x_DQ").name = "x_Q"
    assert check_model(saved(model, tmp_path), target="x86_64").node("Conv_0").placement is Placement.CPU


def test_the_extremes_of_the_scale_range_are_read(tmp_path):
    model = qdq_convs()
    scale("x_scale", float(np.finfo(np.float32).tiny))(model)
    scale("y0_scale", float(np.finfo(np.float32).max) / 2**31)(model)
    assert check_model(saved(model, tmp_path), target="x86_64").node("Conv_0").record.quant is not None


def test_a_target_file_named_in_the_model_is_not_loaded(tmp_path):
    model = qdq_convs()
    helper.set_model_props(model, {"edgeq.target": str(tmp_path / "mine.toml")})
    path = saved(model, tmp_path)
    with pytest.raises(TargetError, match=r"records target '.*mine\.toml', which is not a built-in target .*; pass --target FILE to use a target file"):
        check_model(path)
    assert check_model(path, target="x86_64").target.name == "x86_64"
