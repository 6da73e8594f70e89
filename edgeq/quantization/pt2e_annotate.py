"""Which tensors of a torch.export (aten) graph edgeq quantizes, and how: the annotations of an
:class:`~edgeq.quantization.pt2e.EdgeqQuantizer`.

They place quantizers where edgeq's ``prepare_qat_fx`` does (docs/numerics.md):

- a weighted op (conv2d, linear): int8 input and int8 per-channel weight; its bias stays float in the converted
  graph, for :func:`~edgeq.quantization.from_pt2e` to quantize to int32 by edgeq's rule (``round(b / (s_in *
  s_w[c]))`` in float64, where torchao's quantize op multiplies by a float32 reciprocal); a ReLU / ReLU6 that is
  its only reader is fused (the quantizer follows the activation), as for add;
- every other op that requantizes (add, mul, matmul, concat, average pools, lookup-table activations): its inputs
  and its output;
- ops that only move values (max pool, reshape, flatten, transpose, permute, a lone ReLU): the output shares the
  input's quantizer;
- a model input read by a quantized op is quantized on that edge (a ``QuantStub``); with a fixed scale when the
  quantizer was given one for that input.

On a target whose concat cannot rescale (``concat_shares_input_scale``) the concat's inputs share its quantizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torchao.quantization.pt2e.quantizer import (
    FixedQParamsQuantizationSpec,
    QuantizationAnnotation,
    QuantizationSpec,
    QuantizationSpecBase,
    SharedQuantizationSpec,
)

from edgeq.numerics import ACTIVATION_QMAX, ACTIVATION_QMIN, WEIGHT_QMAX, WEIGHT_QMIN
from edgeq.quantization.pt2e_observers import (
    EdgeqActivationFakeQuantize,
    EdgeqActivationObserver,
    EdgeqPerChannelWeightFakeQuantize,
    EdgeqPerChannelWeightObserver,
)
from edgeq.quantization.qconfig import QConfig
from edgeq.targets import Target

aten = torch.ops.aten
ANNOTATION_KEY = "quantization_annotation"
"""The node meta key torchao's prepare reads."""
FOLLOWS_KEY = "edgeq_shares_scale"
"""Node meta key: the node's output is quantized at the scale of the tensor it shares a quantizer with, without
being observed itself (:class:`~edgeq.quantization.pt2e_observers.SharedScaleObserver`)."""

WEIGHTED = {aten.conv2d.default, aten.linear.default}
FUSABLE_PRODUCERS = {*WEIGHTED, aten.add.Tensor, aten.add_.Tensor}
FUSED_ACTIVATIONS = {aten.relu.default, aten.relu_.default, aten.relu6.default, aten.hardtanh.default, aten.hardtanh_.default}
REQUANTIZING = {
    aten.add.Tensor,
    aten.add_.Tensor,
    aten.mul.Tensor,
    aten.mul_.Tensor,
    aten.matmul.default,
    aten.avg_pool2d.default,
    aten.adaptive_avg_pool2d.default,
    aten.mean.dim,
    aten.upsample_bilinear2d.vec,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.hardsigmoid.default,
    aten.hardsigmoid_.default,
    aten.hardswish.default,
    aten.hardswish_.default,
    aten.silu.default,
    aten.silu_.default,
    aten.leaky_relu.default,
    aten.gelu.default,
    aten.elu.default,
}
MOVING = {
    aten.max_pool2d.default,
    aten.upsample_nearest2d.vec,
    aten.flatten.using_ints,
    aten.view.default,
    aten.reshape.default,
    aten.permute.default,
    aten.transpose.int,
    aten.squeeze.dim,
    aten.unsqueeze.default,
    aten.dropout.default,
    aten.dropout_.default,
    *FUSED_ACTIVATIONS,
}
"""Ops whose output has their input's scale (a lone ReLU / ReLU6 clamps at that scale; dropout is the identity in
the integer model)."""


@dataclass(frozen=True)
class Specs:
    """The quantization specs of one quantizer: activations, weights, and the specs of fixed input scales."""

    activation: QuantizationSpec
    weight: QuantizationSpec
    fixed_inputs: Mapping[str, QuantizationSpecBase]

    @staticmethod
    def of(target: Target, qconfig: QConfig, input_scales: Mapping[str, float], is_qat: bool) -> Specs:
        """The specs for ``target`` and ``qconfig``: observers, or (``is_qat``) fake quantizers, which round a fixed
        input scale by the target's rule too."""
        rule, rounding = target.quantization.scale_rule, target.quantization.rounding
        if is_qat:
            activation_ctr = EdgeqActivationFakeQuantize.with_args(
                observer_factory=qconfig.activation_observer, scale_rule=rule, rounding=rounding
            )
            weight_ctr = EdgeqPerChannelWeightFakeQuantize.with_args(scale_rule=rule)
            fixed_inputs: dict[str, QuantizationSpecBase] = {
                name: _activation_spec(
                    EdgeqActivationFakeQuantize.with_args(observer_factory=None, scale_rule=rule, rounding=rounding, fixed_scale=scale)
                )
                for name, scale in input_scales.items()
            }
        else:
            activation_ctr = EdgeqActivationObserver.with_args(observer_factory=qconfig.activation_observer, scale_rule=rule)
            weight_ctr = EdgeqPerChannelWeightObserver.with_args(scale_rule=rule)
            fixed_inputs = {name: _fixed_spec(scale) for name, scale in input_scales.items()}
        weight = QuantizationSpec(
            dtype=torch.int8,
            observer_or_fake_quant_ctr=weight_ctr,
            quant_min=WEIGHT_QMIN,
            quant_max=WEIGHT_QMAX,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
        )
        return Specs(_activation_spec(activation_ctr), weight, fixed_inputs)

    def input_edge(self, producer: fx.Node) -> QuantizationSpecBase:
        """The spec of an op's input read from ``producer`` (a fixed scale for a model input that has one)."""
        if producer.op == "placeholder" and producer.name in self.fixed_inputs:
            return self.fixed_inputs[producer.name]
        return self.activation


