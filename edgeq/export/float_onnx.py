"""Ops left in float (the float fallback) as standard float ONNX nodes, written by torch's own ONNX exporter.

An op that ``prepare_qat_fx`` leaves in float (no integer form, or a module whose qconfig is ``None``) sits in the
QDQ file between the DequantizeLinear of its integer inputs and the QuantizeLinear of its result. Its float nodes
come from one general path, whatever the op: the fx node alone in a small ``fx.GraphModule`` (its float inputs as
the graph's inputs, its static arguments as they are), exported by ``torch.onnx.export`` (TorchScript exporter) at
the file's opset, or at a newer one when torch writes the op only there, and spliced into the QDQ graph under the
node's path, each node's ``doc_string`` saying the op is float and why.
"""

from __future__ import annotations

import io
import operator
import warnings
from collections import deque
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from edgeq.errors import ExportError, first_line

FLOAT_FALLBACK_DOC = "float fallback: "
"""Start of the ``doc_string`` of every float node written here; the rest names the op and the reason."""

OPSETS = (13, 17)
"""The opsets a float op is exported at, in order: the file's own (``OPSET``), then the newest whose QDQ nodes mean
what opset 13's do (opset 18 moves reductions' axes to an input), for ops torch writes only there (attention's
``scaled_dot_product_attention`` needs 14). A file holding such an op imports the newer opset."""

FloatValue = Any
"""A float op's ONNX value: a tensor name, or for an op returning a tuple or list, a tuple of names (``None`` where the
tuple holds no tensor)."""


