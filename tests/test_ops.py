"""The op registry: every op declared once in edgeq.ops has its piece in every layer, and targets may lack any op."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch
import torch.nn.functional as F
from models import integer_model
from onnx import helper
from torch import nn

import edgeq.check
import edgeq.compile.lower_integer
import edgeq.compile.requantization
import edgeq.export.onnx_writer
import edgeq.export.tosa.forms
import edgeq.numerics
import edgeq.op_attrs
import edgeq.perf.estimate
import edgeq.quantization.convert
from edgeq.check import Placement, check_model, check_qdq
from edgeq.check.records import OpRecord
from edgeq.check.rules import RULES
from edgeq.export.onnx_nodes import node_op
from edgeq.export.sources import quantized_form
from edgeq.export.tosa.forms import TOSA_FORMS
from edgeq.npu_limits import NPU_LIMITS
from edgeq.op_attrs import ATTRIBUTE_CLASSES, OnnxAttrs, PoolAttrs, attributes_from_json
from edgeq.ops import TABLES, Op, gated_op, op_of_onnx_type
from edgeq.quantization import DeQuantStub, QuantStub
from edgeq.quantization.canonical_emitters import CANONICAL_EMITTERS, PRE_FUSION_EMITTERS
from edgeq.quantization.patterns import PreFusionOp
from edgeq.targets import NpuRules, Rounding, Target, TargetKind, list_targets

LAYERS = (
    edgeq.check,
    edgeq.compile.lower_integer,
    edgeq.compile.requantization,
    edgeq.export.onnx_writer,
    edgeq.export.tosa.forms,
    edgeq.numerics,
    edgeq.op_attrs,
    edgeq.perf.estimate,
    edgeq.quantization.convert,
)
"""Imported for their tables (each layer registers its pieces when imported)."""


def test_every_layer_has_every_op():
    pieces = {table.piece for table in TABLES}
    assert {"converter in convert.py", "QDQ unit in onnx_writer.py", "lowering rule in compile/lowering/", "attribute class in op_attrs.py"} <= pieces
    assert {table.piece: table.missing() for table in TABLES} == {table.piece: [] for table in TABLES}


def test_a_missing_piece_is_found():
    table = next(t for t in TABLES if t.piece == "converter in convert.py")
    entry = table._entries.pop(Op.ADD)
    try:
        assert table.missing() == [Op.ADD]
        with pytest.raises(KeyError, match="add has no converter in convert.py"):
            table[Op.ADD]
    finally:
        table._entries[Op.ADD] = entry


def test_every_op_reads_from_onnx():
    for op in Op:
        assert bool(op.info.onnx_types) != bool(op.info.gated), op  # an ONNX type of its own, or x * g(x)
        assert all(t in op_of_onnx_type(t).info.onnx_types for t in op.info.onnx_types)  # the first op declaring it
        assert op.info.gated is None or gated_op(Op(op.info.gated)) is op
    # a type several ops share reads as one of them by its attributes
    assert node_op(helper.make_node("Resize", ["x"], ["y"], mode="nearest")) is Op.UPSAMPLE_NEAREST2D
    assert node_op(helper.make_node("Resize", ["x"], ["y"], mode="linear")) is Op.UPSAMPLE_BILINEAR2D
    # a MatMul is a linear layer when its second input is a weight, a matmul when it is an activation
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"])
    assert node_op(matmul, lambda tensor: tensor == "w") is Op.LINEAR
    assert node_op(matmul, lambda tensor: False) is Op.MATMUL


def _npu_ops_without_tosa_form(target: Target) -> list[str]:
    """The ops a target whose arithmetic rounds half up (an Ethos-U target, whose NPU takes TOSA) places on its NPU
    and that have no TOSA form."""
    return [op for op in target.npu.ops if Op(op) not in TOSA_FORMS]


@pytest.mark.parametrize(
    "target", [t for t in list_targets() if t.kind is TargetKind.NPU and t.quantization.rounding is Rounding.HALF_UP], ids=lambda t: t.name
)
def test_every_npu_op_of_a_tosa_target_has_a_tosa_form(target):
    assert _npu_ops_without_tosa_form(target) == [], f"{target.name}: NPU ops without a TOSA form in export/tosa/forms/"


def test_an_npu_op_without_a_tosa_form_is_found():
    data = tomllib.loads(list_targets()[0].source.parent.joinpath("npu-m.toml").read_text())
    data["quantization"]["rounding"] = "half_up"
    target = Target.model_validate({**data, "source": None})
    assert _npu_ops_without_tosa_form(target) == ["upsample_bilinear2d"]


def test_npu_limits_sections_are_fields_of_the_npu_rules():
    for op in Op:
        field = NpuRules.model_fields.get(op.value)
        assert (field is not None) == op.info.npu_limits, op
        if field is not None:
            assert NPU_LIMITS[op] in field.annotation.__args__


def test_every_source_op_is_rewritten_or_refused():
    refused = {PreFusionOp.DEQUANT_STUB}
    assert CANONICAL_EMITTERS.missing() == [] and set(PRE_FUSION_EMITTERS) == set(PreFusionOp) - refused


def test_rules_have_unique_ids_and_known_ops():
    ids = [rule.id for rule in RULES]
    assert len(ids) == len(set(ids))
    for rule in RULES:
        assert rule.sentence and (rule.ops is None or rule.ops <= set(Op))


class EveryOp(nn.Module):
    """One model with every op of edgeq.ops."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.hardswish, self.leaky, self.gelu, self.elu = nn.Hardswish(), nn.LeakyReLU(0.1), nn.GELU(), nn.ELU(0.5)
        self.dequant = DeQuantStub()
        self.dequant_map = DeQuantStub()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.quant(x)
        a = self.conv(x)
        a = F.relu(self.leaky(torch.tanh(torch.sigmoid(self.hardswish(a * torch.sigmoid(a))))) + F.hardsigmoid(a))
        a = F.hardtanh(self.elu(F.gelu(self.gelu(a), approximate="tanh")), -0.5, 0.5)
        s = torch.cat([a + a, F.relu6(a)], dim=1)
        s = F.interpolate(F.avg_pool2d(F.max_pool2d(s, 2), 2), scale_factor=2, mode="bilinear", align_corners=True)
        first, second = F.interpolate(s, scale_factor=2.0, mode="nearest").chunk(2, dim=1)
        mixed = F.pad((first + second * first)[:, :4], (1, 0, 0, 1))
        pooled = mixed.mean((2, 3))
        return self.dequant(self.fc(torch.cat([pooled, pooled], 1).reshape(1, 8))), self.dequant_map(mixed @ mixed.transpose(2, 3))


