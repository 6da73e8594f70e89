"""ONNX Runtime as the peer of the integer model: whole-model and per-op comparisons in integer steps.

ONNX Runtime fuses QDQ units into integer kernels but requantizes with a float32 multiplier, where edgeq uses a
31-bit fixed-point one; both round half to even, so the two can differ by one step only where a value falls
within float rounding of a tie (docs/numerics.md section 8). :func:`per_op_differences` measures that bound op by
op, each op fed the integer model's exact inputs, so that differences cannot propagate.

On x86-64 CPUs without VNNI (AVX2, AVX-512 without VNNI) ORT's default u8s8 kernels add pairs of u8 x s8 products
in saturating int16 (``vpmaddubsw``) and are not exact when weights use the full int8 range. :func:`peer_path`
probes for that once and picks the ORT configuration :func:`session` uses (docs/export.md, "ONNX Runtime
agreement").
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeq.quantization.graph import record_values
from edgeq.quantization.integer_model import IntegerModel

logger = logging.getLogger(__name__)

PRECISE_INT8 = "session.x64quantprecision"
"""ORT's session entry that replaces its u8s8 kernels by exact (slower) u8u8 ones on x86-64 without VNNI."""

_PROBE_CHANNELS = 8
_PROBE_OUTPUT_SCALE = 2.0**14


@dataclass(frozen=True)
class PeerPath:
    """How :func:`session` runs ORT on this CPU, and why."""

    name: str
    """``fused``, ``fused-u8u8`` or ``float``."""
    config: tuple[tuple[str, str], ...]
    """Session config entries."""
    optimized: bool
    """Graph optimizations (QDQ fusion into integer kernels) on; off runs DequantizeLinear -> float op ->
    QuantizeLinear as written."""
    reason: str


def probe_model() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A one-conv QDQ model ORT fuses into an integer kernel, its input and its exact output.

    Float input -> QuantizeLinear -> DequantizeLinear -> 1x1 Conv -> QuantizeLinear -> DequantizeLinear (ORT fuses
    only units between quantized tensors, not at graph inputs/outputs). Scales 1 in and 2**14 out (exact in float);
    int8 inputs of 127 and weights of 127 over 8 channels: each pair of products is 2 * 127 * 127 = 32258 as int8,
    2 * 255 * 127 = 64770 once ORT shifts the activation to u8 (beyond int16), and the exact output is
    round(8 * 127 * 127 / 2**14) = 8 steps.
    """
    channels, scale = _PROBE_CHANNELS, _PROBE_OUTPUT_SCALE
    weight = np.full((1, channels, 1, 1), 127, np.int8)
    initializers = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(scale, np.float32), "s_out"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "one", "zero"], ["x.q"]),
        helper.make_node("DequantizeLinear", ["x.q", "one", "zero"], ["x.dq"]),
        helper.make_node("DequantizeLinear", ["w", "one", "zero"], ["w.dq"]),
        helper.make_node("Conv", ["x.dq", "w.dq"], ["y.f"]),
        helper.make_node("QuantizeLinear", ["y.f", "s_out", "zero"], ["y.q"]),
        helper.make_node("DequantizeLinear", ["y.q", "s_out", "zero"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "edgeq_int8_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, 1])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = np.full((1, channels, 1, 1), 127, np.int8)
    accumulator = np.einsum("nchw,ochw->nohw", x.astype(np.int64), weight.astype(np.int64))
    exact = np.clip(np.round(accumulator / scale), -128, 127) * np.float32(scale)
    return model, x.astype(np.float32), exact.astype(np.float32)


def _make_session(model: onnx.ModelProto, path: PeerPath, threads: int | None = None, spinning: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if path.optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    for key, value in path.config:
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _probe_is_exact(path: PeerPath) -> bool:
    model, x, exact = probe_model()
    (got,) = _make_session(model, path).run(None, {"x": x})
    return bool(np.array_equal(got, exact))


_FUSED = PeerPath(
    "fused", (), True, "ORT's default fused int8 kernels compute the probe exactly on this CPU (e.g. x86-64 with VNNI)"
)
_FUSED_U8U8 = PeerPath(
    "fused-u8u8", ((PRECISE_INT8, "1"),), True,
    f"ORT's default u8s8 kernels saturate int16 pair sums on this CPU (x86-64 without VNNI); {PRECISE_INT8}=1 "
    "switches them to exact u8u8 kernels",
)
_FLOAT = PeerPath(
    "float", (), False,
    f"ORT's int8 kernels are not exact on this CPU, not even with {PRECISE_INT8}=1: graph optimizations off, ORT "
    "runs each unit as DequantizeLinear -> float32 op -> QuantizeLinear",
)
PEER_PATHS = {path.name: path for path in (_FUSED, _FUSED_U8U8, _FLOAT)}
"""Every configuration :func:`peer_path` chooses from, by name (the fidelity benchmark measures any of them)."""


@functools.cache
def onnx_runtime_int8_is_exact() -> bool:
    """Whether ORT's default session (QDQ fused into integer kernels) computes the probe model exactly."""
    return _probe_is_exact(_FUSED)


