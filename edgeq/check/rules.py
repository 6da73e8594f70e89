"""The rules that decide where an op runs, one function per rule.

Each rule reads an :class:`~edgeq.check.records.OpRecord` and the target's data and returns a
:class:`RuleResult` when it has something to say: a *blocking* result sends the op to the CPU (or, for
``rejected``, makes it unsupported), a non-blocking one is advice for speed. The first line of each rule's
docstring is its sentence on the generated page docs/supported-ops.md (``edgeq targets --markdown``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

from edgeq.check.records import OpRecord
from edgeq.numerics import is_power_of_two
from edgeq.targets import NPU_OPS, ConvRules, PoolRules, ScaleRule, Target
from edgeq.units import bytes_text, shape_text


@dataclass(frozen=True)
class RuleResult:
    """What one rule says about one op."""

    rule: str
    message: str
    blocking: bool
    advice: str | None = None


Rule = Callable[[OpRecord, Target], "RuleResult | None"]


def _substitute_advice(record: OpRecord, target: Target) -> str | None:
    substitute = target.npu.substitutes.get(record.op) if target.npu else None
    return f"{record.op} is not on {target.name}: {substitute} is" if substitute else None


# ---- rules for every target -------------------------------------------------------------------------------------


def rejected(record: OpRecord, target: Target) -> RuleResult | None:
    """edgeq cannot compute this op in integers: it is unsupported on every target."""
    if record.rejected is None:
        return None
    return RuleResult("rejected", record.rejected, True, _substitute_advice(record, target))


def no_cpu_implementation(record: OpRecord, target: Target) -> RuleResult | None:
    """An ONNX op outside edgeq's vocabulary runs (in float, on the CPU) only where TVM's ONNX frontend converts it."""
    if record.onnx_op is None or record.op in NPU_OPS or record.onnx_op in _tvm_onnx_ops():
        return None
    return RuleResult("no_cpu_implementation", f"{record.onnx_op} has no converter in TVM's ONNX frontend", True)


@functools.cache
def _tvm_onnx_ops() -> frozenset[str]:
    from tvm.relax.frontend.onnx import onnx_frontend  # imported only when a file holds an op edgeq does not know

    return frozenset(onnx_frontend._get_convert_map())


# ---- rules for NPU targets ------------------------------------------------------------------------------------


def not_quantized(record: OpRecord, target: Target) -> RuleResult | None:
    """An op the QDQ file leaves in float runs on the CPU."""
    if not record.float_only or record.rejected:
        return None
    return RuleResult("not_quantized", f"{record.source_op} is not quantized in the file: it runs in float", True)


def op_not_on_npu(record: OpRecord, target: Target) -> RuleResult | None:
    """The NPU does not have this op."""
    if record.op in target.npu.ops or record.rejected:
        return None
    return RuleResult("op_not_on_npu", f"{record.op} is not among {target.name}'s ops", True, _substitute_advice(record, target))


def not_int8_symmetric(record: OpRecord, target: Target) -> RuleResult | None:
    """The NPU computes int8 tensors with zero point 0 (docs/numerics.md); other quantization runs on the CPU."""
    if record.quant is None or not record.quant.problems:
        return None
    return RuleResult(
        "int8_symmetric",
        f"{record.quant.problems[0]}; {target.name} needs int8 with zero point 0",
        True,
        "quantize with edgeq's prepare_qat_fx, or ONNX Runtime's quantize_static with QInt8 activations and "
        "ActivationSymmetric=True",
    )


def scale_not_power_of_two(record: OpRecord, target: Target) -> RuleResult | None:
    """On a power-of-two target every scale must be a power of two (requantization is a shift)."""
    if record.quant is None or target.quantization.scale_rule is not ScaleRule.POWER_OF_TWO:
        return None
    scales = [*record.quant.input_scales, *record.quant.weight_scales]
    if record.quant.output_scale is not None:
        scales.append(record.quant.output_scale)
    odd = [s for s in scales if not is_power_of_two(s)]
    if not odd:
        return None
    return RuleResult(
        "power_of_two_scales",
        f"scale {odd[0]:.6g} is not a power of two; {target.name} requantizes by shifts only",
        True,
        f"prepare the model with target='{target.name}': every scale is then a power of two",
    )


def kernel_too_large(record: OpRecord, target: Target) -> RuleResult | None:
    """Kernels larger than the NPU's maximum run on the CPU."""
    rules = _pool_or_conv_rules(record, target)
    if rules is None or "kernel" not in record.attrs or max(record.attrs["kernel"]) <= rules.max_kernel:
        return None
    advice = "two stacked 3x3 convolutions see as far as one 5x5, three as far as one 7x7" if record.op == "conv2d" else None
    return RuleResult(
        "max_kernel",
        f"kernel {shape_text(record.attrs['kernel'])}, {target.name} supports ≤ {rules.max_kernel}x{rules.max_kernel}",
        True,
        advice,
    )