def _without(target: Target, op: str) -> Target:
    """``target`` read from its file with ``op`` dropped from ``[npu] ops`` and its ``[npu.<op>]`` section deleted."""
    data = tomllib.loads(target.source.read_text())
    data["npu"]["ops"] = [o for o in data["npu"]["ops"] if o != op]
    data["npu"].pop(op, None)
    return Target.model_validate({**data, "source": target.source})


@pytest.fixture(scope="module")
def every_op():
    torch.manual_seed(0)
    model, example = EveryOp().eval(), torch.randn(1, 3, 16, 16)
    qdq, _ = quantized_form(integer_model(model, example, "npu-m"), (example,))
    return model, example, qdq


def test_the_model_has_every_op(every_op):
    model, example, qdq = every_op
    report = check_qdq(qdq, target="npu-m")
    assert {node.record.op for node in report.nodes} == {op.value for op in Op}


@pytest.mark.parametrize("target", [t for t in list_targets() if t.kind is TargetKind.NPU], ids=lambda t: t.name)
def test_targets_lacking_each_op(every_op, target):
    model, example, qdq = every_op
    for op in target.npu.ops:
        lacking = _without(target, op)
        for report in (check_qdq(qdq, target=lacking), check_model(model, (example,), target=lacking)):
            placed = [node for node in report.nodes if node.record.op == op]
            assert placed, (target.name, op)
            for node in placed:  # no CPU to fall back to beside a firmware host: unsupported
                expected = Placement.UNSUPPORTED if target.firmware_host else Placement.CPU
                assert node.placement is expected, (target.name, op, node.record.name)
                assert any(r.rule == "op_not_on_npu" for r in node.reasons), (target.name, op, node.reasons)


def test_every_record_has_its_ops_settings_class_and_they_round_trip(every_op):
    """Each record's settings are of the class its op registers (OpRecord refuses others), and their JSON reads back
    as the same settings; an ONNX node's attributes read back as themselves."""
    model, example, qdq = every_op
    records = [n.record for report in (check_qdq(qdq, target="npu-m"), check_model(model, (example,), target="npu-m")) for n in report.nodes]
    typed = [r for r in records if r.attrs is not None]
    assert {r.op for r in typed} == {op for op in Op if ATTRIBUTE_CLASSES[op] is not None}
    for record in typed:
        assert isinstance(record.attrs, ATTRIBUTE_CLASSES[record.op]), record.name
        assert attributes_from_json(record.op, json.loads(json.dumps(record.attrs.to_json()))) == record.attrs, record.name
    onnx_conv = {"dilations": [1, 1], "group": 1, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [1, 1]}
    assert attributes_from_json("conv2d", onnx_conv) == OnnxAttrs(onnx_conv)
    assert attributes_from_json("logsoftmax", {"axis": -1}).to_json() == {"axis": -1}
    with pytest.raises(TypeError, match="conv2d: settings PoolAttrs, the op has Conv2dAttrs"):
        OpRecord("c", "conv2d", "Conv", [], [], None, PoolAttrs((3, 3), (1, 1), (0, 0)))