def _activation_spec(constructor: Any) -> QuantizationSpec:
    return QuantizationSpec(
        dtype=torch.int8,
        observer_or_fake_quant_ctr=constructor,
        quant_min=ACTIVATION_QMIN,
        quant_max=ACTIVATION_QMAX,
        qscheme=torch.per_tensor_symmetric,
    )


def _fixed_spec(scale: float) -> FixedQParamsQuantizationSpec:
    return FixedQParamsQuantizationSpec(
        dtype=torch.int8, scale=scale, zero_point=0, quant_min=ACTIVATION_QMIN, quant_max=ACTIVATION_QMAX, qscheme=torch.per_tensor_affine
    )


def annotate_graph(graph: fx.Graph, specs: Specs, concat_shares_input_scale: bool) -> None:
    """Annotate every op of ``graph`` that edgeq quantizes (node meta :data:`ANNOTATION_KEY`)."""
    for node in graph.nodes:
        if node.op != "call_function" or ANNOTATION_KEY in node.meta:
            continue
        if node.target in WEIGHTED:
            _annotate_weighted(node, specs)
        elif node.target is aten.cat.default:
            _annotate_concat(node, specs, concat_shares_input_scale)
        elif node.target in REQUANTIZING:
            inputs = {arg: specs.input_edge(arg) for arg in _tensor_inputs(node)}
            _annotate(node, inputs, None if _fuse_activation(node, specs) else specs.activation)
        elif node.target in MOVING and (source := _tensor_inputs(node)):
            _annotate(node, {source[0]: specs.input_edge(source[0])}, SharedQuantizationSpec((source[0], node)))
            node.meta[FOLLOWS_KEY] = True


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The activation inputs of ``node`` (its node arguments that are not parameters)."""
    return [arg for arg in node.all_input_nodes if arg.op != "get_attr"]


def _annotate(node: fx.Node, inputs: dict[fx.Node, QuantizationSpecBase], output: QuantizationSpecBase | None) -> None:
    node.meta[ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=inputs, output_qspec=output, _annotated=True)


def _fuse_activation(node: fx.Node, specs: Specs) -> bool:
    """Give the output quantizer of ``node`` to a ReLU / ReLU6 that is its only reader (True if there is one)."""
    users = list(node.users)
    if node.target not in FUSABLE_PRODUCERS or len(users) != 1 or users[0].target not in FUSED_ACTIVATIONS:
        return False
    activation = users[0]
    if activation.target in (aten.hardtanh.default, aten.hardtanh_.default) and tuple(activation.args[1:3]) != (0.0, 6.0):
        return False
    _annotate(activation, {}, specs.activation)
    return True


def _annotate_weighted(node: fx.Node, specs: Specs) -> None:
    source, weight = node.args[0], node.args[1]
    inputs: dict[fx.Node, QuantizationSpecBase] = {source: specs.input_edge(source), weight: specs.weight}
    _annotate(node, inputs, None if _fuse_activation(node, specs) else specs.activation)


def _annotate_concat(node: fx.Node, specs: Specs, shares_input_scale: bool) -> None:
    """A concat's output is observed; where the target's concat cannot rescale, each input whose producer has a
    quantizer of its own and no other reader is quantized at the concat's scale instead (as
    :func:`~edgeq.quantization.target_constraints.share_concat_scales` does).

    torchao shares a quantizer only with a tensor annotated before, so the group's root is the sharing input that
    comes first in the graph; all its members but the concat's output are :data:`FOLLOWS_KEY` (not observed)."""
    tensors = list(node.args[0])
    sharing = [t for t in tensors if shares_input_scale and _owns_quantizer(t, specs) and len(t.users) == 1]
    if not sharing:
        _annotate(node, {t: specs.input_edge(t) for t in tensors}, specs.activation)
        return
    root = next(n for n in node.graph.nodes if n in sharing)
    shared = SharedQuantizationSpec(root)
    for tensor in sharing:
        tensor.meta[FOLLOWS_KEY] = True
        if tensor is not root:
            tensor.meta[ANNOTATION_KEY].output_qspec = shared
    _annotate(node, {t: shared if t in sharing else specs.input_edge(t) for t in tensors}, shared)


def _owns_quantizer(node: fx.Node, specs: Specs) -> bool:
    """Whether ``node``'s output has a quantizer of its own (not shared, not fused)."""
    annotation = node.meta.get(ANNOTATION_KEY)
    return annotation is not None and annotation.output_qspec is specs.activation
