"""The rules that decide where an op runs, one function per rule.

Each rule is declared with its id (the name check.json and docs/supported-ops.md both use) and the ops it
applies to, reads an :class:`~edgeq.check.records.OpRecord` and the target's data, and returns a
:class:`RuleResult` when it has something to say: a *blocking* result sends the op to the CPU (or, for
``rejected``, makes it unsupported), a non-blocking one is advice for speed. The first line of each rule's
docstring is its sentence on the generated page docs/supported-ops.md (``edgeq targets --markdown``). A rule
that reads an op's ``[npu.<op>]`` limits runs only where the NPU has the op (``op_not_on_npu`` speaks otherwise).
A rule declared for some ops reads their settings, ``record.attrs``, as the class those ops register in
:mod:`edgeq.op_attrs` (``None`` when the check could not read them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

from edgeq.check.records import OpRecord
from edgeq.npu_limits import NPU_OPS
from edgeq.numerics import INT32_MAX, is_power_of_two, needs_int64_accumulator
from edgeq.op_attrs import Conv2dAttrs
from edgeq.ops import Op
from edgeq.targets import HOST_CODE_ADVICE, ScaleRule, Target
from edgeq.units import bytes_text, shape_text


@dataclass(frozen=True)
class RuleResult:
    """What one rule says about one op."""

    rule: str
    message: str
    blocking: bool
    advice: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What a rule's function says about one op; the :class:`Rule` adds its id."""

    message: str
    blocking: bool
    advice: str | None = None


Check = Callable[[OpRecord, Target], "Outcome | None"]


@dataclass(frozen=True)
class Rule:
    """One placement rule.

    Attributes:
        id: the rule's name in every report (``RuleResult.rule``, check.json) and on docs/supported-ops.md.
        check: the function; the first line of its docstring is the rule's sentence.
        ops: the ops it applies to (``None``: every op).
    """

    id: str
    check: Check
    ops: frozenset[Op] | None = None

    @property
    def sentence(self) -> str:
        """What the rule means, in one sentence."""
        return (self.check.__doc__ or "").strip().splitlines()[0]

    def applies_to(self, op: str) -> bool:
        """Whether the rule looks at records of ``op``."""
        return self.ops is None or op in self.ops

    def __call__(self, record: OpRecord, target: Target) -> RuleResult | None:
        if not self.applies_to(record.op):
            return None
        outcome = self.check(record, target)
        return None if outcome is None else RuleResult(self.id, outcome.message, outcome.blocking, outcome.advice)


def rule(rule_id: str, *ops: Op) -> Callable[[Check], Rule]:
    """Decorator declaring a rule with its id and the ops it applies to (none listed: every op)."""

    def declare(check: Check) -> Rule:
        return Rule(rule_id, check, frozenset(ops) if ops else None)

    return declare


def _substitute_advice(record: OpRecord, target: Target) -> str | None:
    substitute = target.npu.substitutes.get(record.op) if target.npu else None
    return f"{record.op} is not on {target.name}: {substitute} is" if substitute else None


# ---- rules for every target -------------------------------------------------------------------------------------


@rule("rejected")
def rejected(record: OpRecord, target: Target) -> Outcome | None:
    """edgeq cannot compute this op in integers: it is unsupported on every target."""
    if record.rejected is None:
        return None
    return Outcome(record.rejected, True, _substitute_advice(record, target))


@rule("no_cpu_implementation")
def no_cpu_implementation(record: OpRecord, target: Target) -> Outcome | None:
    """An ONNX op outside edgeq's vocabulary runs (in float, on the CPU) only where TVM's ONNX frontend converts it."""
    if record.onnx_op is None or record.op in NPU_OPS or record.onnx_op in _tvm_onnx_ops():
        return None
    return Outcome(f"{record.onnx_op} has no converter in TVM's ONNX frontend", True)