@functools.cache
def peer_path() -> PeerPath:
    """The ORT configuration :func:`session` uses here: the default fused kernels where they are exact, else the
    fused kernels with ``session.x64quantprecision=1`` if that makes them exact, else graph optimizations off."""
    if onnx_runtime_int8_is_exact():
        path = _FUSED
    elif _probe_is_exact(_FUSED_U8U8):
        path = _FUSED_U8U8
    else:
        path = _FLOAT
    logger.info("ONNX Runtime %s peer path: %s (%s)", ort.__version__, path.name, path.reason)
    return path


def session(model: onnx.ModelProto, path: PeerPath | None = None, threads: int | None = None, spinning: bool = False) -> ort.InferenceSession:
    """An ORT CPU session configured by ``path`` (default: :func:`peer_path`), on ``threads`` intra-op threads
    (default: ORT's, one per physical core); its idle threads spin only if ``spinning`` (ORT's own default; off
    here, so that they take no core from other engines in one process)."""
    return _make_session(model, path or peer_path(), threads, spinning)


def steps_apart(ort_output: np.ndarray, integers: torch.Tensor, scale: float) -> np.ndarray:
    """|ORT output in steps of ``scale`` - integer output|, per element."""
    ort_steps = np.round(ort_output / np.float32(scale)).astype(np.int64)
    return np.abs(ort_steps - integers.numpy().astype(np.int64))


def intermediate_values(int_model: IntegerModel, *inputs: torch.Tensor) -> dict[str, Any]:
    """Every node's output, by the name the ONNX writer derives tensor names from (module path or node name)."""
    values = record_values(int_model.graph_module, *inputs)
    return {str(node.target) if node.op == "call_module" else node.name: value for node, value in values.items()}


def integer_value(values: dict[str, Any], tensor: str) -> torch.Tensor | None:
    """The integer model's value of a quantized ONNX tensor, from the writer's naming scheme."""
    if not tensor.endswith(".q"):
        return None
    base = tensor[: -len(".q")]
    if isinstance(values.get(base), torch.Tensor):
        return values[base]
    head, _, index = base.rpartition(".")
    if index.isdigit() and isinstance(values.get(head), tuple):
        return values[head][int(index)]
    return None


def op_units(model: onnx.ModelProto, known: Callable[[str], bool]) -> list[tuple[str, list[str]]]:
    """(output, inputs) of every QDQ op unit whose output the integer model has (``known``): from the int8
    tensors its DequantizeLinears read to its QuantizeLinear's output. Quantized tensors the integer model does
    not have (the pre-activation before a fused ReLU, the pooled tensor before a squeeze) are walked through, so
    such units merge with the op before them. Units fed by the float model input are skipped."""
    producer = {out: node for node in model.graph.node for out in node.output}
    constants = {init.name for init in model.graph.initializer}
    units = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or not known(node.output[0]):
            continue
        inputs: list[str] = []
        stack, reaches_input = [node.input[0]], False
        while stack:
            tensor = stack.pop()
            source = producer.get(tensor)
            if source is None:
                reaches_input = True
            elif source.op_type == "DequantizeLinear":
                quantized = source.input[0]
                if quantized in constants or quantized in inputs:
                    continue
                if known(quantized):
                    inputs.append(quantized)
                else:
                    stack.append(producer[quantized].input[0])
            else:
                stack.extend(i for i in source.input if i and i not in constants)
        if not reaches_input:
            units.append((node.output[0], inputs))
    return units


def per_op_differences(
    model: onnx.ModelProto, int_model: IntegerModel, *inputs: torch.Tensor, path: PeerPath | None = None
) -> dict[str, np.ndarray]:
    """For every op unit: ORT (configured by ``path``, default :func:`peer_path`) run on the integer model's exact
    int8 inputs, minus the integer model's output (in steps). Differences cannot propagate: each op is measured
    alone."""
    values = intermediate_values(int_model, *inputs)
    results = {}
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    for output, unit_inputs in op_units(model, lambda name: integer_value(values, name) is not None):
        sub = extractor.extract_model(unit_inputs, [output])
        feeds = {name: integer_value(values, name).numpy() for name in unit_inputs}
        got = session(sub, path).run(None, feeds)[0]
        results[output] = np.abs(got.astype(np.int64) - integer_value(values, output).numpy().astype(np.int64))
    return results
