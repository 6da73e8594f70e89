"""``from_pt2e``: a graph converted by torchao's ``convert_pt2e`` with an
:class:`~edgeq.quantization.pt2e.EdgeqQuantizer` becomes edgeq's :class:`IntegerModel`.

The converted graph (float aten ops between quantize / dequantize ops) is rebuilt as the module-level graph
edgeq's prepare reads: a model input's quantize becomes a ``QuantStub`` with its scale, a dequantized output a
``DeQuantStub``, conv2d / linear ``nn.Conv2d`` / ``nn.Linear`` modules holding the dequantized int8 weights and the
float bias, every other aten op the torch function :data:`~edgeq.quantization.from_export.ATEN_SPELLINGS` gives
it; each tensor's scale is kept on its node. edgeq then prepares that graph for the quantizer's target, fixes every
quantizer at the graph's scale and converts (``convert_fx``): the multipliers, shifts, int32 biases and rounding
are edgeq's (docs/numerics.md). An op edgeq cannot run in integers (softmax, layer norm...) stays float between a
dequantize and a quantize at the graph's scale, with a ``FloatFallbackWarning``, as in edgeq's flow. The integer
weights are checked against the converted graph's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from edgeq.errors import QuantizationError
from edgeq.numerics import float32
from edgeq.quantization.capture import CAPTURE_ATTRIBUTE, Capture
from edgeq.quantization.convert import convert_fx
from edgeq.quantization.from_export import ATEN_SPELLINGS, Spelling
from edgeq.quantization.integer_model import IntegerModel
from edgeq.quantization.integer_ops import IntConv2d, IntLinear
from edgeq.quantization.prepare import prepare_captured
from edgeq.quantization.qat_modules import Requantizing
from edgeq.quantization.qconfig import default_calib_qconfig
from edgeq.quantization.stubs import DeQuantStub, QuantStub
from edgeq.targets import Target

aten = torch.ops.aten
decomposed = torch.ops.quantized_decomposed

TARGET_META = "edgeq_target"
"""Key of the exported graph module's ``meta``: the :class:`~edgeq.targets.Target` an EdgeqQuantizer annotated it
for (kept by ``prepare_pt2e`` and ``convert_pt2e``)."""
SCALE_KEY = "edgeq_pt2e_scale"
"""Node meta key of the rebuilt graph: the scale the converted graph quantizes the node's output with."""

_FUSED_ACTIVATIONS = {torch.relu, F.relu6, F.hardtanh}
"""Spellings of the activations whose scale is their producer's output scale when edgeq fuses them."""


def from_pt2e(converted: fx.GraphModule) -> IntegerModel:
    """edgeq's integer model of a graph that ``convert_pt2e`` converted after ``prepare_pt2e`` /
    ``prepare_qat_pt2e`` with an :class:`~edgeq.quantization.pt2e.EdgeqQuantizer` (its target and scales).

    Raises:
        QuantizationError: the graph was not annotated by an EdgeqQuantizer, quantizes a tensor at two scales,
            lacks a quantize edgeq's flow needs, or holds weights edgeq would quantize differently; each names the
            node.
    """
    target = converted.meta.get(TARGET_META)
    if not isinstance(target, Target):
        raise QuantizationError(
            f"from_pt2e: {type(converted).__name__} was not quantized with an EdgeqQuantizer (prepare_pt2e(exported, "
            "EdgeqQuantizer(target)), calibrate, convert_pt2e); other quantizers' graphs are not edgeq's arithmetic"
        )
    rebuilt, weights = _Rebuilder(converted).run()
    example_inputs = tuple(torch.zeros(n.meta["val"].shape) for n in converted.graph.nodes if n.op == "placeholder")
    prepared, _ = prepare_captured(
        rebuilt, lambda path: default_calib_qconfig, example_inputs, target, training=False, lenient=False, strict=False
    )
    _fix_scales(prepared)
    integer_model = convert_fx(prepared)
    _check_weights(integer_model, weights)
    return integer_model