@functools.cache
def _tvm_onnx_ops() -> frozenset[str]:
    """The ONNX ops compile imports: TVM's frontend's, and those edgeq converts itself (ConvInteger)."""
    from tvm.relax.frontend.onnx import onnx_frontend  # imported only when a file holds an op edgeq does not know

    from edgeq.compile.integer_only import CONVERTERS

    return frozenset(onnx_frontend._get_convert_map()) | frozenset(CONVERTERS)


# ---- rules for NPU targets ------------------------------------------------------------------------------------


@rule("not_quantized")
def not_quantized(record: OpRecord, target: Target) -> Outcome | None:
    """An op left in float (by the QDQ file, or by prepare's float fallback) runs in float on the CPU."""
    if not record.float_only or record.rejected:
        return None
    if record.float_reason is not None:
        return Outcome(f"{record.source_op} stays float: {record.float_reason}", True)
    return Outcome(f"{record.source_op} is not quantized in the file: it runs in float", True)


@rule("int64_accumulator", Op.CONV2D, Op.LINEAR)
def int64_accumulator(record: OpRecord, target: Target) -> Outcome | None:
    """A layer whose accumulator can exceed int32 is computed exactly with an int64 accumulator on the CPU."""
    bounds = record.quant.accumulator_bounds if record.quant is not None else ()
    if not needs_int64_accumulator(bounds):
        return None
    return Outcome(
        f"its accumulator can reach {max(bounds)} (int32: up to {INT32_MAX}): computed with an int64 accumulator on "
        "the CPU",
        True,
        "a channel's bias is large for its scale s_in * s_w[c] (tiny weights); recalibrating or retraining the layer brings it within int32",
    )


@rule("op_not_on_npu")
def op_not_on_npu(record: OpRecord, target: Target) -> Outcome | None:
    """The NPU does not have this op (the target file may say why)."""
    if record.op in target.npu.ops or record.rejected:
        return None
    why = target.npu.why_not.get(record.op)
    return Outcome(f"{record.op} is not among {target.name}'s ops" + (f": {why}" if why else ""), True, _substitute_advice(record, target))


@rule("int8_symmetric")
def not_int8_symmetric(record: OpRecord, target: Target) -> Outcome | None:
    """The NPU computes int8 tensors with zero point 0 (docs/numerics.md); other quantization runs on the CPU."""
    if record.quant is None or not record.quant.problems:
        return None
    return Outcome(
        f"{record.quant.problems[0]}; {target.name} needs int8 with zero point 0",
        True,
        "quantize with edgeq's prepare_qat_fx, or ONNX Runtime's quantize_static with QInt8 activations and "
        "ActivationSymmetric=True",
    )


@rule("power_of_two_scales")
def scale_not_power_of_two(record: OpRecord, target: Target) -> Outcome | None:
    """On a power-of-two target every scale must be a power of two (requantization is a shift)."""
    if record.quant is None or target.quantization.scale_rule is not ScaleRule.POWER_OF_TWO:
        return None
    scales = [*record.quant.input_scales, *record.quant.weight_scales]
    if record.quant.output_scale is not None:
        scales.append(record.quant.output_scale)
    odd = [s for s in scales if not is_power_of_two(s)]
    if not odd:
        return None
    return Outcome(
        f"scale {odd[0]:.6g} is not a power of two; {target.name} requantizes by shifts only",
        True,
        f"prepare the model with target='{target.name}': every scale is then a power of two",
    )


@rule("max_kernel", Op.CONV2D, Op.MAX_POOL2D, Op.AVG_POOL2D)
def kernel_too_large(record: OpRecord, target: Target) -> Outcome | None:
    """Kernels larger than the NPU's maximum run on the CPU."""
    limits, window = target.npu.limits(record.op), record.attrs
    if limits is None or window is None or max(window.kernel) <= limits.max_kernel:
        return None
    advice = "two stacked 3x3 convolutions see as far as one 5x5, three as far as one 7x7" if record.op == "conv2d" else None
    return Outcome(
        f"kernel {shape_text(window.kernel)}, {target.name} supports ≤ {limits.max_kernel}x{limits.max_kernel}",
        True,
        advice,
    )


