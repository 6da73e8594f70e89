"""check_model: for each op, where it runs on the target (NPU, CPU fallback, or unsupported), why, and advice.

Works before any training (on the float model) as well as on the prepared model, the integer model, an edgeq
TorchScript module or file, and any QDQ ONNX file. The rules are the target's data (``targets/*.toml``,
``[npu]`` section) and the functions of :mod:`edgeq.check.rules`; the compiler partitions with the same report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from edgeq.check.from_fx import records_from_prepared
from edgeq.check.from_onnx import records_from_qdq
from edgeq.check.records import OpRecord
from edgeq.check.report import CheckReport, NodeReport, Placement, Summary
from edgeq.check.rules import COMMON_RULES, NPU_RULES, int64_accumulator, no_host_code, not_quantized
from edgeq.errors import EdgeqError
from edgeq.export.onnx_reader import QDQModel
from edgeq.export.sources import ModelLike, quantized_form
from edgeq.quantization.capture import CAPTURE_ATTRIBUTE, Capture
from edgeq.quantization.prepare import TARGET_ATTRIBUTE, is_prepared, prepare_for_analysis
from edgeq.targets import Target, TargetKind, TargetLike, resolve_target

__all__ = ["CheckReport", "NodeReport", "Placement", "Summary", "check_model", "check_qdq"]

_NOT_CALIBRATED = (
    "scales not checked: the model has no quantization parameters yet (power-of-two scales and shared concat "
    "scales are checked once it is calibrated)"
)


def check_model(
    model: ModelLike,
    example_inputs: Sequence[torch.Tensor] | None = None,
    target: TargetLike | None = None,
    advice: bool = True,
) -> CheckReport:
    """Where each op of ``model`` runs on ``target``, and why.

    Args:
        model: a float model with QuantStub/DeQuantStub, a prepared (calibration/QAT) model, the integer model,
            a TorchScript module from ``edgeq.export.trace``, or the path of a QDQ ONNX or edgeq TorchScript file.
        example_inputs: inputs of the right shape; needed for PyTorch models (not for files).
        target: target name, file or :class:`~edgeq.targets.Target`; by default the target the model was
            quantized for (required for a float model and for QDQ files from other tools).
        advice: include advice (performance hints and replacements).

    Returns:
        A :class:`CheckReport`; ``print(report)`` shows the table, ``report.to_json()`` the data.

    Raises:
        TargetError: no target given or recorded, or an unknown or malformed target.
        EdgeqError: missing example inputs, or the model cannot be read.
    """
    source, recorded_target, records, notes = _records(model, example_inputs, target)
    return _report(records, resolve_target(target, recorded_target, source), source, notes, advice)


def check_qdq(qdq: QDQModel, target: TargetLike | None = None, advice: bool = True) -> CheckReport:
    """:func:`check_model` for an already loaded :class:`QDQModel` (the compiler's entry point)."""
    return _report(records_from_qdq(qdq), resolve_target(target, qdq.target, str(qdq.source)), str(qdq.source), [], advice)


def _records(
    model: ModelLike, example_inputs: Sequence[torch.Tensor] | None, target: TargetLike | None
) -> tuple[str, str | None, list[OpRecord], list[str]]:
    quantized = quantized_form(model, example_inputs)
    if quantized is not None:
        qdq, source = quantized
        return source, qdq.target, records_from_qdq(qdq), []
    if example_inputs is None:
        raise EdgeqError(f"check_model: {type(model).__name__} is a PyTorch model; give example_inputs=(x,) for its shapes")
    if is_prepared(model):
        notes = [_NOT_CALIBRATED, *_capture_notes(model)]
        return f"prepared model {type(model).__name__}", getattr(model, TARGET_ATTRIBUTE), records_from_prepared(model, {}), notes
    if target is None:
        raise EdgeqError("check_model: a float model needs a target (for example target='npu-s')")
    prepared, rejected = prepare_for_analysis(model, tuple(example_inputs), target)
    notes = [_NOT_CALIBRATED, *_capture_notes(prepared)]
    return f"float model {type(model).__name__}", None, records_from_prepared(prepared, rejected), notes


def _capture_notes(prepared: torch.nn.Module) -> list[str]:
    """A note when the graph was not captured by torch.fx, the default (docs/check.md)."""
    capture = getattr(prepared, CAPTURE_ATTRIBUTE, Capture.FX)
    if capture is Capture.FX:
        return []
    return [f"graph captured with {capture.value}: torch.fx could not trace the model (see the INFO log for why)"]


def _report(records: list[OpRecord], target: Target, source: str, notes: list[str], advice: bool) -> CheckReport:
    nodes = [_place(record, target) for record in records]
    if not advice:
        nodes = [dataclasses.replace(n, results=[dataclasses.replace(r, advice=None) for r in n.results]) for n in nodes]
    return CheckReport(target, source, nodes, notes, with_advice=advice)


def _place(record: OpRecord, target: Target) -> NodeReport:
    results = [result for rule in COMMON_RULES if (result := rule(record, target)) is not None]
    if results:
        return NodeReport(record, Placement.UNSUPPORTED, results)
    if target.kind is TargetKind.CPU:
        return NodeReport(record, Placement.CPU, [r for rule in (not_quantized, int64_accumulator) if (r := rule(record, target)) is not None])
    results = [result for rule in NPU_RULES if (result := rule(record, target)) is not None]
    if not any(r.blocking for r in results):
        return NodeReport(record, Placement.NPU, results)
    no_host = no_host_code(record, target)
    if no_host is not None:  # no CPU to fall back to
        return NodeReport(record, Placement.UNSUPPORTED, [*results, no_host])
    return NodeReport(record, Placement.CPU, results)
