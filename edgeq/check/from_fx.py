"""Op records from a prepared PyTorch graph (canonical ops of ``prepare_qat_fx``), before quantization.

A float model is first prepared with ``prepare_for_analysis``, which keeps the ops that ``prepare_qat_fx`` would
reject; those come out as records with ``rejected`` set, so the check reports all of them at once. Ops of the
float fallback come out with ``float_only`` and their reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch import nn

from edgeq.check.records import INPUT_PREFIX, OpRecord, foreign_op_name
from edgeq.op_attrs import (
    ActivationAttrs,
    BilinearResizeAttrs,
    ConcatAttrs,
    Conv2dAttrs,
    LinearAttrs,
    LookupTableAttrs,
    MatMulAttrs,
    NearestResizeAttrs,
    OpAttrs,
    PoolAttrs,
)
from edgeq.ops import LOOKUP_TABLE_OPS, Op, OpTable
from edgeq.quantization import qat_modules as qm
from edgeq.quantization.graph import VALUE_KEY, TensorInfo, input_nodes, produces_tensor
from edgeq.quantization.patterns import PreFusionOp, moves_values, source_op

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
        if node.op in ("output", "get_attr") or not produces_tensor(node) or qm.CONSTANT_KEY in node.meta:
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        sources = [n for n in input_nodes(node) if n in producer]
        if isinstance(module, qm.QuantizeInput):
            region.add(node)
            if sources:  # none for a quantized constant: it is no op's output
                producer[node] = producer[sources[0]]
            continue
        in_region = any(n in region for n in sources)
        if isinstance(module, qm.DequantizeOutput):
            producer[node] = producer[sources[0]]
            continue
        if isinstance(module, qm.EnterFloat):
            producer[node] = producer[sources[0]]
            region.add(node)
            continue
        if source_op(node, modules) is PreFusionOp.DROPOUT:
            producer[node] = producer[sources[0]]
            if in_region:
                region.add(node)
            continue
        record = _record(node, module, modules, [producer[n] for n in sources], sources)
        if qm.FLOAT_REASON_KEY in node.meta:
            record.float_only, record.float_reason = True, node.meta[qm.FLOAT_REASON_KEY]
        if node.name in rejected:
            record.rejected = rejected[node.name]
        elif not in_region:
            record.rejected = _OUTSIDE_REGION
        if record.op == PreFusionOp.ALIAS.value:
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
    if op == Op.MATMUL.value and _quantized_constant(node.args[1]):
        op, attrs = _product_with_weights(node.args[1])
    shapes = [s for s in (_shape(n) for n in sources) if s is not None]
    return OpRecord(name, op, source_op, inputs, shapes, _shape(node), attrs)


def _quantized_constant(operand: object) -> bool:
    """Whether ``operand`` is the quantize of a constant tensor (a parameter)."""
    source = operand.args[0] if isinstance(operand, fx.Node) and operand.args else None
    return isinstance(source, fx.Node) and qm.CONSTANT_KEY in source.meta


def _product_with_weights(weights: fx.Node) -> tuple[str, LinearAttrs]:
    """A product with a constant matrix (``x @ self.weight``) is a linear layer, per-tensor weights: its QDQ file
    reads so (:func:`edgeq.export.onnx_nodes.node_op`), and compile builds it so."""
    rows, columns = weights.meta[VALUE_KEY].shape[-2:]
    return Op.LINEAR.value, LinearAttrs(rows, columns, qm.Activation.NONE.value)


Description = Callable[[nn.Module], tuple[str, OpAttrs | None]]

DESCRIPTIONS: OpTable[Description] = OpTable("check record in check/from_fx.py", lambda info: not info.movement)
"""What the check records of each op's canonical module: the source op for display, and its settings."""


def _describe(node: fx.Node, module: nn.Module | None, modules: dict[str, nn.Module]) -> tuple[str, str, OpAttrs | None]:
    op = qm.CANONICAL.op_of_instance(module) if module is not None else None
    if op is not None:
        spelled, attrs = DESCRIPTIONS[op](module)
        return op.value, spelled, attrs
    moved = source_op(node, modules)
    if moves_values(moved):
        return moved.value, _spelling(node, module), None
    return foreign_op_name(_spelling(node, module)), _spelling(node, module), None


