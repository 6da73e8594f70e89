"""Fusion: which nodes of the user's graph become one canonical op with the node before them.

A conv, and a linear layer whose output is 2-D (N, C), take the BatchNorm after it (folded) and a ReLU/ReLU6 after
that; any other linear layer, an add and a BatchNorm with no such layer before it take a ReLU/ReLU6; ``x * g(x)``
with ``g`` a gate (sigmoid, hard sigmoid) is the gated activation (SiLU, Hardswish). A node fuses only into its
input's op, as that op's sole reader, and never when it stays float.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

from edgeq.ops import Op, gated_op
from edgeq.quantization.graph import folded_parameters, input_nodes, tensor_info
from edgeq.quantization.patterns import PreFusionOp, SourceOp, argument
from edgeq.quantization.qat_modules import Activation

FUSABLE_ACTIVATIONS: dict[SourceOp, Activation] = {Op.RELU: Activation.RELU, PreFusionOp.RELU6: Activation.RELU6}
"""The activations an op fuses, as the clamp it applies after requantization."""

_HEADS = (Op.CONV2D, Op.LINEAR, Op.ADD, PreFusionOp.BATCH_NORM)
"""The ops that take an activation after them."""


@dataclass
class Fusion:
    """A head node and the nodes fused into it (BatchNorm, activation), last one last."""

    head: fx.Node
    batchnorm: fx.Node | None = None
    activation_node: fx.Node | None = None
    activation: Activation = Activation.NONE

    @property
    def last(self) -> fx.Node:
        return self.activation_node or self.batchnorm or self.head

    @property
    def absorbed(self) -> list[fx.Node]:
        return [n for n in (self.batchnorm, self.activation_node) if n is not None]


def find_fusions(
    kinds: dict[fx.Node, SourceOp | None], region: set[fx.Node], stays_float: Callable[[fx.Node], bool]
) -> tuple[dict[fx.Node, Fusion], set[fx.Node]]:
    """The fusion each head node of the integer region starts, and the nodes fused away (with the parameters of a
    folded ``F.batch_norm`` that nothing else reads).

    Args:
        kinds: what each node of the region is (:func:`edgeq.quantization.patterns.source_op`).
        stays_float: whether a node of the region stays float (it then fuses with nothing).
    """
    return _Finder(kinds, region, stays_float).find()


class _Finder:
    def __init__(self, kinds: dict[fx.Node, SourceOp | None], region: set[fx.Node], stays_float: Callable[[fx.Node], bool]) -> None:
        self.kinds = kinds
        self.region = region
        self.stays_float = stays_float
        self.fusions: dict[fx.Node, Fusion] = {}
        self.absorbed: set[fx.Node] = set()

    def _sole_user(self, node: fx.Node) -> fx.Node | None:
        users = list(node.users)
        if len(users) != 1 or users[0] not in self.region or self.stays_float(users[0]):
            return None
        operands = [n for n in input_nodes(users[0]) if n not in folded_parameters(users[0])]
        return users[0] if operands == [node] else None

    def _gating_mul(self, node: fx.Node) -> fx.Node | None:
        """The ``x * node`` that makes ``node = g(x)`` a gated activation (``x * sigmoid(x)`` is SiLU)."""
        users = list(node.users)
        if len(users) != 1 or users[0] not in self.region or self.kinds.get(users[0]) is not Op.MUL:
            return None
        if self.stays_float(users[0]):
            return None
        operands = [argument(users[0], 0, "input"), argument(users[0], 1, "other")]
        return users[0] if sorted(operands, key=id) == sorted([node, node.args[0]], key=id) else None

    def _folds_into(self, batchnorm: fx.Node) -> bool:
        """Whether ``batchnorm`` folds into the layer that produces its input: a conv, or a linear layer whose
        output is (N, C) (on (N, L, C) a BatchNorm1d normalises L, no output channel of the linear)."""
        source = batchnorm.args[0]
        return self._takes_batchnorm(source) and self._sole_user(source) is batchnorm

    def _takes_batchnorm(self, node: fx.Node) -> bool:
        """Whether a BatchNorm of ``node``'s output is over its output channels (so folds into its weights)."""
        kind = self.kinds.get(node)
        return kind is Op.CONV2D or (kind is Op.LINEAR and len(tensor_info(node).shape) == 2)

    def find(self) -> tuple[dict[fx.Node, Fusion], set[fx.Node]]:
        for node, kind in self.kinds.items():
            if self.stays_float(node):
                continue
            if kind is PreFusionOp.BATCH_NORM:
                self.absorbed.update(p for p in folded_parameters(node) if len(p.users) == 1)
            gated = isinstance(kind, Op) and gated_op(kind) is not None
            if gated and (mul := self._gating_mul(node)) is not None:
                self.fusions[node] = Fusion(node, activation_node=mul)
                self.absorbed.add(mul)
            if kind not in _HEADS or (kind is PreFusionOp.BATCH_NORM and self._folds_into(node)):
                continue
            fusion = Fusion(node)
            follower = self._sole_user(node)
            if self._takes_batchnorm(node) and follower is not None and self.kinds.get(follower) is PreFusionOp.BATCH_NORM:
                fusion.batchnorm = follower
                follower = self._sole_user(follower)
            if follower is not None and self.kinds.get(follower) in FUSABLE_ACTIVATIONS:
                fusion.activation_node = follower
                fusion.activation = FUSABLE_ACTIVATIONS[self.kinds[follower]]
            self.fusions[node] = fusion
            self.absorbed.update(fusion.absorbed)
        return self.fusions, self.absorbed