def stride_too_large(record: OpRecord, target: Target) -> RuleResult | None:
    """Strides larger than the NPU's maximum run on the CPU."""
    rules = _pool_or_conv_rules(record, target)
    if rules is None or "stride" not in record.attrs or max(record.attrs["stride"]) <= rules.max_stride:
        return None
    return RuleResult("max_stride", f"stride {shape_text(record.attrs['stride'])}, {target.name} supports ≤ {rules.max_stride}", True)


def padding_too_large(record: OpRecord, target: Target) -> RuleResult | None:
    """Convolution padding beyond the NPU's maximum runs on the CPU."""
    if record.op != "conv2d" or "padding" not in record.attrs:
        return None
    limit = target.npu.conv2d.max_padding
    if max(record.attrs["padding"]) <= limit:
        return None
    return RuleResult("max_padding", f"padding {shape_text(record.attrs['padding'])}, {target.name} supports ≤ {limit}", True)


def dilation_unsupported(record: OpRecord, target: Target) -> RuleResult | None:
    """Dilations the NPU does not list run on the CPU."""
    if record.op != "conv2d" or "dilation" not in record.attrs:
        return None
    allowed = target.npu.conv2d.dilations
    if all(d in allowed for d in record.attrs["dilation"]):
        return None
    return RuleResult(
        "dilation", f"dilation {shape_text(record.attrs['dilation'])}, {target.name} supports {', '.join(map(str, allowed))}", True
    )


def groups_unsupported(record: OpRecord, target: Target) -> RuleResult | None:
    """Grouped convolutions the NPU cannot do (depthwise only, or none) run on the CPU."""
    if record.op != "conv2d" or "groups" not in record.attrs or record.attrs["groups"] == 1:
        return None
    allowed = target.npu.conv2d.groups
    depthwise = record.attrs["groups"] == record.attrs["in_channels"] == record.attrs["out_channels"]
    if allowed == "any" or (allowed == "depthwise" and depthwise):
        return None
    kind = "depthwise" if depthwise else f"groups={record.attrs['groups']}"
    supported = {"depthwise": "depthwise only", "none": "no grouped convolution"}[allowed]
    return RuleResult(
        "groups", f"{kind} convolution, {target.name} supports {supported}", True,
        "use groups=1, or depthwise (groups = channels) followed by a 1x1 convolution" if allowed == "depthwise" else None,
    )


def linear_too_wide(record: OpRecord, target: Target) -> RuleResult | None:
    """Linear layers with more inputs than the NPU's maximum run on the CPU."""
    if record.op != "linear" or "in_features" not in record.attrs or target.npu.linear is None:
        return None
    limit = target.npu.linear.max_in_features
    if record.attrs["in_features"] <= limit:
        return None
    return RuleResult("max_in_features", f"in_features {record.attrs['in_features']}, {target.name} supports ≤ {limit}", True)


def upsample_factor_unsupported(record: OpRecord, target: Target) -> RuleResult | None:
    """Upsampling factors the NPU does not list run on the CPU."""
    if record.op != "upsample_nearest2d" or "factor" not in record.attrs or target.npu.upsample_nearest2d is None:
        return None
    allowed = target.npu.upsample_nearest2d.factors
    if all(f in allowed for f in record.attrs["factor"]):
        return None
    return RuleResult(
        "upsample_factor",
        f"upsample x{shape_text(record.attrs['factor'])}, {target.name} supports x{', x'.join(map(str, allowed))}",
        True,
        f"chain upsamples by x{allowed[0]}",
    )


