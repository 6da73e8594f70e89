"""ONNX's integer-only ops with constant zero points, ``ConvInteger`` and ``MatMulInteger``, compile: the artifact
gives ONNX Runtime's int32 accumulators (and, through ``Cast`` and ``Mul`` by a constant scale, its floats) bit for
bit, on uint8 and int8 operands, and the C++ runtime gives the Python runtime's. Graphs built with onnx.helper."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.check import check_model
from edgeq.compile import compile_model
from edgeq.errors import ModelFileError
from edgeq.export.peer import session
from edgeq_runtime import Model

CONV_INPUT, CONV_OUTPUT = [1, 4, 9, 7], [1, 6, 5, 6]  # pads (1, 0, 2, 1), strides (2, 1), 2 groups of a 3x3 kernel
MATMUL_INPUT, MATMUL_OUTPUT = [2, 3, 24], [2, 3, 5]


def _integers(generator: np.random.Generator, dtype: type, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    limits = np.iinfo(dtype)
    return generator.integers(limits.min, limits.max + 1, shape).astype(dtype)


def _model(op: str, x: type, w: type, weight_zero_point: np.ndarray, scaled: bool, input_zero_point: int | list[int] = 77) -> onnx.ModelProto:
    """``op`` of input ``x`` (integers; or floats quantized at a constant scale when ``scaled``) by constant weights,
    its int32 output the graph's (or, ``scaled``, cast to float and multiplied by a constant scale); the input's zero
    point is ``input_zero_point`` above the type's least value (per row: a list)."""
    generator = np.random.default_rng(3)
    conv = op == "ConvInteger"
    weights = _integers(generator, w, (6, 2, 3, 3) if conv else (24, 5))
    zero = (np.iinfo(x).min + np.array(input_zero_point)).astype(x)
    constants = [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(zero, "zx"), numpy_helper.from_array(weight_zero_point.astype(w), "zw")]
    nodes, source = [], "x"
    if scaled:
        constants += [numpy_helper.from_array(np.array(0.05, np.float32), "sx"), numpy_helper.from_array(np.array(0.0123, np.float32), "sy")]
        nodes.append(helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], "quantize"))
        source = "xq"
    attributes = {"pads": [1, 0, 2, 1], "strides": [2, 1], "group": 2} if conv else {}
    nodes.append(helper.make_node(op, [source, "w", "zx", "zw"], ["acc"], "op", **attributes))
    output, output_type = "acc", TensorProto.INT32
    if scaled:
        nodes += [helper.make_node("Cast", ["acc"], ["real"], "cast", to=TensorProto.FLOAT), helper.make_node("Mul", ["real", "sy"], ["y"], "scale")]
        output, output_type = "y", TensorProto.FLOAT
    input_type = TensorProto.FLOAT if scaled else helper.np_dtype_to_tensor_dtype(np.dtype(x))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", input_type, CONV_INPUT if conv else MATMUL_INPUT)],
        [helper.make_tensor_value_info(output, output_type, CONV_OUTPUT if conv else MATMUL_OUTPUT)], constants,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


GRAPHS = {
    "conv-u8-s8": ("ConvInteger", np.uint8, np.int8, np.array(-3), False),
    "conv-s8-u8": ("ConvInteger", np.int8, np.uint8, np.array(131), False),
    "conv-per-channel": ("ConvInteger", np.uint8, np.uint8, np.array([0, 255, 128, 7, 200, 64]), False),
    "conv-scaled": ("ConvInteger", np.uint8, np.int8, np.array(0), True),
    "matmul-u8-u8-per-column": ("MatMulInteger", np.uint8, np.uint8, np.array([0, 255, 128, 7, 200]), False),
    "matmul-s8-s8": ("MatMulInteger", np.int8, np.int8, np.array(-128), False),
    "matmul-per-row": ("MatMulInteger", np.uint8, np.int8, np.array(5), False, [0, 200, 255]),
    "matmul-scaled": ("MatMulInteger", np.int8, np.uint8, np.array(100), True),
}


