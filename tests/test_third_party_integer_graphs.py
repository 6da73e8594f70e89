"""ONNX files whose inputs or outputs are integers (a QLinearConv taking uint8; a graph that is one QuantizeLinear
or one DequantizeLinear) compile; both runtimes take and give the file's integers, equal to ONNX Runtime."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.compile import compile_model
from edgeq.export.peer import session
from edgeq_runtime import Model

SCALE = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z")]


def _save(path: Path, node: onnx.NodeProto, x: tuple[int, list[int]], y: tuple[int, list[int]], constants: list) -> Path:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", *x)], [helper.make_tensor_value_info("y", *y)], constants)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def _quantize(folder: Path) -> Path:
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], "quantize")
    return _save(folder / "q.onnx", node, (TensorProto.FLOAT, [2, 5]), (TensorProto.UINT8, [2, 5]), SCALE)


def _dequantize(folder: Path) -> Path:
    node = helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], "dequantize")
    return _save(folder / "dq.onnx", node, (TensorProto.UINT8, [2, 5]), (TensorProto.FLOAT, [2, 5]), SCALE)


def _qlinear_conv(folder: Path) -> Path:
    """uint8 in and out, per-channel int8 weights, an int32 bias."""
    generator = np.random.default_rng(2)
    constants = [
        *SCALE,
        numpy_helper.from_array(generator.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8), "w"),
        numpy_helper.from_array(np.array([0.004, 0.002, 0.003, 0.001], np.float32), "s_w"),
        numpy_helper.from_array(np.zeros(4, np.int8), "z_w"),
        numpy_helper.from_array(np.array(0.7, np.float32), "s_y"),
        numpy_helper.from_array(np.array(100, np.uint8), "z_y"),
        numpy_helper.from_array(np.array([300, -2000, 0, 45], np.int32), "b"),
    ]
    node = helper.make_node("QLinearConv", ["x", "s", "z", "w", "s_w", "z_w", "s_y", "z_y", "b"], ["y"], "conv", pads=[1, 1, 1, 1])
    return _save(folder / "qlinearconv.onnx", node, (TensorProto.UINT8, [1, 3, 9, 7]), (TensorProto.UINT8, [1, 4, 9, 7]), constants)


def _inputs(shape: list[int], dtype: np.dtype) -> list[np.ndarray]:
    generator = np.random.default_rng(4)
    if np.issubdtype(dtype, np.integer):
        return [generator.integers(0, 256, shape).astype(dtype) for _ in range(3)]
    return [(generator.normal(size=shape) * 10).astype(dtype) for _ in range(3)] + [np.array([[0.05, -0.05, 0.15, 12.75, -12.85]] * 2, np.float32)]


GRAPHS = {"quantize": _quantize, "dequantize": _dequantize, "qlinearconv": _qlinear_conv}


@pytest.fixture(params=sorted(GRAPHS))
def compiled(request, tmp_path) -> tuple[Path, Path, list[np.ndarray]]:
    """A graph with integer inputs or outputs, compiled, and its inputs in the file's dtype."""
    path = GRAPHS[request.param](tmp_path)
    result = compile_model(path, target="x86_64", out=tmp_path / "m.edgeq", progress=lambda _: None)
    graph = onnx.load(str(path)).graph
    x, y = graph.input[0], graph.output[0]
    for entry, info in ((result.manifest["inputs"][0], x), (result.manifest["outputs"][0], y)):
        declared = onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
        assert entry["dtype"] == "uint8" and (entry["quant"] is None) is (declared == np.uint8)  # integers as they are
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    return path, result.artifact, _inputs(shape, onnx.helper.tensor_dtype_to_np_dtype(x.type.tensor_type.elem_type))


def test_the_python_runtime_equals_onnx_runtime(compiled):
    """Exact: ONNX Runtime quantizes, dequantizes and computes this QLinearConv's integers as edgeq does here."""
    path, artifact, inputs = compiled
    peer = session(onnx.load(str(path)))
    with Model.load(artifact) as model:
        for x in inputs:
            ours = model.run({"x": x})["y"]
            (theirs,) = peer.run(None, {"x": x})
            assert ours.dtype == theirs.dtype
            np.testing.assert_array_equal(ours, theirs)


@pytest.fixture(scope="module")
def edgeq_run(cpp_build) -> Path:
    """The C++ runtime for x86_64 (:func:`conftest.cpp_build`)."""
    return cpp_build / "x86_64" / "edgeq-run"


@pytest.mark.flow
def test_the_cpp_runtime_equals_the_python_runtime(compiled, edgeq_run, tmp_path):
    """Slow (builds the C++ runtime): edgeq-run reads and writes the file's dtypes."""
    _, artifact, inputs = compiled
    with Model.load(artifact) as model:
        for index, x in enumerate(inputs):
            np.save(tmp_path / f"x{index}.npy", x)
            folder = tmp_path / f"out{index}"
            done = subprocess.run([str(edgeq_run), str(artifact), "--input", str(tmp_path / f"x{index}.npy"), "--output-dir", str(folder)],
                                  capture_output=True, text=True, check=False, timeout=120)
            assert done.returncode == 0, done.stderr
            ours = np.load(folder / "y.npy")
            expected = model.run({"x": x})["y"]
            assert ours.dtype == expected.dtype
            np.testing.assert_array_equal(ours, expected)