def tensor_too_large(record: OpRecord, target: Target) -> RuleResult | None:
    """Tensors wider, taller or larger than the NPU addresses run on the CPU."""
    for shape in [*record.input_shapes, *([record.output_shape] if record.output_shape else [])]:
        if len(shape) == 4 and max(shape[2:]) > target.npu.max_spatial:
            return RuleResult(
                "max_spatial", f"spatial size {shape_text(shape[2:])}, {target.name} supports ≤ {target.npu.max_spatial}", True,
                "reduce the input resolution or tile the image",
            )
        size = math.prod(shape[1:])
        if size > target.npu.max_tensor_bytes:
            return RuleResult(
                "max_tensor_bytes",
                f"tensor of {bytes_text(size)} per image, {target.name} addresses ≤ {bytes_text(target.npu.max_tensor_bytes)}",
                True,
                "reduce the input resolution or the channel count",
            )
    return None


def concat_scales_differ(record: OpRecord, target: Target) -> RuleResult | None:
    """Concat inputs at different scales need a requantize; an NPU that only copies cannot do it."""
    if record.op != "concat" or record.quant is None or record.quant.output_scale is None:
        return None
    scales = record.quant.input_scales
    if all(s == record.quant.output_scale for s in scales):
        return None
    listed = ", ".join(f"{s:.4g}" for s in scales)
    if target.quantization.concat_shares_input_scale:
        return RuleResult(
            "concat_shared_scale",
            f"concat inputs have scales {listed}; {target.name} cannot rescale while concatenating",
            True,
            f"prepare with target='{target.name}': inputs used only by the concat then share its scale",
        )
    return RuleResult("concat_scales", f"concat inputs have scales {listed}", False, "a shared scale avoids a requantize")


def channels_misaligned(record: OpRecord, target: Target) -> RuleResult | None:
    """Channel counts that are not a multiple of the MAC array's width leave MACs idle."""
    rules = target.npu.conv2d if record.op == "conv2d" else target.npu.linear if record.op == "linear" else None
    channels = record.attrs.get("out_channels")
    if rules is None or channels is None or channels % rules.channel_alignment == 0:
        return None
    padded = -(-channels // rules.channel_alignment) * rules.channel_alignment
    return RuleResult(
        "channel_alignment",
        f"out channels {channels}, not a multiple of {rules.channel_alignment}",
        False,
        f"out channels {channels}: pad to {padded} for full MAC use",
    )


def weights_exceed_sram(record: OpRecord, target: Target) -> RuleResult | None:
    """Weights larger than the on-chip SRAM are streamed from DRAM on every inference."""
    weight_bytes = record.attrs.get("weight_bytes", 0)
    if weight_bytes <= target.hardware.sram_bytes:
        return None
    return RuleResult(
        "weights_in_sram",
        f"weights {bytes_text(weight_bytes)} exceed the {bytes_text(target.hardware.sram_bytes)} SRAM",
        False,
        f"weights {bytes_text(weight_bytes)} are streamed from DRAM on every inference; fewer channels keep them on chip",
    )


def _pool_or_conv_rules(record: OpRecord, target: Target) -> ConvRules | PoolRules | None:
    return {
        "conv2d": target.npu.conv2d,
        "max_pool2d": target.npu.max_pool2d,
        "avg_pool2d": target.npu.avg_pool2d,
    }.get(record.op)


COMMON_RULES: tuple[Rule, ...] = (rejected, no_cpu_implementation)
"""Rules for every target; any result makes the op unsupported."""

NPU_RULES: tuple[Rule, ...] = (
    not_quantized,
    op_not_on_npu,
    not_int8_symmetric,
    scale_not_power_of_two,
    kernel_too_large,
    stride_too_large,
    padding_too_large,
    dilation_unsupported,
    groups_unsupported,
    linear_too_wide,
    upsample_factor_unsupported,
    tensor_too_large,
    concat_scales_differ,
    channels_misaligned,
    weights_exceed_sram,
)
"""Rules for NPU targets, in the order their results are listed."""