class _Rebuilder:
    """Builds the module-level graph from the converted graph, node by node (one instance per call)."""

    def __init__(self, converted: fx.GraphModule) -> None:
        self.converted = converted
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.weights: dict[str, torch.Tensor] = {}
        """int8 weights of the converted graph by the module path of their conv / linear."""

    def run(self) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
        for node in self.converted.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = self.graph.placeholder(node.name)
            elif node.op == "get_attr":
                self.env[node] = _attribute(self.converted, str(node.target))
            elif node.op == "call_function":
                self.env[node] = self._function(node)
            elif node.op == "output":
                self.graph.output(self._outputs(node))
            elif not (node.op == "call_module" and str(node.target) == "_guards_fn"):
                raise QuantizationError(f"from_pt2e: the converted graph holds {node.op} '{node.name}', which edgeq does not read")
        for node in self.graph.nodes:
            source = node.args[0] if node.args else None
            if node.target in _FUSED_ACTIVATIONS and SCALE_KEY in node.meta and isinstance(source, fx.Node):
                source.meta.setdefault(SCALE_KEY, node.meta[SCALE_KEY])
        rebuilt = fx.GraphModule(self.root, self.graph, class_name=f"{type(self.converted).__name__}FromPT2E")
        rebuilt.graph.lint()
        setattr(rebuilt, CAPTURE_ATTRIBUTE, Capture.PT2E)
        return rebuilt, self.weights

    def _function(self, node: fx.Node) -> Any:
        if node.target is decomposed.quantize_per_tensor.default:
            return self._quantize(node)
        if node.target is decomposed.dequantize_per_tensor.default:
            return self.env[node.args[0]]
        if node.target is decomposed.dequantize_per_channel.default:
            values, scales, zero_points, axis = (self.env[a] if isinstance(a, fx.Node) else a for a in node.args[:4])
            if bool(torch.as_tensor(zero_points).any()):
                raise QuantizationError(f"from_pt2e: '{node.name}' has nonzero zero points; edgeq's weights are symmetric")
            shape = [-1 if d == axis else 1 for d in range(values.dim())]
            return _Weight(values, (values.to(torch.float32) * scales.reshape(shape)).to(torch.float32))
        if node.target in (aten.conv2d.default, aten.linear.default):
            return self._layer(node)
        spelling = ATEN_SPELLINGS.get(node.target, Spelling(node.target))
        args, kwargs = spelling.call_arguments(node)
        args, kwargs = fx.node.map_arg((tuple(args), dict(kwargs)), self._value)
        return self.graph.create_node("call_function", spelling.function, args, kwargs, name=node.name)

    def _value(self, node: fx.Node) -> Any:
        """The rebuilt graph's value of a converted node (a tensor constant becomes a buffer of the model)."""
        value = self.env[node]
        if isinstance(value, (torch.Tensor, _Weight)):
            path = f"_tensor_constant{len(self.root._buffers)}"
            self.root.register_buffer(path, value.float if isinstance(value, _Weight) else value)
            return self.graph.get_attr(path)
        return value

    def _quantize(self, node: fx.Node) -> fx.Node:
        source, scale = node.args[0], float32(node.args[1])
        value = self.env[source]
        if source.op == "placeholder" and not hasattr(self.root, f"{source.name}_quant"):
            self.root.add_module(f"{source.name}_quant", QuantStub(scale=scale))
            self.env[source] = value = self.graph.call_module(f"{source.name}_quant", (value,))
        if value.meta.get(SCALE_KEY, scale) != scale:
            raise QuantizationError(
                f"from_pt2e: '{source.name}' is quantized at two scales ({value.meta[SCALE_KEY]:.6g} and {scale:.6g}); "
                "edgeq gives each tensor one scale (quantize the model with EdgeqQuantizer)"
            )
        value.meta[SCALE_KEY] = scale
        return value

    def _layer(self, node: fx.Node) -> fx.Node:
        source, weight, bias, *settings = (*node.args, *([None] * (3 - len(node.args))))
        weight = self.env[weight]
        if not isinstance(weight, _Weight):
            raise QuantizationError(f"from_pt2e: {node.name}'s weight is not quantized per channel (quantize with EdgeqQuantizer)")
        bias_value = self.env[bias] if isinstance(bias, fx.Node) else None
        if node.target is aten.conv2d.default:
            stride, padding, dilation, groups = (*settings, *[(1, 1), (0, 0), (1, 1), 1][len(settings) :])
            out_channels, in_channels, *kernel = weight.float.shape
            layer: nn.Module = nn.Conv2d(
                in_channels * groups, out_channels, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), groups,
                bias=bias_value is not None,
            )
        else:
            layer = nn.Linear(weight.float.shape[1], weight.float.shape[0], bias=bias_value is not None)
        with torch.no_grad():
            layer.weight.copy_(weight.float)
            if bias_value is not None:
                layer.bias.copy_(bias_value)
        self.root.add_module(node.name, layer)
        self.weights[node.name] = weight.integers
        return self.graph.call_module(node.name, (self.env[source],))

    def _outputs(self, node: fx.Node) -> Any:
        """The model's outputs in the structure the exported model returns (its pytree codegen's ``out_spec``)."""
        values = [self._output(v) for v in node.args[0]]
        info = getattr(self.converted.graph._codegen, "pytree_info", None)
        return values if info is None or info.out_spec is None else pytree.tree_unflatten(values, info.out_spec)

    def _output(self, value: Any) -> Any:
        """An output of the model: a dequantized tensor through a DeQuantStub, a float one as it is."""
        if not isinstance(value, fx.Node):
            return value
        if value.target is not decomposed.dequantize_per_tensor.default:
            return self._value(value)
        path = f"{value.name}_dequant"
        self.root.add_module(path, DeQuantStub())
        return self.graph.call_module(path, (self.env[value],))


@dataclass(frozen=True)
class _Weight:
    """A weight of the converted graph: its int8 values and its float values (``q * s_c``)."""

    integers: torch.Tensor
    float: torch.Tensor


def _attribute(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _fix_scales(prepared: fx.GraphModule) -> None:
    """Fix every quantizer of ``prepared`` at the scale the converted graph gives its tensor."""
    for node in prepared.graph.nodes:
        module = prepared.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not isinstance(module, Requantizing) or module.output_quantizer is None:
            continue
        if SCALE_KEY not in node.meta:
            raise QuantizationError(
                f"from_pt2e: '{node.target}' ({type(module).__name__}) needs a quantized output, which the converted "
                "graph does not give it (quantize the model with EdgeqQuantizer)"
            )
        quantizer = module.output_quantizer
        quantizer.fixed_scale, quantizer.observer = float32(node.meta[SCALE_KEY]), None


def _check_weights(integer_model: IntegerModel, weights: dict[str, torch.Tensor]) -> None:
    """Refuse an integer model whose int8 weights differ from the converted graph's."""
    for path, module in integer_model.graph_module.named_modules():
        if isinstance(module, (IntConv2d, IntLinear)) and path in weights and not torch.equal(module.weight, weights[path]):
            raise QuantizationError(
                f"from_pt2e: '{path}': edgeq quantizes this weight differently from the converted graph (its per-channel "
                "scales are not edgeq's: quantize the model with EdgeqQuantizer)"
            )