@DESCRIPTIONS.register(Op.CONV2D)
def _conv(module: qm.ConvAct2d) -> tuple[str, Conv2dAttrs]:
    attrs = Conv2dAttrs(
        kernel=tuple(module.weight.shape[2:]),
        stride=tuple(module.stride),
        padding=tuple(module.padding),
        dilation=tuple(module.dilation),
        groups=module.groups,
        in_channels=module.weight.shape[1] * module.groups,
        out_channels=module.weight.shape[0],
        activation=module.activation.value,
    )
    parts = ["Conv2d"] + (["BatchNorm2d"] if module.bn is not None else []) + _activation_part(module.activation)
    return "+".join(parts), attrs


@DESCRIPTIONS.register(Op.LINEAR)
def _linear(module: qm.LinearAct) -> tuple[str, LinearAttrs]:
    attrs = LinearAttrs(in_features=module.weight.shape[1], out_channels=module.weight.shape[0], activation=module.activation.value)
    return "+".join(["Linear"] + (["BatchNorm1d"] if module.bn is not None else []) + _activation_part(module.activation)), attrs


@DESCRIPTIONS.register(Op.ADD)
def _add(module: qm.AddAct) -> tuple[str, ActivationAttrs]:
    return "+".join(["add", *_activation_part(module.activation)]), ActivationAttrs(module.activation.value)


@DESCRIPTIONS.register(Op.MUL)
def _mul(module: qm.Multiply) -> tuple[str, None]:
    return "mul", None


@DESCRIPTIONS.register(Op.MATMUL)
def _matmul(module: qm.MatMul) -> tuple[str, MatMulAttrs]:
    return "matmul", MatMulAttrs(module.reduction_size)


@DESCRIPTIONS.register(Op.CONCAT)
def _concat(module: qm.Concat) -> tuple[str, ConcatAttrs]:
    return "cat", ConcatAttrs(module.dim)


@DESCRIPTIONS.register(Op.MAX_POOL2D)
def _max_pool(module: qm.MaxPool2d) -> tuple[str, PoolAttrs]:
    return "MaxPool2d", _pool_attrs(module.kernel_size, module.stride, module.padding)


@DESCRIPTIONS.register(Op.AVG_POOL2D)
def _avg_pool(module: qm.AvgPool2d) -> tuple[str, PoolAttrs]:
    return "AvgPool2d", _pool_attrs(module.kernel_size, module.stride, module.padding)


@DESCRIPTIONS.register(Op.GLOBAL_AVG_POOL2D)
def _global_avg_pool(module: qm.GlobalAvgPool2d) -> tuple[str, None]:
    return "global average pool", None


@DESCRIPTIONS.register(Op.RELU)
def _clamp(module: qm.Clamp) -> tuple[str, ActivationAttrs]:
    return module.name, ActivationAttrs(module.name)


@DESCRIPTIONS.register(*LOOKUP_TABLE_OPS)
def _lookup_table(module: qm.LookupTableActivation) -> tuple[str, LookupTableAttrs]:
    return module.op.value, LookupTableAttrs(module.op.value, module.alpha)


@DESCRIPTIONS.register(Op.UPSAMPLE_NEAREST2D)
def _upsample(module: qm.UpsampleNearest2d) -> tuple[str, NearestResizeAttrs]:
    return "upsample (nearest)", NearestResizeAttrs(tuple(module.scale_factor))


@DESCRIPTIONS.register(Op.UPSAMPLE_BILINEAR2D)
def _bilinear(module: qm.UpsampleBilinear2d) -> tuple[str, BilinearResizeAttrs]:
    return "upsample (bilinear)", BilinearResizeAttrs(module.align_corners)


def _activation_part(activation: qm.Activation) -> list[str]:
    return [] if activation is qm.Activation.NONE else [{"relu": "ReLU", "relu6": "ReLU6"}[activation.value]]


def _pool_attrs(kernel: Any, stride: Any, padding: Any) -> PoolAttrs:
    def pair(value: Any) -> tuple[int, int]:
        return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

    return PoolAttrs(pair(kernel), pair(stride), pair(padding))


def _spelling(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return type(module).__name__
    return node.target if isinstance(node.target, str) else node.target.__name__
