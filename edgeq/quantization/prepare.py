"""``prepare_qat_fx``: a float model with QuantStub/DeQuantStub becomes a calibration / QAT model.

Steps: capture the module-level graph (:mod:`edgeq.quantization.capture`: torch.fx, or torch.export when torch.fx
cannot trace; a deep copy: the user's model is never modified), run the example inputs to learn
every tensor's shape, find the integer region, fuse conv+bn(+relu/relu6), linear(+relu/relu6) and
add(+relu/relu6) (:mod:`.fusion`), and rewrite every node of the region into one canonical op of
:mod:`edgeq.quantization.qat_modules` with the quantizer its output needs (:mod:`.canonical_emitters`, building with
a :class:`~edgeq.quantization.rewriter.Rewriter`), applying the target's constraints (:mod:`.target_constraints`:
scale rule, shared concat scales).

An op inside the integer region that edgeq cannot run in integers (LayerNorm, Softmax, Mish...), and every op
of a module whose qconfig is ``None``, stays float, never silently (:mod:`.float_boundaries`: a dequantize before
it, a calibrated quantize after it, and a :class:`FloatFallbackWarning` naming the node, the op and the reason).
With ``strict=True`` such an op is an error naming the node and the op instead.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from edgeq.errors import QuantizationError, UnsupportedOpError
from edgeq.ops import Op
from edgeq.quantization.canonical_emitters import emitter_of
from edgeq.quantization.capture import CAPTURE_ATTRIBUTE, capture
from edgeq.quantization.distributed import DDP_IGNORE_ATTRIBUTE, observer_buffer_names
from edgeq.quantization.float_boundaries import FloatFallbackWarning
from edgeq.quantization.fusion import find_fusions
from edgeq.quantization.graph import integer_region, list_sliced_tuples, module_scope, record_example_values
from edgeq.quantization.metadata_reads import drop_metadata_reads
from edgeq.quantization.patterns import PreFusionOp, moves_values, source_op
from edgeq.quantization.qat_modules import CONSTANT_KEY, FLOAT_REASON_KEY, DequantizeOutput
from edgeq.quantization.qconfig import QConfig, QConfigSpec, qconfig_resolver
from edgeq.quantization.rewriter import Rewriter
from edgeq.quantization.state import FakeQuantState, set_fake_quantize
from edgeq.quantization.target_constraints import check_int32_outputs, share_concat_scales
from edgeq.targets import Target, TargetLike, load_target

logger = logging.getLogger(__name__)

TARGET_ATTRIBUTE = "edgeq_target"
"""Attribute of a prepared (and converted) model: the name of the target it was prepared for."""
ROUNDING_ATTRIBUTE = "edgeq_rounding"
"""Attribute of a prepared model: its target's :class:`~edgeq.targets.Rounding`, which ``convert_fx`` gives the
integer model."""

_SINGLE_CALL_OPS = {PreFusionOp.QUANT_STUB, Op.CONV2D, Op.LINEAR, PreFusionOp.BATCH_NORM}
"""The modules whose canonical op takes their place and weights (or, a QuantStub, its fixed scale), so that each
call of one needs a module of its own. Further calls of any other module (an activation called twice) are ops of
their own at ``<path>_1``..."""


def is_prepared(model: object) -> bool:
    """Whether ``model`` was made by ``prepare_qat_fx`` (it records its target)."""
    return isinstance(model, fx.GraphModule) and hasattr(model, TARGET_ATTRIBUTE)


def prepare_qat_fx(
    model: nn.Module,
    qconfig: QConfigSpec = None,
    *,
    example_inputs: Sequence[torch.Tensor],
    target: TargetLike,
    strict: bool = False,
) -> fx.GraphModule:
    """Prepare a float model for calibration and quantization-aware training.

    Args:
        model: float model whose integer region is marked by QuantStub / DeQuantStub.
        qconfig: a :class:`QConfig`, the dict form ``{"": qconfig, "module_name": {"classifier": qconfig}}``, or
            ``None`` to use each module's ``qconfig`` attribute where set and the default QAT qconfig elsewhere.
        example_inputs: a tuple of example inputs (shapes are recorded from them; values do not matter).
        target: target name (``"npu-s"``), path to a target file, or :class:`~edgeq.targets.Target`; its
            quantization rules apply to every scale.
        strict: refuse ops that would stay float (no integer form, or qconfig ``None``) instead of running them
            in float between a dequantize and a calibrated quantize, with a :class:`FloatFallbackWarning`.

    Returns:
        The prepared model (an ``fx.GraphModule``) in the ``QAT`` fake-quant state, in the same train/eval mode
        as ``model``. Prepare the calibration and the QAT model from the same float model: their state dicts
        have the same keys, so a calibration checkpoint loads into the QAT model.

    Raises:
        TraceError, QuantizationError, UnsupportedOpError, TargetError: with the node, op and what to do
            (UnsupportedOpError for an op that would stay float only when ``strict``).
    """
    prepared, _ = _prepare(model, qconfig, example_inputs, load_target(target), lenient=False, strict=strict)
    logger.info(
        "prepared %s for %s (graph captured with %s)",
        type(model).__name__,
        getattr(prepared, TARGET_ATTRIBUTE),
        getattr(prepared, CAPTURE_ATTRIBUTE).value,
    )
    return prepared


def prepare_for_analysis(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], target: TargetLike
) -> tuple[fx.GraphModule, dict[str, str]]:
    """Prepare as :func:`prepare_qat_fx` does, but keep going past ops it cannot quantize.

    Returns:
        The prepared graph, in which each rejected node is left as it was, and the reason of each rejection by
        node name. ``check_model`` uses it to report every such op at once, before any training. Ops left in
        float are not rejected: their reason is in ``node.meta[FLOAT_REASON_KEY]``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FloatFallbackWarning)
        return _prepare(model, None, example_inputs, load_target(target), lenient=True, strict=False)


