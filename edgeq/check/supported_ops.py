"""The supported-ops page, generated from the targets' data and the rules' docstrings (never written by hand)."""

from __future__ import annotations

from edgeq.check.rules import COMMON_RULES, NPU_RULES
from edgeq.targets import Target, TargetKind, list_targets

PAGE = "docs/supported-ops.md"


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0]


def _limits(target: Target, op: str) -> str:
    rules = target.npu
    if op == "conv2d" and rules.conv2d:
        c = rules.conv2d
        return (
            f"kernel ≤ {c.max_kernel}x{c.max_kernel}, stride ≤ {c.max_stride}, padding ≤ {c.max_padding}, "
            f"dilation {', '.join(map(str, c.dilations))}, groups: {c.groups}; full MAC use at multiples of "
            f"{c.channel_alignment} channels"
        )
    if op == "linear" and rules.linear:
        return f"in_features ≤ {rules.linear.max_in_features}; full MAC use at multiples of {rules.linear.channel_alignment}"
    pool = {"max_pool2d": rules.max_pool2d, "avg_pool2d": rules.avg_pool2d}.get(op)
    if pool is not None:
        return f"kernel ≤ {pool.max_kernel}x{pool.max_kernel}, stride ≤ {pool.max_stride}"
    if op == "upsample_nearest2d" and rules.upsample_nearest2d:
        return "factors " + ", ".join(f"x{f}" for f in rules.upsample_nearest2d.factors)
    return ""


def _target_section(target: Target) -> list[str]:
    lines = [f"## {target.name}", "", target.description + ".", ""]
    if target.kind is TargetKind.CPU:
        return lines + ["A CPU target: every op edgeq can compile runs here, in the integer arithmetic of docs/numerics.md.", ""]
    rules = target.npu
    lines += [
        f"Ops on the NPU (everything else falls back to the `{target.host}` host): tensors up to "
        f"{rules.max_tensor_bytes:,} bytes and {rules.max_spatial} pixels high or wide; scales: "
        f"`{target.quantization.scale_rule.value}`; concat inputs share one scale: "
        f"{'yes' if target.quantization.concat_shares_input_scale else 'no'}.",
        "",
        "| op | limits |",
        "|---|---|",
    ]
    lines += [f"| `{op}` | {_limits(target, op)} |" for op in rules.ops]
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
        "## Rules",
        "",
        "| rule | meaning |",
        "|---|---|",
    ]
    lines += [f"| `{rule.__name__}` | {_first_line(rule.__doc__)} |" for rule in (*COMMON_RULES, *NPU_RULES)]
    lines.append("")
    for target in list_targets():
        lines += _target_section(target)
    return "\n".join(lines)
