"""torch.export's graph of a model rebuilt as the module-level graph torch.fx traces.

torch.export captures code symbolic tracing cannot (iterating over a tensor's chunks, Python branches on shapes)
as aten ops, each with the module calls it ran in (``node.meta["nn_module_stack"]``). Prepare reads module
calls and torch functions, so the graph is rebuilt in those terms:

- the ops of one call of a leaf module (:func:`~edgeq.quantization.graph.is_leaf_module`: torch.nn's layers,
  edgeq's stubs) become one ``call_module`` node on the model's own submodule, reading the call's tensor input;
- every other aten op becomes the torch function :data:`ATEN_SPELLINGS` gives it (in-place ops their out-of-place
  function, as prepare's ops are); copies and detaches read as their input; an aten op edgeq has no spelling
  for stays as it is (prepare treats it as any function it does not know: float fallback inside the integer
  region, copied outside it);
- parameters, buffers and constants, inputs of torch.export's graph, are module attributes again.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from edgeq.errors import TraceError
from edgeq.quantization.graph import is_leaf_module
from edgeq.quantization.stubs import is_dequant_stub, is_quant_stub

aten = torch.ops.aten


Arguments = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class Spelling:
    """The torch function an aten op is written as, and how the aten op's arguments become its arguments."""

    function: Callable[..., Any]
    arguments: Callable[[list[Any]], Arguments] | None = None
    """From the aten op's arguments (all of them, in its schema's order, defaults filled in) to ``function``'s
    positional and keyword arguments; ``None``: the aten op's arguments as given."""

    def call_arguments(self, node: fx.Node) -> Arguments:
        """``function``'s arguments for the aten ``node``."""
        if self.arguments is None:
            return tuple(node.args), dict(node.kwargs)
        schema = node.target._schema.arguments
        return self.arguments([*node.args, *(node.kwargs.get(a.name, a.default_value) for a in schema[len(node.args) :])])


def _index(dim: int, item: int | slice) -> tuple[Any, ...]:
    """The ``tensor[...]`` index that applies ``item`` along ``dim``."""
    if dim < 0:
        return (Ellipsis, item, *(slice(None),) * (-dim - 1))
    return (*(slice(None),) * dim, item)