class FloatGraph(Protocol):
    """Where float nodes go: the QDQ builder's node list, initializers and the opset the file needs."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    opset: int


def emit_float_op(
    graph: FloatGraph,
    node: fx.Node,
    module: nn.Module | None,
    inputs: dict[fx.Node, FloatValue],
    values: dict[fx.Node, Any],
    path: str,
    reason: str,
) -> FloatValue:
    """Append the float ONNX nodes of ``node`` to ``graph`` and return the ONNX value of its result.

    Args:
        inputs: the ONNX value of each of ``node``'s float inputs (an fx node not here is a static value).
        values: every fx node's example value (the float inputs' shapes, the static arguments' values, the result's
            structure).
        path: the stem of every name written (``P/<OpType>_<i>`` nodes, ``P.out`` result, ``P.out<i>`` for a tuple
            or list).
        reason: why the op is float; written as each node's ``doc_string`` (``check`` reports it).

    Raises:
        ExportError: torch's exporter writes no ONNX form of the op (the message names the node, the op and why).
    """
    what = type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))
    if node.target in (operator.getitem, getattr) and isinstance(inputs.get(node.args[0]), tuple):
        # an item of a float op's tuple (``max(x, dim)[0]``, ``.values``): one of its ONNX outputs
        return inputs[node.args[0]][next(i for i, item in enumerate(values[node.args[0]]) if item is values[node])]
    program, examples, sources = _single_op_program(node, module, inputs, values)
    result = values[node]
    several = isinstance(result, (tuple, list))  # aten.meshgrid, unbind... return a list
    positions = [i for i, item in enumerate(result) if isinstance(item, torch.Tensor)] if several else []
    names = [f"{path}.out{i}" for i in positions] if several else [f"{path}.out"]
    exported = _export(program, examples, len(names), graph.opset, f"{what} '{path}'")
    graph.opset = max(graph.opset, next(o.version for o in exported.opset_import if o.domain in ("", "ai.onnx")))
    first = len(graph.nodes)
    _splice(graph, exported.graph, {f"input{i}": source for i, source in enumerate(sources)}, names, path)
    for onnx_node in graph.nodes[first:]:
        onnx_node.doc_string = f"{FLOAT_FALLBACK_DOC}{what} '{path}': {reason}"
    if not several:
        return names[0]
    by_position = dict(zip(positions, names))
    return tuple(by_position.get(i) for i in range(len(result)))


def _single_op_program(
    node: fx.Node, module: nn.Module | None, inputs: dict[fx.Node, FloatValue], values: dict[fx.Node, Any]
) -> tuple[fx.GraphModule, list[torch.Tensor], list[str]]:
    """``node`` alone in a GraphModule: each float tensor it reads is an input (with its example value and ONNX
    name), a tuple of them a tuple of inputs, anything else its static value; a tuple or list result is returned as its
    tensors alone."""
    graph = fx.Graph()
    examples: list[torch.Tensor] = []
    sources: list[str] = []

    def placeholder(name: str, example: torch.Tensor) -> fx.Node:
        examples.append(example)
        sources.append(name)
        return graph.placeholder(f"input{len(examples) - 1}")

    def lift(arg: fx.Node) -> Any:
        value = inputs.get(arg)
        if isinstance(value, str):
            return placeholder(value, values[arg])
        if isinstance(value, tuple):
            return tuple(None if name is None else placeholder(name, example) for name, example in zip(value, values[arg]))
        return values[arg]

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lift)
    op = graph.create_node(node.op, node.target, args, kwargs)
    result = values[node]
    if isinstance(result, (tuple, list)):
        graph.output(tuple(graph.call_function(operator.getitem, (op, i)) for i, item in enumerate(result) if isinstance(item, torch.Tensor)))
    else:
        graph.output(op)
    root = {node.target: module} if module is not None else {}
    return fx.GraphModule(root, graph), examples, sources


def _export(program: fx.GraphModule, examples: list[torch.Tensor], outputs: int, opset: int, what: str) -> onnx.ModelProto:
    """The float ONNX model torch's TorchScript exporter writes of ``program``, at the first of :data:`OPSETS` from
    ``opset`` on that it can write; for an op it has no ONNX form of (``channel_shuffle``, ``diag_embed``,
    ``interpolate``'s ``nearest-exact``), of ``program`` decomposed into core ATen ops by torch's own decompositions
    (torch.export's). What it writes must pass the ONNX checker's full check."""
    failure: Exception | None = None
    for candidate in _programs(program, examples):
        for version in [v for v in OPSETS if v >= opset] or [opset]:
            buffer = io.BytesIO()
            try:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(
                        candidate, tuple(examples), buffer, dynamo=False, opset_version=version,
                        input_names=[f"input{i}" for i in range(len(examples))], output_names=[f"output{i}" for i in range(outputs)],
                    )
                model = onnx.load_from_string(buffer.getvalue())
                onnx.checker.check_model(model, full_check=True)
            except Exception as error:  # torch's exporter has no single error type for "cannot write this op"
                failure = error if candidate is program else failure  # the op's own reason, at the newest opset
                continue
            return _folded(model)
    reason = first_line(failure) or type(failure).__name__
    raise ExportError(f"{what}: left in float, but torch's ONNX exporter cannot write it (opsets {', '.join(map(str, OPSETS))}): {reason}")


def _programs(program: fx.GraphModule, examples: list[torch.Tensor]) -> Iterator[nn.Module]:
    """``program``, then (made only when asked for) ``program`` as core ATen ops: torch.export's default
    decompositions traced on ``examples``."""
    yield program
    try:
        with torch.no_grad():
            decomposed = make_fx(program, decomposition_table=dict(torch.export.default_decompositions().items()))(*examples)
    except Exception:  # an op torch cannot trace or decompose: the first program's failure is the reason given
        return
    yield decomposed


def _folded(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every node computed from constants and static shapes alone evaluated by ONNX's reference
    evaluator into an initializer: the shape arithmetic torch's exporter leaves (reflect padding's pads, ``sort``'s
    ``k`` from ``Shape`` -> ``Gather``, a ``Reshape``'s target from ``Shape`` -> ``Slice`` -> ``Concat``). The file
    has static shapes: a ``Shape`` (or ``Size``) of a tensor whose shape ONNX's shape inference knows is a constant,
    and as a fold may tell a later tensor's shape, folding is repeated until nothing is left to fold. Consumers
    need such values static (TVM's importer takes ``TopK``'s ``k`` only as a constant), and shape inference then
    knows every tensor's shape (the ONNX checker requires shapes on a compiled region's inputs and outputs). An
    ``If`` of a constant condition (torch's checks of a shape) is the branch it takes."""
    while True:
        shapes = _static_shapes(model)
        constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        kept: list[onnx.NodeProto] = []
        pending, folded = deque(model.graph.node), 0
        while pending:
            node = pending.popleft()
            inputs = [t for t in node.input if t]
            if node.op_type == "If" and not node.domain and inputs[0] in constants:
                pending.extendleft(reversed(_taken_branch(node, bool(constants[inputs[0]]), constants)))
                folded += 1
                continue
            if node.op_type in ("Shape", "Size") and not node.domain and inputs[0] in shapes:
                feeds = {inputs[0]: np.broadcast_to(np.float32(0), shapes[inputs[0]])}  # the shape alone, no values
                folded += 1
            elif node.domain or not (inputs or node.op_type == "Constant") or not all(t in constants for t in inputs):
                kept.append(node)
                continue
            else:
                feeds = {t: constants[t] for t in inputs}
                folded += 1
            constants.update(zip(node.output, ReferenceEvaluator(node).run(None, feeds)))
        used = {t for node in kept for t in node.input} | {o.name for o in model.graph.output}
        del model.graph.node[:]
        model.graph.node.extend(kept)
        del model.graph.initializer[:]
        model.graph.initializer.extend(numpy_helper.from_array(np.asarray(value), name) for name, value in constants.items() if name in used)
        if not folded:
            return model


def _taken_branch(node: onnx.NodeProto, condition: bool, constants: dict[str, np.ndarray]) -> list[onnx.NodeProto]:
    """The nodes of the branch an ``If`` of a constant condition takes, its outputs copied to the ``If``'s (the
    branch's initializers added to ``constants``); torch's exporter names tensors uniquely across branches."""
    branch = next(helper.get_attribute_value(a) for a in node.attribute if a.name == ("then_branch" if condition else "else_branch"))
    constants.update((i.name, numpy_helper.to_array(i)) for i in branch.initializer)
    outputs = zip(branch.output, node.output)
    return [*branch.node, *(helper.make_node("Identity", [out.name], [name], name=f"{node.name}/Identity_{i}") for i, (out, name) in enumerate(outputs))]


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of ``model`` whose every dimension ONNX's shape inference knows."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    shapes = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        tensor = info.type.tensor_type
        if tensor.HasField("shape") and all(d.HasField("dim_value") for d in tensor.shape.dim):
            shapes[info.name] = tuple(d.dim_value for d in tensor.shape.dim)
    return shapes


def _splice(graph: FloatGraph, exported: onnx.GraphProto, sources: dict[str, str], outputs: list[str], path: str) -> None:
    """Append ``exported``'s nodes and initializers to ``graph`` with names under ``path``: its inputs read
    ``sources``, its outputs are ``outputs``."""
    renamed = dict(sources)
    renamed.update((o.name, final) for o, final in zip(exported.output, outputs) if o.name not in sources)

    def name(tensor: str) -> str:
        if tensor == "":
            return ""
        return renamed.setdefault(tensor, f"{path}.{tensor.lstrip('/').replace('/', '.')}")

    for initializer in exported.initializer:
        graph.initializers.append(numpy_helper.from_array(numpy_helper.to_array(initializer), name(initializer.name)))
    for count, node in enumerate(exported.node, 1):
        copy = helper.make_node(
            node.op_type, [name(t) for t in node.input], [name(t) for t in node.output], name=f"{path}/{node.op_type}_{count}", domain=node.domain or None
        )
        copy.attribute.extend(node.attribute)
        graph.nodes.append(copy)
    for output, final in zip(exported.output, outputs):
        if output.name in sources:  # the op returns an input as it is
            graph.nodes.append(helper.make_node("Identity", [sources[output.name]], [final], name=f"{path}/Identity"))