def _prepare(
    model: nn.Module,
    qconfig: QConfigSpec,
    example_inputs: Sequence[torch.Tensor],
    target: Target,
    lenient: bool,
    strict: bool,
) -> tuple[fx.GraphModule, dict[str, str]]:
    resolve = qconfig_resolver(qconfig, model)
    traced = capture(model, example_inputs)
    return prepare_captured(traced, resolve, example_inputs, target, model.training, lenient=lenient, strict=strict)


def prepare_captured(
    traced: fx.GraphModule,
    resolve: Callable[[str], QConfig | None],
    example_inputs: Sequence[torch.Tensor],
    target: Target,
    training: bool,
    *,
    lenient: bool,
    strict: bool,
) -> tuple[fx.GraphModule, dict[str, str]]:
    """Prepare a captured module-level graph (its :data:`CAPTURE_ATTRIBUTE` set), e.g. one rebuilt from a PT2E
    graph; the prepared model and the reason of each node rejected (``lenient``)."""
    record_example_values(traced, example_inputs)
    drop_metadata_reads(traced)
    list_sliced_tuples(traced)
    region = integer_region(traced)
    rewriter = Rewriter(traced, region, target, resolve, strict)
    prepared, rejected = _rewrite(rewriter, lenient)
    prepared.train(training)
    set_fake_quantize(prepared, FakeQuantState.QAT)
    setattr(prepared, TARGET_ATTRIBUTE, target.name)
    setattr(prepared, ROUNDING_ATTRIBUTE, target.quantization.rounding)
    setattr(prepared, CAPTURE_ATTRIBUTE, getattr(traced, CAPTURE_ATTRIBUTE))
    setattr(prepared, DDP_IGNORE_ATTRIBUTE, observer_buffer_names(prepared))
    return prepared, rejected