ATEN_SPELLINGS: dict[Any, Spelling] = {
    aten.add.Tensor: Spelling(torch.add),
    aten.add_.Tensor: Spelling(torch.add),
    aten.mul.Tensor: Spelling(torch.mul),
    aten.mul_.Tensor: Spelling(torch.mul),
    aten.sub.Tensor: Spelling(torch.sub),
    aten.div.Tensor: Spelling(torch.div),
    aten.conv2d.default: Spelling(F.conv2d),
    aten.conv2d.padding: Spelling(F.conv2d),
    aten.linear.default: Spelling(F.linear),
    aten.matmul.default: Spelling(torch.matmul),
    aten.bmm.default: Spelling(torch.bmm),
    aten.cat.default: Spelling(torch.cat),
    aten.relu.default: Spelling(torch.relu),
    aten.relu_.default: Spelling(torch.relu),
    aten.relu6.default: Spelling(F.relu6),
    aten.hardtanh.default: Spelling(F.hardtanh),
    aten.hardtanh_.default: Spelling(F.hardtanh),
    aten.sigmoid.default: Spelling(torch.sigmoid),
    aten.sigmoid_.default: Spelling(torch.sigmoid),
    aten.tanh.default: Spelling(torch.tanh),
    aten.hardsigmoid.default: Spelling(F.hardsigmoid),
    aten.hardsigmoid_.default: Spelling(F.hardsigmoid),
    aten.hardswish.default: Spelling(F.hardswish),
    aten.hardswish_.default: Spelling(F.hardswish),
    aten.silu.default: Spelling(F.silu),
    aten.silu_.default: Spelling(F.silu),
    aten.leaky_relu.default: Spelling(F.leaky_relu),
    aten.gelu.default: Spelling(F.gelu),
    aten.elu.default: Spelling(F.elu),
    aten.elu_.default: Spelling(F.elu),
    aten.softmax.int: Spelling(torch.softmax),
    aten.layer_norm.default: Spelling(F.layer_norm, lambda a: (tuple(a[:5]), {})),
    aten.batch_norm.default: Spelling(F.batch_norm, lambda a: ((a[0], a[3], a[4], a[1], a[2], *a[5:8]), {})),
    aten.max_pool2d.default: Spelling(F.max_pool2d),
    aten.avg_pool2d.default: Spelling(F.avg_pool2d),
    aten.adaptive_avg_pool2d.default: Spelling(F.adaptive_avg_pool2d),
    aten.mean.dim: Spelling(torch.mean),
    aten.upsample_nearest2d.vec: Spelling(F.interpolate),
    aten.upsample_bilinear2d.vec: Spelling(
        F.interpolate, lambda a: ((a[0], a[1], a[3]), {"mode": "bilinear", "align_corners": a[2]})
    ),
    aten.view.default: Spelling(torch.reshape),
    aten.reshape.default: Spelling(torch.reshape),
    aten.flatten.using_ints: Spelling(torch.flatten),
    aten.transpose.int: Spelling(torch.transpose),
    aten.permute.default: Spelling(torch.permute),
    aten.squeeze.dim: Spelling(torch.squeeze),
    aten.squeeze.dims: Spelling(torch.squeeze),
    aten.unsqueeze.default: Spelling(torch.unsqueeze),
    aten.chunk.default: Spelling(torch.chunk),
    aten.split.Tensor: Spelling(torch.split),
    aten.split_with_sizes.default: Spelling(torch.split),
    aten.unbind.int: Spelling(torch.unbind),
    aten.narrow.default: Spelling(torch.narrow),
    aten.roll.default: Spelling(torch.roll),
    aten.slice.Tensor: Spelling(operator.getitem, lambda a: ((a[0], _index(a[1], slice(*a[2:5]))), {})),
    aten.select.int: Spelling(operator.getitem, lambda a: ((a[0], _index(a[1], a[2])), {})),
    aten.pad.default: Spelling(F.pad),
    aten.constant_pad_nd.default: Spelling(F.pad, lambda a: ((a[0], a[1]), {"value": a[2]})),
    aten.dropout.default: Spelling(F.dropout),
    aten.dropout_.default: Spelling(F.dropout),
    aten.sym_size.int: Spelling(torch.Tensor.size),
    aten.expand.default: Spelling(torch.Tensor.expand),
    operator.getitem: Spelling(operator.getitem),
}
"""Each aten op of torch.export's graph as the torch function prepare reads (patterns.py's spellings, and those
of the float fallback's ONNX forms). ``aten.sym_size`` and ``aten.expand`` read and use the symbolic batch size:
as tensor methods, as torch.fx records them, TorchScript's trace keeps the size a value of the input instead of
the example's number."""

_SAME_VALUE = {
    aten.clone.default, aten.alias.default, aten.contiguous.default, aten.detach.default, aten.detach_.default, aten.lift_fresh_copy.default,
}
"""Aten ops whose result has its input's values (``contiguous`` too, as under torch.fx: TinyViT's window merge)."""


@contextmanager
def visible_stubs(model: nn.Module) -> Iterator[None]:
    """Meanwhile, every QuantStub and DeQuantStub of ``model`` runs as a copy (``torch.clone``): an identity
    leaves no op in torch.export's graph, a copy does, inside the stub's call, and the rebuild turns it back into
    the stub."""
    stubs = [m for m in model.modules() if is_quant_stub(m) or is_dequant_stub(m)]
    for stub in stubs:
        stub.forward = torch.clone
    try:
        yield
    finally:
        for stub in stubs:
            del stub.forward


def rebuild_module_graph(model: nn.Module, exported: ExportedProgram) -> fx.GraphModule:
    """The module-level graph of ``model``, from ``exported`` (its torch.export capture, stubs visible).

    Raises:
        TraceError: a leaf module's call reads or gives other than one tensor, or the graph has inputs other
            than tensors, parameters, buffers and constants.
    """
    return _Rebuilder(model, exported).run()


@dataclass(frozen=True)
class _LeafCall:
    """One call of a leaf module: its path, and the tensor it reads."""

    path: str
    source: fx.Node


