"""The supported-ops page, generated from the targets' data and the rules' docstrings (never written by hand)."""

from __future__ import annotations

from edgeq.check.rules import RULES, Rule
from edgeq.ops import Op
from edgeq.targets import Target, TargetKind, list_targets

PAGE = "docs/supported-ops.md"


def _ops(rule: Rule) -> str:
    return "all" if rule.ops is None else ", ".join(f"`{op.value}`" for op in Op if op in rule.ops)


def _limits(target: Target, op: str) -> str:
    limits = target.npu.limits(op)
    return limits.describe() if limits is not None else ""


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
        "Generated from `targets/*.toml` and `edgeq/check/rules.py` by `edgeq targets --markdown`; do not edit.",
        "`check_model` and `edgeq check` apply these rules op by op.",
        "",
        "An op edgeq has no integer form of (LayerNorm, Softmax, Mish, ...) and every op of a module whose qconfig "
        "is `None` stays float: on every target it runs on the CPU, placed `CPU (float)`, between a dequantize and a "
        "calibrated quantize (docs/numerics.md \"Float fallback\"); `prepare_qat_fx(..., strict=True)` refuses it.",
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