def _ort_result(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime's output. It takes one zero point only for ConvInteger's weights and MatMulInteger's first input:
    where the graph has one per output channel (axis 1) or per row (axis -2), each from the graph with that one's."""
    conv = any(n.op_type == "ConvInteger" for n in model.graph.node)
    name, axis = ("zw", 1) if conv else ("zx", -2)
    values = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
    if values.size == 1:
        return session(model).run(None, {"x": x})[0]
    parts = []
    for index, value in enumerate(values):
        single = onnx.ModelProto()
        single.CopyFrom(model)
        next(t for t in single.graph.initializer if t.name == name).CopyFrom(numpy_helper.from_array(np.array(value, values.dtype), name))
        parts.append(np.take(session(single).run(None, {"x": x})[0], index, axis=axis))
    return np.stack(parts, axis=axis)


def _inputs(model: onnx.ModelProto) -> list[np.ndarray]:
    info = model.graph.input[0]
    shape = [d.dim_value for d in info.type.tensor_type.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
    generator = np.random.default_rng(4)
    if dtype == np.float32:
        return [(generator.normal(size=shape) * 4).astype(np.float32) for _ in range(3)]
    return [_integers(generator, dtype, shape) for _ in range(3)]


@pytest.fixture(params=sorted(GRAPHS))
def compiled(request, tmp_path) -> tuple[onnx.ModelProto, Path, list[np.ndarray]]:
    model = _model(*GRAPHS[request.param])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    result = compile_model(path, target="x86_64", out=tmp_path / "m.edgeq", progress=lambda _: None)
    return model, result.artifact, _inputs(model)


def test_the_python_runtime_equals_onnx_runtime(compiled):
    """Bit for bit: ONNX Runtime's integer kernels are exact, and so is edgeq's int32 arithmetic."""
    model, artifact, inputs = compiled
    with Model.load(artifact) as loaded:
        output = loaded.outputs[0].name
        for x in inputs:
            ours, theirs = loaded.run({"x": x})[output], _ort_result(model, x)
            assert ours.dtype == theirs.dtype
            np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("target", ["x86_64", "npu-s"])
def test_check_places_them_on_the_cpu_with_the_reason(target, tmp_path):
    onnx.save(_model(*GRAPHS["conv-scaled"]), str(tmp_path / "m.onnx"))
    placed = {n.record.name: n for n in check_model(tmp_path / "m.onnx", target=target).nodes}
    assert placed["op"].where == "CPU"  # integers, not "CPU (float)"
    if target == "npu-s":
        assert "convinteger is not among npu-s's ops" in placed["op"].reasons[0].message


def test_a_computed_zero_point_is_refused_as_dynamic_in_one_line(tmp_path):
    model = _model(*GRAPHS["conv-u8-s8"])
    model.graph.node[0].input[2] = "x"
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(ModelFileError, match=r"ConvInteger 'op': zero point 'x' is computed when the model runs \(dynamic quantization\)") as caught:
        compile_model(tmp_path / "m.onnx", target="x86_64", out=tmp_path / "m.edgeq")
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def edgeq_run(cpp_build) -> dict[str, list[str]]:
    """The C++ runtime for x86_64 and for aarch64 (run under qemu; :func:`conftest.cpp_build`): each one's command."""
    return {"x86_64": [str(cpp_build / "x86_64" / "edgeq-run")], "aarch64": [*QEMU, str(cpp_build / "aarch64" / "edgeq-run")]}


QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]


@pytest.mark.flow
@pytest.mark.parametrize("target", ["x86_64", "aarch64"])
def test_the_cpp_runtime_equals_the_python_runtime(compiled, edgeq_run, target, tmp_path):
    """Slow (builds the C++ runtime): edgeq-run reads and writes the file's dtypes; the program built for aarch64,
    run under qemu, gives the same numbers."""
    model, artifact, inputs = compiled
    run = artifact
    if target != "x86_64":
        onnx.save(model, str(tmp_path / "m.onnx"))
        run = compile_model(tmp_path / "m.onnx", target=target, out=tmp_path / f"{target}.edgeq", progress=lambda _: None).artifact
    with Model.load(artifact) as loaded:
        output = loaded.outputs[0]
        for index, x in enumerate(inputs):
            np.save(tmp_path / f"x{index}.npy", x)
            folder = tmp_path / f"out{index}"
            command = [*edgeq_run[target], str(run), "--input", str(tmp_path / f"x{index}.npy"), "--output-dir", str(folder)]
            done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
            assert done.returncode == 0, done.stderr
            ours, expected = np.load(folder / f"{output.name}.npy"), loaded.run({"x": x})[output.name]
            assert ours.dtype == expected.dtype
            np.testing.assert_array_equal(ours, expected)
