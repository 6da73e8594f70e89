"""The supported-ops page, generated from the targets' data and the rules' docstrings (never written by hand)."""

from __future__ import annotations

from dataclasses import fields

from edgeq.check.rules import RULES, Rule
from edgeq.op_attrs import ATTRIBUTE_CLASSES
from edgeq.ops import Op, OpInfo
from edgeq.targets import Target, TargetKind, list_targets

PAGE = "docs/supported-ops.md"


def _ops(rule: Rule) -> str:
    return "all" if rule.ops is None else ", ".join(f"`{op.value}`" for op in Op if op in rule.ops)


def _limits(target: Target, op: str) -> str:
    limits = target.npu.limits(op)
    return limits.describe() if limits is not None else ""


def _integer_form(op: Op) -> str:
    """How the op computes in integers and which ONNX nodes between DequantizeLinear and QuantizeLinear read as it."""
    info: OpInfo = op.info
    if info.movement:
        kind = "moves int8 values (same scale in and out)"
    elif info.lookup_table:
        kind = "int8 lookup table"
    elif info.weighted:
        kind = "int8 per-channel weights, int32 bias and accumulator, requantized"
    else:
        kind = "int8, requantized" if info.requantizes else "int8, same scale"
    nodes = " / ".join(Op(info.gated).info.onnx_types) + " + Mul" if info.gated else " / ".join(info.onnx_types)
    return f"{kind}; ONNX: {nodes}"


def _settings(op: Op) -> str:
    attributes = ATTRIBUTE_CLASSES.get(op)
    return ", ".join(f.name for f in fields(attributes)) if attributes is not None else ""


def _op_table(targets: list[Target]) -> list[str]:
    """Every op of the vocabulary: its integer form, the settings check reads, its float fallback, each target."""
    header = ["op", "integer form", "settings", "float fallback", *(t.name for t in targets)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for op in Op:
        on = [_where(op, t) for t in targets]
        lines.append(f"| `{op.value}` | {_integer_form(op)} | {_settings(op)} | {FLOAT_FALLBACK} | " + " | ".join(on) + " |")
    return lines


def _where(op: Op, target: Target) -> str:
    if target.npu is not None and op.value in target.npu.ops:
        return "NPU"
    return "unsupported" if target.firmware_host is not None else "CPU"


FLOAT_FALLBACK = "torch's ONNX export of the op"
"""Every op's float fallback (settings its integer form refuses, a qconfig of None): one general path."""


def _target_section(target: Target) -> list[str]:
    lines = [f"## {target.name}", "", target.description + ".", ""]
    if target.kind is TargetKind.CPU:
        return lines + ["A CPU target: every op edgeq can compile runs here, in the integer arithmetic of docs/numerics.md.", ""]
    rules = target.npu
    elsewhere = (
        f"everything else falls back to the `{target.host}` host"
        if target.firmware_host is None
        else f"everything else is unsupported: the host is a {target.firmware_host}, which edgeq builds no code for"
    )
    channels = f", {rules.max_channels:,} channels" if rules.max_channels else ""
    channels += f", matmuls of ≤ {rules.max_matmul_reduction:,} products per output" if rules.max_matmul_reduction else ""
    lines += [
        f"Ops on the NPU ({elsewhere}): tensors up to "
        f"{rules.max_tensor_bytes:,} bytes and {rules.max_spatial} pixels high or wide{channels}; scales: "
        f"`{target.quantization.scale_rule.value}`; rounding: `{target.quantization.rounding.value}`; concat inputs share one scale: "
        f"{'yes' if target.quantization.concat_shares_input_scale else 'no'}.",
        "",
        "| op | limits |",
        "|---|---|",
    ]
    lines += [f"| `{op}` | {_limits(target, op)} |" for op in rules.ops]
    if target.vela is not None:
        lines += ["", f"Compiled by Vela: `vela {' '.join(target.vela.arguments())}`."]
    if rules.why_not:
        lines += ["", "Not on the NPU: " + "; ".join(f"`{op}`: {why}" for op, why in rules.why_not.items()) + "."]
    if rules.substitutes:
        lines += ["", "Advice for ops it lacks: " + ", ".join(f"`{a}` → `{b}`" for a, b in rules.substitutes.items()) + "."]
    return lines + [""]


def supported_ops_markdown() -> str:
    """The page: every rule in words, then each target's ops and limits."""
    lines = [
        "# Supported ops per target",
        "",
        "Generated from `edgeq/ops.py`, `edgeq/op_attrs.py`, `targets/*.toml` and `edgeq/check/rules.py` by "
        "`scripts/supported_ops.py` (or `edgeq targets --markdown`); do not edit.",
        "`check_model` and `edgeq check` apply these rules op by op.",
        "",
        "An op edgeq has no integer form of (LayerNorm, Softmax, Mish, ...) and every op of a module whose qconfig "
        "is `None` stays float: on every target it runs on the CPU, placed `CPU (float)`, between a dequantize and a "
        "calibrated quantize (docs/numerics.md \"Float fallback\"); `prepare_qat_fx(..., strict=True)` refuses it. "
        "Its float ONNX nodes are the ones torch's own ONNX exporter writes for it, whatever the op; compile runs "
        "those TVM's ONNX frontend converts (the `no_cpu_implementation` rule).",
        "",
        "BatchNorm (BatchNorm2d, BatchNorm1d, `F.batch_norm`) is no op of its own: it folds into the `conv2d` before it, "
        "or the `linear` of (N, C) output before it, and is otherwise a depthwise 1x1 `conv2d` (a BatchNorm1d's input "
        "viewed as NCHW by two `reshape`s around it; docs/numerics.md \"BatchNorm\"), placed as those ops are.",
        "",
        "## Ops",
        "",
        "Each op of edgeq's integer vocabulary (`edgeq/ops.py`): how it computes in integers, the settings the check "
        "reads (`edgeq/op_attrs.py`), its float fallback, and where it runs on each target (`NPU`: in the target's "
        "`[npu] ops`, subject to the limits below; `CPU`: on the host, in the same integers; `unsupported`: the host runs "
        "the user's firmware, which edgeq builds no code for).",
        "",
        *_op_table(list_targets()),
        "",
        "## Rules",
        "",
        "| rule | ops | meaning |",
        "|---|---|---|",
    ]
    lines += [f"| `{rule.id}` | {_ops(rule)} | {rule.sentence} |" for rule in RULES]
    lines.append("")
    for target in list_targets():
        lines += _target_section(target)
    return "\n".join(lines)
