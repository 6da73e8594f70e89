"""uint8 activations as int8: one form for the integer lowering (docs/numerics.md section 9).

A uint8 activation ``q`` with zero point ``z`` stands for the same real numbers as the int8 value ``q - 128``
with zero point ``z - 128``: ``(q - z) * s = ((q - 128) - (z - 128)) * s``, and QuantizeLinear's rounding and
saturation commute with the shift (``[0, 255]`` becomes ``[-128, 127]``). So a region's ONNX graph is rewritten,
exactly, before TVM imports it: every QuantizeLinear / DequantizeLinear of a uint8 activation gets the int8 zero
point (so does a ``ConvInteger`` / ``MatMulInteger`` operand's), a uint8 region input is shifted once on entry
(``Cast``, ``Sub``, ``Cast``) and a uint8 region output once on exit. The compiled program keeps the file's uint8
inputs and outputs; in between, the integer lowering sees only int8 activations, with zero points. Constant
(weight) tensors are left alone.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.export.qoperator import INTEGER_ONLY
from edgeq.numerics import UINT8_SHIFT


def _uint8(tensor_type: onnx.TypeProto) -> bool:
    return tensor_type.tensor_type.elem_type == TensorProto.UINT8


def _shift(graph: onnx.GraphProto, source: str, target: str, to_int8: bool) -> list[onnx.NodeProto]:
    """Nodes computing ``target = source ∓ 128`` through int16 (uint8 -> int8 when ``to_int8``, else back)."""
    wide, offset = f"{target}__int16", f"{target}__offset"
    graph.initializer.append(numpy_helper.from_array(np.array(UINT8_SHIFT, dtype=np.int16), offset))
    return [
        helper.make_node("Cast", [source], [f"{wide}_in"], to=TensorProto.INT16),
        helper.make_node("Sub" if to_int8 else "Add", [f"{wide}_in", offset], [wide]),
        helper.make_node("Cast", [wide], [target], to=TensorProto.INT8 if to_int8 else TensorProto.UINT8),
    ]


def as_int8_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` (a region's QDQ graph) in which every uint8 activation is int8 (module doc); the
    model itself when it has none."""
    constants = {t.name: t for t in model.graph.initializer}
    uint8_inputs = [i.name for i in model.graph.input if _uint8(i.type)]
    activations = set(uint8_inputs) | {
        n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and _uint8_zero_point(n, constants)
    }
    if not activations:
        return model
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            quantized = node.output[0] if node.op_type == "QuantizeLinear" else node.input[0]
            if quantized in activations:
                node.input[2] = _int8_zero_point(graph, constants, node.input[2])
        if node.op_type in INTEGER_ONLY:  # operands 0 and 1 at zero points 2 and 3: each shifted one's follows it
            for operand, zero_point in ((0, 2), (1, 3)):
                if node.input[operand] in activations:
                    inputs = [*node.input, *[""] * (zero_point + 1 - len(node.input))]
                    inputs[zero_point] = _int8_zero_point(graph, constants, inputs[zero_point] or _uint8_zero(graph, constants))
                    node.input[:] = inputs
    entry = []
    for name in uint8_inputs:
        shifted = f"{name}__int8"
        entry += _shift(graph, name, shifted, to_int8=True)
        for node in graph.node:
            node.input[:] = [shifted if i == name else i for i in node.input]
    exit_ = []
    for output in graph.output:
        if _uint8(output.type):
            inner = f"{output.name}__int8"
            for node in graph.node:
                node.output[:] = [inner if o == output.name else o for o in node.output]
                node.input[:] = [inner if i == output.name else i for i in node.input]
            exit_ += _shift(graph, inner, output.name, to_int8=False)
    nodes = entry + list(graph.node) + exit_
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [v for v in graph.value_info if v.name not in activations]  # their element type changed: TVM infers it
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return result


def _uint8_zero_point(node: onnx.NodeProto, constants: dict[str, TensorProto]) -> bool:
    return len(node.input) > 2 and node.input[2] in constants and constants[node.input[2]].data_type == TensorProto.UINT8


def _uint8_zero(graph: onnx.GraphProto, constants: dict[str, TensorProto]) -> str:
    """The name of a uint8 zero initializer (added once): an absent zero point of a uint8 operand."""
    name = "__edgeq_uint8_zero"
    if name not in constants:
        constants[name] = numpy_helper.from_array(np.array(0, np.uint8), name)
        graph.initializer.append(constants[name])
    return name


def _int8_zero_point(graph: onnx.GraphProto, constants: dict[str, TensorProto], name: str) -> str:
    """The name of the int8 twin of the uint8 zero-point initializer ``name`` (added once)."""
    twin = f"{name}__int8"
    if twin not in constants:
        values = numpy_helper.to_array(constants[name]).astype(np.int16) - UINT8_SHIFT
        constants[twin] = numpy_helper.from_array(values.astype(np.int8), twin)
        graph.initializer.append(constants[twin])
    return twin
