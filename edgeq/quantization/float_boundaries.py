"""The float fallback's boundaries in the prepared graph: where an op left in float meets the integer region.

An op of the integer region that edgeq cannot run in integers (LayerNorm, Softmax, Mish...), and every op of a
module whose qconfig is ``None``, is copied as the user wrote it, never silently: an :class:`EnterFloat`
(dequantize) before each integer input it reads, a calibrated :class:`LeaveFloat` (quantize) after it where an
integer op reads its result, and a :class:`FloatFallbackWarning` naming the node, the op and the reason
(docs/numerics.md "Float fallback"). With ``strict=True`` such an op is an error naming the node and the op instead.
Constant tensors (parameters) that the region reads get a calibrated quantize too.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch.fx as fx

from edgeq.quantization.fake_quantize import ActivationFakeQuantize
from edgeq.quantization.graph import VALUE_KEY, describe_node, input_nodes
from edgeq.quantization.patterns import moves_values
from edgeq.quantization.qat_modules import FLOAT_REASON_KEY, EnterFloat, LeaveFloat

if TYPE_CHECKING:
    from edgeq.quantization.rewriter import Rewriter


class FloatFallbackWarning(UserWarning):
    """An op of the integer region stays float (it runs on the CPU between a dequantize and a quantize)."""


class FloatBoundaries:
    """The float outputs of a :class:`Rewriter`'s graph and the quantizes and dequantizes between them and integers.

    Attributes:
        float_outputs: the float copy of each op left in float.
        quantized_constants: the quantize of each constant tensor the integer region reads.
    """

    def __init__(self, rewriter: Rewriter, constants: set[fx.Node]) -> None:
        self.rewriter = rewriter
        self.float_outputs: dict[fx.Node, fx.Node] = {}
        self.dequantized: dict[fx.Node, fx.Node] = {}
        self.constants = constants
        self.quantized_constants: dict[fx.Node, fx.Node] = {}

    def fall_back(self, node: fx.Node, reason: str) -> None:
        """Copy ``node`` as a float op: a dequantize before each integer input, a quantize after on demand."""
        if self.rewriter.strict:
            raise self.rewriter.unsupported(node, f"{reason}; strict=True asks for a fully integer model")
        warnings.warn(
            f"{describe_node(node, self.rewriter.modules)}: {reason}: it runs in float on the CPU between a dequantize "
            "and a calibrated quantize (prepare_qat_fx(..., strict=True) refuses it instead)",
            FloatFallbackWarning,
            stacklevel=5,
        )
        self.keep_float(node, reason)

    def keep_float(self, node: fx.Node, reason: str) -> None:
        """Copy ``node`` as a float op, reading float values, with its reason in ``node.meta``."""
        if node.op == "call_module":
            self.rewriter.new_modules[node.target] = self.rewriter.modules[node.target]
        copied = self.rewriter.graph.node_copy(node, self.float_value)
        copied.meta[FLOAT_REASON_KEY] = reason
        self.float_outputs[node] = copied

    def float_tuple(self, node: fx.Node) -> fx.Node | None:
        """The op left in float whose tuple result ``node`` takes an item of (``attention(x, x, x)[0]``): the item is
        part of that op, in float too (a tuple has no quantize)."""
        if not moves_values(self.rewriter.kinds[node]):
            return None
        return next((n for n in input_nodes(node) if n in self.float_outputs and isinstance(n.meta.get(VALUE_KEY), tuple)), None)

    def float_value(self, node: fx.Node) -> fx.Node:
        """``node``'s value as a float op reads it: its float output, or its integer value dequantized."""
        rewriter = self.rewriter
        if node in self.float_outputs:
            return self.float_outputs[node]
        if node not in rewriter.region:
            return rewriter.env[node]
        if node not in self.dequantized:
            value = rewriter.env[node]
            path = rewriter.unique_path(f"{rewriter.functional_path(node, node.name)}_dequantize")
            rewriter.new_modules[path] = EnterFloat()
            with rewriter.graph.inserting_after(value):
                self.dequantized[node] = rewriter.graph.call_module(path, (value,))
            self.dequantized[node].meta = dict(node.meta)
        return self.dequantized[node]

    def integer_value(self, node: fx.Node) -> fx.Node:
        """``node``'s value as an integer op reads it: itself, or the calibrated quantize of a float op's output
        or of a constant tensor (a parameter such as ViT's class token)."""
        env = self.rewriter.env
        if node in self.constants:
            if node not in self.quantized_constants:
                stem = str(node.target) if node.op == "get_attr" else node.name
                self.quantized_constants[node] = self._leave_float(node, env[node], stem)
            return self.quantized_constants[node]
        if node not in env:
            env[node] = self._leave_float(node, self.float_outputs[node], self.rewriter.functional_path(node, node.name))
        return env[node]

    def _leave_float(self, node: fx.Node, value: fx.Node, stem: str) -> fx.Node:
        """A calibrated quantize, at ``<stem>_quantize``, of the float ``value`` computed by ``node``."""
        rewriter = self.rewriter
        path = rewriter.unique_path(f"{stem}_quantize")
        observer = rewriter.global_qconfig.activation_observer()
        rewriter.new_modules[path] = LeaveFloat(
            ActivationFakeQuantize(observer, rewriter.scale_rule, owner=path, rounding=rewriter.rounding, quantizes_float=True)
        )
        with rewriter.graph.inserting_after(value):
            quantized = rewriter.graph.call_module(path, (value,))
        quantized.meta = dict(node.meta)
        return quantized