@rule("max_stride", Op.CONV2D, Op.MAX_POOL2D, Op.AVG_POOL2D)
def stride_too_large(record: OpRecord, target: Target) -> Outcome | None:
    """Strides beyond the NPU's maximum (for unpadded, non-depthwise windows: its unpadded maximum) run on the CPU."""
    limits, window = target.npu.limits(record.op), record.attrs
    if limits is None or window is None:
        return None
    depthwise = isinstance(window, Conv2dAttrs) and window.depthwise
    unpadded = limits.max_unpadded_stride is not None and not any(window.padding) and not depthwise
    allowed = limits.max_unpadded_stride if unpadded else limits.max_stride
    if max(window.stride) <= allowed:
        return None
    message = f"stride {shape_text(window.stride)}, {target.name} supports ≤ {allowed}"
    if unpadded:
        message += " without padding"
    elif limits.max_unpadded_stride is not None:
        kind = "depthwise" if depthwise else "padded"
        convolution = ", not depthwise" if record.op == Op.CONV2D else ""
        message += f" for a {kind} window (≤ {limits.max_unpadded_stride} without padding{convolution})"
    return Outcome(message, True)


@rule("max_padded_kernel", Op.MAX_POOL2D, Op.AVG_POOL2D)
def padded_kernel_too_large(record: OpRecord, target: Target) -> Outcome | None:
    """A padded pooling window larger than the NPU's maximum for padded windows runs on the CPU."""
    limits, pool = target.npu.limits(record.op), record.attrs
    if limits is None or limits.max_padded_kernel is None or pool is None or not any(pool.padding):
        return None
    if max(pool.kernel) <= limits.max_padded_kernel:
        return None
    most = f"{limits.max_padded_kernel}x{limits.max_padded_kernel}"
    return Outcome(
        f"kernel {shape_text(pool.kernel)} with padding {shape_text(pool.padding)}, {target.name} supports ≤ {most} with padding",
        True,
        f"pool without padding (kernels up to {limits.max_kernel}x{limits.max_kernel}), or pad the input explicitly",
    )


@rule("max_padding", Op.CONV2D)
def padding_too_large(record: OpRecord, target: Target) -> Outcome | None:
    """Convolution padding beyond the NPU's maximum runs on the CPU."""
    limits, conv = target.npu.limits(record.op), record.attrs
    if limits is None or conv is None or max(conv.padding) <= limits.max_padding:
        return None
    return Outcome(f"padding {shape_text(conv.padding)}, {target.name} supports ≤ {limits.max_padding}", True)


@rule("dilation", Op.CONV2D)
def dilation_unsupported(record: OpRecord, target: Target) -> Outcome | None:
    """Dilations the NPU does not list run on the CPU."""
    limits, conv = target.npu.limits(record.op), record.attrs
    if limits is None or conv is None or all(d in limits.dilations for d in conv.dilation):
        return None
    allowed = ", ".join(map(str, limits.dilations))
    return Outcome(f"dilation {shape_text(conv.dilation)}, {target.name} supports {allowed}", True)


@rule("groups", Op.CONV2D)
def groups_unsupported(record: OpRecord, target: Target) -> Outcome | None:
    """Grouped convolutions the NPU cannot do (depthwise only, or none) run on the CPU."""
    limits, conv = target.npu.limits(record.op), record.attrs
    if limits is None or conv is None or conv.groups == 1:
        return None
    allowed = limits.groups
    if allowed == "any" or (allowed == "depthwise" and conv.depthwise):
        return None
    kind = "depthwise" if conv.depthwise else f"groups={conv.groups}"
    supported = {"depthwise": "depthwise only", "none": "no grouped convolution"}[allowed]
    return Outcome(
        f"{kind} convolution, {target.name} supports {supported}",
        True,
        "use groups=1, or depthwise (groups = channels) followed by a 1x1 convolution" if allowed == "depthwise" else None,
    )


