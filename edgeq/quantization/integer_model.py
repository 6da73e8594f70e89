"""The integer model: the golden reference that every compiled target must reproduce bit for bit."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from edgeq.quantization.integer_ops import IntDequantize, TensorQuant
from edgeq.targets import Rounding


class IntegerModel(nn.Module):
    """An fx graph of integer ops (:mod:`edgeq.quantization.integer_ops`) with every tensor's quantization.

    Calling it takes the float model's inputs and returns its outputs in float (dequantized at each DeQuantStub),
    so it drops into evaluation code written for the float model. An int8 tensor given to a QuantStub input is
    taken as already quantized (e.g. ``pixel - 128`` for ``QuantStub(scale=1/128)``).

    Attributes:
        graph_module: the integer graph; each ``call_module`` node is one integer op.
        tensor_quant: :class:`TensorQuant` of every integer tensor, by node name in ``graph_module.graph``.
        target: name of the target the model was quantized for.
        rounding: that target's :class:`~edgeq.targets.Rounding`, the rule every op of the model rounds ties by.
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        tensor_quant: dict[str, TensorQuant],
        target: str,
        rounding: Rounding = Rounding.HALF_TO_EVEN,
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.tensor_quant = tensor_quant
        self.target = target
        self.rounding = rounding

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.graph_module(*inputs)

    def run_integer(self, *inputs: torch.Tensor) -> Any:
        """Run and return the raw integer outputs (int8, or int32 for a high-precision output) before each
        DeQuantStub, in the structure ``forward`` returns."""
        with torch.no_grad():
            return _StopAtDequantize(self.graph_module).run(*inputs)

    def output_quant(self) -> list[TensorQuant]:
        """The :class:`TensorQuant` of each DeQuantStub's input, in graph order."""
        modules = dict(self.graph_module.named_modules())
        return [
            self.tensor_quant[node.args[0].name]
            for node in self.graph_module.graph.nodes
            if node.op == "call_module" and isinstance(modules[node.target], IntDequantize)
        ]


class _StopAtDequantize(fx.Interpreter):
    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        if isinstance(self.fetch_attr(target), IntDequantize):
            return args[0]
        return super().call_module(target, args, kwargs)
