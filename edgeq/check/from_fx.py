"""Op records from a prepared PyTorch graph (canonical ops of ``prepare_qat_fx``), before quantization.

A float model is first prepared with ``prepare_for_analysis``, which keeps the ops that ``prepare_qat_fx`` would
reject; those come out as records with ``rejected`` set, so the check reports all of them at once.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from edgeq.check.records import INPUT_PREFIX, OpRecord, foreign_op_name
from edgeq.quantization import qat_modules as qm
from edgeq.quantization.graph import VALUE_KEY, TensorInfo, input_nodes, produces_tensor
from edgeq.quantization.patterns import Movement, OpKind, movement, op_kind

_MOVEMENT_OPS = {
    Movement.RESHAPE: "reshape",
    Movement.TRANSPOSE: "transpose",
    Movement.SPLIT: "split",
    Movement.GETITEM: "slice",
}

_OUTSIDE_REGION = (
    "float code outside the QuantStub/DeQuantStub region: edgeq deploys only the integer region; do this in "
    "your application, before the input or after the output"
)


def records_from_prepared(prepared: fx.GraphModule, rejected: dict[str, str]) -> list[OpRecord]:
    """One record per op of a prepared graph (reshapes that only alias, dropout and shape arithmetic excluded)."""
    modules = dict(prepared.named_modules())
    producer: dict[fx.Node, str] = {}
    region: set[fx.Node] = set()
    records: list[OpRecord] = []
    for node in prepared.graph.nodes:
        if node.op == "placeholder":
            producer[node] = INPUT_PREFIX + node.name
            continue
        if node.op in ("output", "get_attr") or not produces_tensor(node):
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        sources = [n for n in input_nodes(node) if n in producer]
        if isinstance(module, qm.QuantizeInput):
            region.add(node)
            producer[node] = producer[sources[0]]
            continue
        in_region = any(n in region for n in sources)
        if isinstance(module, qm.DequantizeOutput):
            producer[node] = producer[sources[0]]
            continue
        if op_kind(node, modules) is OpKind.DROPOUT:
            producer[node] = producer[sources[0]]
            if in_region:
                region.add(node)
            continue
        record = _record(node, module, modules, [producer[n] for n in sources], sources)
        if node.name in rejected:
            record.rejected = rejected[node.name]
        elif not in_region:
            record.rejected = _OUTSIDE_REGION
        if record.op == "alias":
            producer[node] = producer[sources[0]]
        else:
            records.append(record)
            producer[node] = record.name
        if in_region:
            region.add(node)
    return records


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    value = node.meta.get(VALUE_KEY)
    if isinstance(value, TensorInfo):
        return value.shape
    if isinstance(value, tuple) and value and isinstance(value[0], TensorInfo):
        return value[0].shape
    return None


def _record(
    node: fx.Node, module: nn.Module | None, modules: dict[str, nn.Module], inputs: list[str], sources: list[fx.Node]
) -> OpRecord:
    name = str(node.target) if node.op == "call_module" else node.name
    op, source_op, attrs = _describe(node, module, modules)
    shapes = [s for s in (_shape(n) for n in sources) if s is not None]
    return OpRecord(name, op, source_op, inputs, shapes, _shape(node), attrs)


def _describe(node: fx.Node, module: nn.Module | None, modules: dict[str, nn.Module]) -> tuple[str, str, dict[str, Any]]:
    if isinstance(module, qm.ConvAct2d):
        attrs = {
            "kernel": tuple(module.weight.shape[2:]),
            "stride": tuple(module.stride),
            "padding": tuple(module.padding),
            "dilation": tuple(module.dilation),
            "groups": module.groups,
            "in_channels": module.weight.shape[1] * module.groups,
            "out_channels": module.weight.shape[0],
            "activation": module.activation.value,
            "weight_bytes": module.weight.numel(),
        }
        parts = ["Conv2d"] + (["BatchNorm2d"] if module.bn is not None else []) + _activation_part(module.activation)
        return "conv2d", "+".join(parts), attrs
    if isinstance(module, qm.LinearAct):
        attrs = {
            "in_features": module.weight.shape[1],
            "out_channels": module.weight.shape[0],
            "activation": module.activation.value,
            "weight_bytes": module.weight.numel(),
        }
        return "linear", "+".join(["Linear", *_activation_part(module.activation)]), attrs
    if isinstance(module, qm.AddAct):
        return "add", "+".join(["add", *_activation_part(module.activation)]), {"activation": module.activation.value}
    if isinstance(module, qm.Concat):
        return "concat", "cat", {"dim": module.dim}
    if isinstance(module, qm.MaxPool2d):
        return "max_pool2d", "MaxPool2d", _pool_attrs(module.kernel_size, module.stride, module.padding)
    if isinstance(module, qm.AvgPool2d):
        return "avg_pool2d", "AvgPool2d", _pool_attrs(module.kernel_size, module.stride, module.padding)
    if isinstance(module, qm.GlobalAvgPool2d):
        return "global_avg_pool2d", "global average pool", {}
    if isinstance(module, qm.Clamp):
        return "relu", module.activation.value, {"activation": module.activation.value}
    if isinstance(module, qm.UpsampleNearest2d):
        return "upsample_nearest2d", "upsample (nearest)", {"factor": tuple(module.scale_factor)}
    if op_kind(node, modules) is OpKind.RESHAPE:
        kind = movement(node, modules)
        return ("alias" if kind is Movement.ALIAS else _MOVEMENT_OPS[kind]), _spelling(node, module), {}
    return foreign_op_name(_spelling(node, module)), _spelling(node, module), {}


def _activation_part(activation: qm.Activation) -> list[str]:
    return [] if activation is qm.Activation.NONE else [{"relu": "ReLU", "relu6": "ReLU6"}[activation.value]]


def _pool_attrs(kernel: Any, stride: Any, padding: Any) -> dict[str, Any]:
    def pair(value: Any) -> tuple[int, int]:
        return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

    return {"kernel": pair(kernel), "stride": pair(stride), "padding": pair(padding)}


def _spelling(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return type(module).__name__
    return node.target if isinstance(node.target, str) else node.target.__name__
