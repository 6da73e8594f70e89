"""ONNX Runtime as the peer of the integer model: whole-model and per-op comparisons in integer steps.

ONNX Runtime fuses QDQ units into integer kernels but requantizes with a float32 multiplier, where edgeq uses a
31-bit fixed-point one; both round half to even, so the two can differ by one step only where a value falls
within float rounding of a tie (docs/numerics.md section 8). :func:`per_op_differences` measures that bound op by op, each op fed the
integer model's exact inputs, so that differences cannot propagate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from edgeq.quantization.graph import record_values
from edgeq.quantization.integer_model import IntegerModel


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """An ORT CPU session with all graph optimizations (QDQ fusion into integer kernels) and no spinning."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def steps_apart(ort_output: np.ndarray, integers: torch.Tensor, scale: float) -> np.ndarray:
    """|ORT output in steps of ``scale`` - integer output|, per element."""
    ort_steps = np.round(ort_output / np.float32(scale)).astype(np.int64)
    return np.abs(ort_steps - integers.numpy().astype(np.int64))


def intermediate_values(int_model: IntegerModel, *inputs: torch.Tensor) -> dict[str, Any]:
    """Every node's output, by the name the ONNX writer derives tensor names from (module path or node name)."""
    values = record_values(int_model.graph_module, *inputs)
    return {str(node.target) if node.op == "call_module" else node.name: value for node, value in values.items()}


def _integer_value(values: dict[str, Any], tensor: str) -> torch.Tensor | None:
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


def per_op_differences(model: onnx.ModelProto, int_model: IntegerModel, *inputs: torch.Tensor) -> dict[str, np.ndarray]:
    """For every op unit: ORT run on the integer model's exact int8 inputs, minus the integer model's output
    (in steps). Differences cannot propagate: each op is measured alone."""
    values = intermediate_values(int_model, *inputs)
    results = {}
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    for output, unit_inputs in op_units(model, lambda name: _integer_value(values, name) is not None):
        sub = extractor.extract_model(unit_inputs, [output])
        feeds = {name: _integer_value(values, name).numpy() for name in unit_inputs}
        got = session(sub).run(None, feeds)[0]
        results[output] = np.abs(got.astype(np.int64) - _integer_value(values, output).numpy().astype(np.int64))
    return results