class _Rebuilder:
    """Builds the module-level graph node by node (one instance per call)."""

    def __init__(self, model: nn.Module, exported: ExportedProgram) -> None:
        self.model = model
        self.exported = exported
        self.leaves = {
            path: module
            for path, module in model.named_modules(remove_duplicate=False)
            if path and is_leaf_module(module, path)
        }
        self.first_paths = {id(module): path for path, module in model.named_modules()}
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.attributes: dict[str, str] = {}
        """Placeholder name -> the model attribute it stands for."""
        self.calls: dict[fx.Node, _LeafCall] = {}
        """The node whose value a leaf module call gives -> that call."""
        self.in_calls: set[fx.Node] = set()

    def run(self) -> fx.GraphModule:
        self._read_signature()
        self._find_leaf_calls()
        for node in self.exported.graph.nodes:
            if node.op == "placeholder" and node.name not in self.attributes:
                self.env[node] = self.graph.placeholder(node.name)
            elif node.op == "call_function" and node in self.calls:
                call = self.calls[node]
                self.env[node] = self.graph.call_module(call.path, (self._value(call.source),))
            elif node.op == "call_function" and node not in self.in_calls:
                self.env[node] = self._function(node)
            elif node.op == "output":
                self.graph.output(self._outputs(node))
            elif node.op != "placeholder" and node not in self.in_calls:
                raise TraceError(f"torch.export's graph holds {node.op} '{node.name}', which edgeq does not read")
        rebuilt = fx.GraphModule(self.model, self.graph, class_name=type(self.model).__name__)
        rebuilt.graph.lint()
        return rebuilt

    def _read_signature(self) -> None:
        constants = 0
        for spec in self.exported.graph_signature.input_specs:
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                self.attributes[spec.arg.name] = spec.target
            elif spec.kind is InputKind.CONSTANT_TENSOR:
                path = f"_tensor_constant{constants}"  # as torch.fx names a tensor created in forward
                setattr(self.model, path, self.exported.constants[spec.target])
                self.attributes[spec.arg.name] = path
                constants += 1
            elif spec.kind is not InputKind.USER_INPUT:
                raise TraceError(f"torch.export's graph has a {spec.kind.name} input '{spec.arg.name}', which edgeq does not read")

    def _leaf_call_key(self, node: fx.Node) -> tuple[str, str] | None:
        """The call key and path of the outermost leaf module whose call ran ``node``."""
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            if path in self.leaves:
                return key, path
        return None

    def _find_leaf_calls(self) -> None:
        groups: dict[str, tuple[str, list[fx.Node]]] = {}
        for node in self.exported.graph.nodes:
            if node.op == "call_function" and (found := self._leaf_call_key(node)) is not None:
                groups.setdefault(found[0], (found[1], []))[1].append(node)
        for path, nodes in groups.values():
            members = set(nodes)
            self.in_calls |= members
            sources = list(dict.fromkeys(n for node in nodes for n in node.all_input_nodes if n not in members))
            sources = [n for n in sources if n.name not in self.attributes]
            results = [n for n in nodes if any(user not in members for user in n.users)]
            if not results:
                continue  # its result is never used
            if len(sources) != 1 or len(results) != 1:
                raise TraceError(
                    f"{type(self.leaves[path]).__name__} '{path}': torch.export's graph shows this call reading "
                    f"{len(sources)} tensors and giving {len(results)}; edgeq rebuilds a module call with one tensor "
                    "in and one out (make the model traceable by torch.fx, which keeps any module call, or give "
                    "the module one input)"
                )
            # The module's first path: a module with state at several places (tied weights) is one module, as
            # torch.fx records it.
            self.calls[results[0]] = _LeafCall(self.first_paths[id(self.leaves[path])], sources[0])

    def _value(self, node: Any) -> Any:
        """The rebuilt graph's value of an exported node (module attributes are read where first used)."""
        if not isinstance(node, fx.Node):
            return node
        if node not in self.env and node.name in self.attributes:
            self.env[node] = self.graph.get_attr(self.attributes[node.name])
        return self.env[node]

    def _function(self, node: fx.Node) -> Any:
        if node.target in _SAME_VALUE:
            return self._value(node.args[0])
        spelling = ATEN_SPELLINGS.get(node.target, Spelling(node.target))
        args, kwargs = spelling.call_arguments(node)
        mapped_args, mapped_kwargs = fx.node.map_arg((tuple(args), dict(kwargs)), self._value)
        new_node = self.graph.create_node("call_function", spelling.function, mapped_args, mapped_kwargs, name=node.name)
        if "nn_module_stack" in node.meta:
            new_node.meta["nn_module_stack"] = node.meta["nn_module_stack"]
        return new_node

    def _outputs(self, node: fx.Node) -> Any:
        specs = self.exported.graph_signature.output_specs
        values = [self._value(v) for v, spec in zip(node.args[0], specs) if spec.kind is OutputKind.USER_OUTPUT]
        return pytree.tree_unflatten(values, self.exported.module_call_graph[0].signature.out_spec)