@rule("max_in_features", Op.LINEAR)
def linear_too_wide(record: OpRecord, target: Target) -> Outcome | None:
    """Linear layers with more inputs than the NPU's maximum run on the CPU."""
    limits, linear = target.npu.limits(record.op), record.attrs
    if limits is None or linear is None or linear.in_features <= limits.max_in_features:
        return None
    return Outcome(f"in_features {linear.in_features}, {target.name} supports ≤ {limits.max_in_features}", True)


@rule("upsample_factor", Op.UPSAMPLE_NEAREST2D)
def upsample_factor_unsupported(record: OpRecord, target: Target) -> Outcome | None:
    """Upsampling factors the NPU does not list run on the CPU."""
    limits, upsample = target.npu.limits(record.op), record.attrs
    if limits is None or upsample is None or all(f in limits.factors for f in upsample.factor):
        return None
    return Outcome(
        f"upsample x{shape_text(upsample.factor)}, {target.name} supports x{', x'.join(map(str, limits.factors))}",
        True,
        f"chain upsamples by x{limits.factors[0]}",
    )


def _shapes(record: OpRecord) -> list[tuple[int, ...]]:
    return [*record.input_shapes, *([record.output_shape] if record.output_shape else [])]


@rule("max_spatial")
def tensor_too_wide(record: OpRecord, target: Target) -> Outcome | None:
    """Tensors wider or taller than the NPU addresses run on the CPU."""
    shape = next((s for s in _shapes(record) if len(s) == 4 and max(s[2:]) > target.npu.max_spatial), None)
    if shape is None:
        return None
    return Outcome(
        f"spatial size {shape_text(shape[2:])}, {target.name} supports ≤ {target.npu.max_spatial}",
        True,
        "reduce the input resolution or tile the image",
    )


@rule("max_channels")
def too_many_channels(record: OpRecord, target: Target) -> Outcome | None:
    """Tensors with more channels than the NPU addresses run on the CPU."""
    most = target.npu.max_channels
    shape = next((s for s in _shapes(record) if most is not None and len(s) == 4 and s[1] > most), None)
    if shape is None:
        return None
    return Outcome(f"{shape[1]} channels, {target.name} supports ≤ {most}", True, "split the channels")


@rule("max_matmul_reduction", Op.MATMUL)
def matmul_reduction_too_long(record: OpRecord, target: Target) -> Outcome | None:
    """Matmuls summing more products per output than the NPU's maximum run on the CPU."""
    most, size = target.npu.max_matmul_reduction, record.attrs.reduction_size if record.attrs is not None else None
    if most is None or size is None or size <= most:
        return None
    return Outcome(f"matmul summing {size} products per output, {target.name} supports ≤ {most}", True)


@rule("max_tensor_bytes")
def tensor_too_large(record: OpRecord, target: Target) -> Outcome | None:
    """Tensors larger than the NPU addresses run on the CPU."""
    input_bytes, output_bytes = record.itemsizes
    sizes = [math.prod(s[1:]) * input_bytes for s in record.input_shapes]
    if record.output_shape:
        sizes.append(math.prod(record.output_shape[1:]) * output_bytes)
    size = max(sizes, default=0)
    if size <= target.npu.max_tensor_bytes:
        return None
    return Outcome(
        f"tensor of {bytes_text(size)} per image, {target.name} addresses ≤ {bytes_text(target.npu.max_tensor_bytes)}",
        True,
        "reduce the input resolution or the channel count",
    )


def _differing_concat_scales(record: OpRecord) -> str | None:
    """The concat's input scales in words, when they differ from its output scale."""
    if record.quant is None or record.quant.output_scale is None:
        return None
    if all(s == record.quant.output_scale for s in record.quant.input_scales):
        return None
    return ", ".join(f"{s:.4g}" for s in record.quant.input_scales)


