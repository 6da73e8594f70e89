"""The module-level graph prepare reads: leaf modules, example shapes, the integer region.

The integer region is every tensor that flows from a QuantStub to a DeQuantStub. Nodes outside it (float
pre- and post-processing) are left as they are; shape arithmetic (``x.size()``, ``//``) is neither.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from edgeq.errors import QuantizationError
from edgeq.quantization.stubs import is_dequant_stub, is_quant_stub


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a tensor seen while running the example inputs."""

    shape: tuple[int, ...]
    dtype: torch.dtype


VALUE_KEY = "edgeq_value"
"""``node.meta`` key: :class:`TensorInfo`, a tuple of them, or the Python value (shapes, ints)."""

_FX_TRACER = fx.Tracer()


def is_leaf_module(module: nn.Module, path: str) -> bool:
    """Whether a call of ``module`` is one node of the graph: torch.nn's layers (which torch.fx does not trace
    into) and edgeq's stubs (which must stay visible)."""
    return is_quant_stub(module) or is_dequant_stub(module) or _FX_TRACER.is_leaf_module(module, path)


def unshare_stateless_modules(model: nn.Module) -> None:
    """Give each further place of a module instance used at several places (ultralytics' ``Conv`` shares one
    ``nn.SiLU``, ``default_act``, among all its convolutions) a copy of its own, so that each place is its own op
    with its own quantization. Only modules without parameters and buffers are copied: a copy of one computes the
    same as the original and holds nothing that training would update. Modules with state (tied weights) stay
    shared."""
    seen: set[int] = set()
    replaced: list[str] = []
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if any(path.startswith(f"{done}.") for done in replaced):
            continue  # inside a copy made already
        if id(module) not in seen:
            seen.add(id(module))
            continue
        if next(module.parameters(), None) is None and next(module.buffers(), None) is None:
            parent, _, name = path.rpartition(".")
            setattr(getattr_path(model, parent) if parent else model, name, copy.deepcopy(module))
            replaced.append(path)