def _rewrite(rewriter: Rewriter, lenient: bool) -> tuple[fx.GraphModule, dict[str, str]]:
    """The prepared graph of the rewriter's captured graph, and the reason of each node rejected (``lenient``:
    left as it was instead of raising)."""
    _check_single_calls(rewriter)
    rewriter.fusions, absorbed = find_fusions(rewriter.kinds, rewriter.region, lambda n: _float_reason(rewriter, n) is not None)
    rejected: dict[str, str] = {}
    floats = rewriter.floats
    for node in rewriter.traced.graph.nodes:
        if node in absorbed:
            continue
        if node in rewriter.region and (source := floats.float_tuple(node)) is not None:
            floats.keep_float(node, floats.float_outputs[source].meta[FLOAT_REASON_KEY])
        elif node in rewriter.region and (reason := _float_reason(rewriter, node)) is not None:
            floats.fall_back(node, reason)
        elif node in rewriter.region:
            _emit_integer_op(rewriter, node, lenient, rejected)
        elif node.op == "call_module" and source_op(node, rewriter.modules) is PreFusionOp.DEQUANT_STUB:
            rewriter.env[node] = rewriter.call(str(node.target), DequantizeOutput(), node.args, node)
        else:
            rewriter.env[node] = rewriter.copy(node)
            if node in floats.constants:
                rewriter.env[node].meta[CONSTANT_KEY] = True
    if rewriter.target.quantization.concat_shares_input_scale:
        share_concat_scales(rewriter.graph, rewriter.new_modules, set(floats.quantized_constants.values()))
    check_int32_outputs(rewriter.graph, rewriter.new_modules)
    _drop_unread_attributes(rewriter.graph)
    prepared = fx.GraphModule(rewriter.new_modules, rewriter.graph, class_name=f"{type(rewriter.traced).__name__}QAT")
    prepared.graph.lint()
    return prepared, rejected


def _drop_unread_attributes(graph: fx.Graph) -> None:
    """Remove the parameters nothing reads any more: those of an ``F.linear`` or ``F.conv2d`` call, which its
    canonical op holds."""
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)


def _check_single_calls(rewriter: Rewriter) -> None:
    modules, kinds = rewriter.modules, rewriter.kinds
    calls = Counter(n.target for n in rewriter.region if n.op == "call_module" and kinds[n] in _SINGLE_CALL_OPS)
    for path, count in calls.items():
        if count > 1:
            raise QuantizationError(
                f"{type(modules[path]).__name__} '{path}': called {count} times in the integer region; each "
                "call needs its own quantization, so give each call a module of its own"
            )


def _float_reason(rewriter: Rewriter, node: fx.Node) -> str | None:
    """Why ``node`` stays float (``None``: it is an integer op); stubs, dropout and data movement never do."""
    op = rewriter.kinds[node]
    if op in (PreFusionOp.QUANT_STUB, PreFusionOp.DROPOUT) or moves_values(op):
        return None
    if rewriter.resolve(module_scope(node)) is None:
        return "its qconfig is None (left float)"
    if emitter_of(op) is None:
        return "edgeq has no integer implementation of this op"
    return None


def _emit_integer_op(rewriter: Rewriter, node: fx.Node, lenient: bool, rejected: dict[str, str]) -> None:
    """Rewrite ``node`` by its op's emitter; settings the emitter refuses leave it float, or (a fused op, or
    ``strict``) raise, or (``lenient``) leave it as it was, rejected."""
    try:
        rewriter.env[rewriter.last(node)] = emitter_of(rewriter.kinds[node])(rewriter, node)
    except (UnsupportedOpError, QuantizationError) as error:
        fused = node in rewriter.fusions and bool(rewriter.fusions[node].absorbed)
        if isinstance(error, UnsupportedOpError) and not rewriter.strict and not fused:
            rewriter.floats.fall_back(node, error.reason)
        elif not lenient:
            raise
        else:
            copied = rewriter.copy(node)
            rejected[copied.name] = error.reason if isinstance(error, UnsupportedOpError) else str(error)
            rewriter.env[node] = copied