@rule("concat_shared_scale", Op.CONCAT)
def concat_cannot_rescale(record: OpRecord, target: Target) -> Outcome | None:
    """On an NPU that only copies while concatenating, concat inputs at different scales run on the CPU."""
    listed = _differing_concat_scales(record)
    if listed is None or not target.quantization.concat_shares_input_scale:
        return None
    return Outcome(
        f"concat inputs have scales {listed}; {target.name} cannot rescale while concatenating",
        True,
        f"prepare with target='{target.name}': inputs used only by the concat then share its scale",
    )


@rule("concat_scales", Op.CONCAT)
def concat_scales_differ(record: OpRecord, target: Target) -> Outcome | None:
    """Concat inputs at different scales need a requantize."""
    listed = _differing_concat_scales(record)
    if listed is None or target.quantization.concat_shares_input_scale:
        return None
    return Outcome(f"concat inputs have scales {listed}", False, "a shared scale avoids a requantize")


@rule("channel_alignment", Op.CONV2D, Op.LINEAR)
def channels_misaligned(record: OpRecord, target: Target) -> Outcome | None:
    """Channel counts that are not a multiple of the MAC array's width leave MACs idle."""
    limits = target.npu.limits(record.op)
    channels = record.attrs.out_channels if record.attrs is not None else None
    if limits is None or channels is None or channels % limits.channel_alignment == 0:
        return None
    padded = -(-channels // limits.channel_alignment) * limits.channel_alignment
    return Outcome(
        f"out channels {channels}, not a multiple of {limits.channel_alignment}",
        False,
        f"out channels {channels}: pad to {padded} for full MAC use",
    )


@rule("weights_in_sram", Op.CONV2D, Op.LINEAR)
def weights_exceed_sram(record: OpRecord, target: Target) -> Outcome | None:
    """Weights larger than the on-chip SRAM are streamed from DRAM on every inference."""
    weight_bytes = record.attrs.weight_bytes if record.attrs is not None else 0
    if weight_bytes <= target.hardware.sram_bytes:
        return None
    return Outcome(
        f"weights {bytes_text(weight_bytes)} exceed the {bytes_text(target.hardware.sram_bytes)} SRAM",
        False,
        f"weights {bytes_text(weight_bytes)} are streamed from DRAM on every inference; fewer channels keep them on chip",
    )


@rule("no_host_code")
def no_host_code(record: OpRecord, target: Target) -> Outcome | None:
    """On an NPU beside a firmware host (edgeq builds no code for it), an op the NPU cannot run is unsupported."""
    if target.firmware_host is None:
        return None
    return Outcome(f"{target.name}'s host is a {target.firmware_host}; edgeq builds no host code; {HOST_CODE_ADVICE}", True)


COMMON_RULES: tuple[Rule, ...] = (rejected, no_cpu_implementation)
"""Rules for every target; any result makes the op unsupported."""

NPU_RULES: tuple[Rule, ...] = (
    not_quantized,
    int64_accumulator,
    op_not_on_npu,
    not_int8_symmetric,
    scale_not_power_of_two,
    kernel_too_large,
    stride_too_large,
    padded_kernel_too_large,
    padding_too_large,
    dilation_unsupported,
    groups_unsupported,
    linear_too_wide,
    upsample_factor_unsupported,
    tensor_too_wide,
    too_many_channels,
    matmul_reduction_too_long,
    tensor_too_large,
    concat_cannot_rescale,
    concat_scales_differ,
    channels_misaligned,
    weights_exceed_sram,
)
"""Rules for NPU targets, in the order their results are listed."""

RULES: tuple[Rule, ...] = (*COMMON_RULES, *NPU_RULES, no_host_code)
"""Every rule, common ones first."""