def check_example_inputs(example_inputs: object) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` as a tuple.

    Raises:
        QuantizationError: not a tuple or list (a single tensor, most often).
    """
    if not isinstance(example_inputs, (tuple, list)):
        raise QuantizationError(
            f"example_inputs must be a tuple of the model's inputs; got {type(example_inputs).__name__}. "
            "Write example_inputs=(x,) for a single input"
        )
    return tuple(example_inputs)


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)) and any(isinstance(item, torch.Tensor) for item in value):
        return tuple(_describe(item) for item in value)
    return value


class _Recorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, node: fx.Node) -> Any:
        self.values[node] = super().run_node(node)
        return self.values[node]


def record_values(module: fx.GraphModule, *inputs: Any) -> dict[fx.Node, Any]:
    """Run ``inputs`` through ``module`` (without gradients) and return every node's value."""
    recorder = _Recorder(module)
    with torch.no_grad():
        recorder.run(*inputs)
    return recorder.values


def record_example_values(module: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Run ``example_inputs`` through ``module`` and store every node's shape/dtype in ``node.meta``. The module's
    buffers are as they were before (a BatchNorm in training mode would otherwise count the example in its running
    statistics: the example's values must not matter)."""
    example_inputs = check_example_inputs(example_inputs)
    buffers = {name: buffer.clone() for name, buffer in module.named_buffers()}
    try:
        values = record_values(module, *example_inputs)
    except Exception as error:
        raise QuantizationError(f"running the example inputs through the model failed: {error}") from error
    finally:
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(buffers[name])
    for node, value in values.items():
        node.meta[VALUE_KEY] = _describe(value)


def list_sliced_tuples(module: fx.GraphModule) -> None:
    """Rewrite each slice of a tuple of tensors that its users read as a sequence (``torch.cat(x.chunk(2, 1)[::-1])``,
    traced by torch.fx as one ``getitem`` of a slice) into the list of its items, one ``getitem`` each, so that an op
    taking tensors (cat, stack) reads them one by one (``record_example_values`` ran before)."""
    for node in list(module.graph.nodes):
        if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[1], slice):
            continue
        source, window = node.args
        items = source.meta.get(VALUE_KEY) if isinstance(source, fx.Node) else None
        if not isinstance(items, tuple):
            continue
        with module.graph.inserting_before(node):
            listed = [module.graph.call_function(operator.getitem, (source, index)) for index in range(len(items))[window]]
        for item, index in zip(listed, range(len(items))[window]):
            item.meta[VALUE_KEY] = items[index]
        for user in list(node.users):
            user.args = tuple(listed if arg is node else arg for arg in user.args)
            user.kwargs = {key: listed if arg is node else arg for key, arg in user.kwargs.items()}
        if not node.users:
            module.graph.erase_node(node)
    module.graph.lint()
    module.recompile()


def produces_tensor(node: fx.Node) -> bool:
    """Whether the node's example value is a tensor or a tuple of tensors."""
    value = node.meta.get(VALUE_KEY)
    return isinstance(value, TensorInfo) or (isinstance(value, tuple) and any(isinstance(v, TensorInfo) for v in value))


def makes_one_tensor(operand: object) -> bool:
    """Whether ``operand`` is a node whose example value is one tensor (not a constant, nor a number computed from
    a shape, such as ``x.shape[-1] ** -0.5``)."""
    return isinstance(operand, fx.Node) and isinstance(operand.meta.get(VALUE_KEY), TensorInfo)


def tensor_info(node: fx.Node) -> TensorInfo:
    """The example :class:`TensorInfo` of a node that produces one tensor."""
    value = node.meta.get(VALUE_KEY)
    if not isinstance(value, TensorInfo):
        raise QuantizationError(f"node '{node.name}': expected one tensor; got {value!r}")
    return value


def input_nodes(node: fx.Node) -> Iterator[fx.Node]:
    """Every node among ``node``'s arguments, nested lists included, in order."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    yield from found


def folded_parameters(node: fx.Node) -> list[fx.Node]:
    """The parameter and buffer inputs of ``node`` that prepare folds into its op (``F.batch_norm``'s running
    statistics, weight and bias), which are therefore not float tensors entering the integer region."""
    if node.op == "call_function" and node.target is F.batch_norm:
        return [n for n in input_nodes(node) if n.op == "get_attr"]
    return []


def constant_tensors(module: fx.GraphModule) -> set[fx.Node]:
    """The tensors no model input flows into: parameters and buffers used as tensors (ViT's ``self.cls_token``,
    ``self.pos_embed``) and what is computed from them alone (``self.cls_token.expand(n, -1, -1)``: a number taken
    from an input's shape, such as ``n = x.shape[0]``, is not a tensor input). The integer region reads each
    through a calibrated quantize of its own, as it reads the output of an op left in float."""
    modules = dict(module.named_modules())
    constants: set[fx.Node] = set()
    for node in module.graph.nodes:
        if node.op in ("placeholder", "output") or not produces_tensor(node):
            continue
        stub = modules.get(node.target) if node.op == "call_module" else None
        if is_quant_stub(stub) or is_dequant_stub(stub):
            continue
        if all(n in constants for n in input_nodes(node) if produces_tensor(n)):
            constants.add(node)
    return constants


def describe_node(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """``<op> '<node>'`` for messages: the module class or function name, and where the node is."""
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{node.target}'"
    if node.op == "call_method":
        return f"Tensor.{node.target} '{node.name}'"
    if node.op == "call_function":
        aten = isinstance(node.target, torch._ops.OpOverload)  # kept by a torch.export capture
        name = str(node.target) if aten else getattr(node.target, "__name__", str(node.target))
        scope = module_scope(node)
        return f"{name} '{node.name}'" + (f" (in {scope})" if scope else "")
    return f"{node.op} '{node.name}'"


def module_scope(node: fx.Node) -> str:
    """The path of the innermost module whose forward created ``node`` (``""`` for the top level)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else ""


def integer_region(module: fx.GraphModule) -> set[fx.Node]:
    """The nodes that carry quantized tensors: from QuantStubs (included) up to DeQuantStubs (excluded). Besides
    quantized tensors, a node of the region may read :func:`constant_tensors` and the parameters its op folds.

    Raises:
        QuantizationError: no QuantStub; a node mixes quantized and float tensors; a DeQuantStub gets a float
            tensor; a quantized tensor reaches the model output without a DeQuantStub.
    """
    modules = dict(module.named_modules())
    constants = constant_tensors(module)
    region: set[fx.Node] = set()
    for node in module.graph.nodes:
        target_module = modules.get(node.target) if node.op == "call_module" else None
        tensor_inputs = [n for n in input_nodes(node) if produces_tensor(n)]
        quantized_inputs = [n for n in tensor_inputs if n in region]
        if is_quant_stub(target_module):
            if quantized_inputs:
                raise QuantizationError(
                    f"{describe_node(node, modules)}: receives a quantized tensor from '{quantized_inputs[0].name}'; "
                    "a QuantStub takes float input (remove it, or put a DeQuantStub before it)"
                )
            region.add(node)
            continue
        if is_dequant_stub(target_module):
            if not quantized_inputs:
                raise QuantizationError(
                    f"{describe_node(node, modules)}: receives a float tensor; a DeQuantStub ends the integer "
                    "region started by a QuantStub (remove it, or add a QuantStub before)"
                )
            continue
        if node.op == "output":
            if quantized_inputs:
                raise QuantizationError(
                    f"model output: '{quantized_inputs[0].name}' is quantized; put a DeQuantStub before each output"
                )
            continue
        if not quantized_inputs:
            continue
        folded = folded_parameters(node)
        float_inputs = [n for n in tensor_inputs if n not in region and n not in constants and n not in folded]
        if float_inputs:
            raise QuantizationError(
                f"{describe_node(node, modules)}: mixes quantized input '{quantized_inputs[0].name}' with float "
                f"input '{float_inputs[0].name}', which a model input flows into; every such tensor must enter the "
                "integer region through a QuantStub"
            )
        if produces_tensor(node):
            region.add(node)
    if not any(is_quant_stub(modules.get(n.target)) for n in region if n.op == "call_module"):
        raise QuantizationError(
            "the model has no edgeq QuantStub on its path from input to output: wrap the part to quantize "
            "between edgeq.quantization.QuantStub and DeQuantStub"
        )
    return region


def getattr_path(module: nn.Module, path: str) -> Any:
    """``module.a.b.c`` for ``path="a.b.c"``."""
    value: Any = module
    for part in path.split("."):
        value = getattr(value, part)
    return value
