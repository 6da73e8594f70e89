"""``prepare_qat_fx``: a float model with QuantStub/DeQuantStub becomes a calibration / QAT model.

Steps: capture the module-level graph (:mod:`edgeq.quantization.capture`: torch.fx, or torch.export when torch.fx
cannot trace; a deep copy: the user's model is never modified), run the example inputs to learn
every tensor's shape, find the integer region, fuse conv+bn(+relu/relu6), linear(+relu/relu6) and
add(+relu/relu6), and rewrite every node of the region into one canonical op of
:mod:`edgeq.quantization.qat_modules` with the quantizer its output needs, applying the target's
constraints (scale rule, shared concat scales).

An op inside the integer region that edgeq cannot run in integers (LayerNorm, Softmax, Mish...), and every op
of a module whose qconfig is ``None``, stays float, never silently: an :class:`EnterFloat` (dequantize) before
it, a calibrated :class:`LeaveFloat` (quantize) after it, and a :class:`FloatFallbackWarning` naming the node,
the op and the reason (docs/numerics.md "Float fallback"). With ``strict=True`` such an op is an error naming the
node and the op instead.
"""

from __future__ import annotations

import itertools
import logging
import operator
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.fx as fx
from torch import nn

from edgeq.errors import QuantizationError, UnsupportedOpError
from edgeq.numerics import is_power_of_two
from edgeq.ops import Op, gated_op
from edgeq.quantization.capture import CAPTURE_ATTRIBUTE, capture
from edgeq.quantization.fake_quantize import ActivationFakeQuantize
from edgeq.quantization.graph import (
    VALUE_KEY,
    TensorInfo,
    constant_tensors,
    describe_node,
    folded_parameters,
    getattr_path,
    input_nodes,
    integer_region,
    makes_one_tensor,
    module_scope,
    record_example_values,
    tensor_info,
)
from edgeq.quantization.patterns import SUPPORTED_OPS, OpKind, argument, op_kind, pair, table_op
from edgeq.quantization.qat_modules import (
    CONSTANT_KEY,
    FLOAT_REASON_KEY,
    Activation,
    AddAct,
    AvgPool2d,
    Clamp,
    Concat,
    ConvAct2d,
    DequantizeOutput,
    EnterFloat,
    GlobalAvgPool2d,
    LeaveFloat,
    LinearAct,
    LookupTableActivation,
    MatMul,
    MaxPool2d,
    Multiply,
    QuantizeInput,
    Requantizing,
    UpsampleBilinear2d,
    UpsampleNearest2d,
)
from edgeq.quantization.qconfig import QConfig, QConfigSpec, default_qat_qconfig, qconfig_resolver
from edgeq.quantization.state import FakeQuantState, set_fake_quantize
from edgeq.quantization.stubs import fixed_scale_of
from edgeq.targets import ScaleRule, Target, TargetLike, load_target

logger = logging.getLogger(__name__)

TARGET_ATTRIBUTE = "edgeq_target"
"""Attribute of a prepared (and converted) model: the name of the target it was prepared for."""

_FUSABLE_ACTIVATIONS = {OpKind.RELU: Activation.RELU, OpKind.RELU6: Activation.RELU6}
_BATCH_NORM_TENSORS = ("running_mean", "running_var", "weight", "bias")
"""``F.batch_norm``'s tensor arguments after the input, in order."""
_SINGLE_CALL_KINDS = {
    OpKind.QUANT_STUB,
    OpKind.CONV2D,
    OpKind.LINEAR,
    OpKind.BATCHNORM2D,
    OpKind.AVGPOOL2D,
    OpKind.ADAPTIVE_AVGPOOL2D,
    OpKind.TABLE_ACTIVATION,
}


class FloatFallbackWarning(UserWarning):
    """An op of the integer region stays float (it runs on the CPU between a dequantize and a quantize)."""


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
    record_example_values(traced, example_inputs)
    region = integer_region(traced)
    preparer = _Preparer(traced, region, target, resolve, lenient, strict)
    prepared = preparer.run()
    prepared.train(model.training)
    set_fake_quantize(prepared, FakeQuantState.QAT)
    setattr(prepared, TARGET_ATTRIBUTE, target.name)
    setattr(prepared, CAPTURE_ATTRIBUTE, getattr(traced, CAPTURE_ATTRIBUTE))
    return prepared, preparer.rejected


Emitter = Callable[["_Preparer", fx.Node], fx.Node]

EMITTERS: dict[OpKind, Emitter] = {}
"""How ``prepare_qat_fx`` rewrites a node of each kind the user wrote into its canonical op (a method of
``_Preparer``); a kind without one has no integer implementation."""


def _emits(*kinds: OpKind) -> Callable[[Emitter], Emitter]:
    def register(emitter: Emitter) -> Emitter:
        EMITTERS.update(dict.fromkeys(kinds, emitter))
        return emitter

    return register


@dataclass
class _Fusion:
    """A head node and the nodes fused into it (BatchNorm, activation), last one last."""

    head: fx.Node
    batchnorm: fx.Node | None = None
    activation_node: fx.Node | None = None
    activation: Activation = Activation.NONE

    @property
    def last(self) -> fx.Node:
        return self.activation_node or self.batchnorm or self.head

    @property
    def absorbed(self) -> list[fx.Node]:
        return [n for n in (self.batchnorm, self.activation_node) if n is not None]


class _Preparer:
    """Builds the prepared graph node by node (one instance per call)."""

    def __init__(
        self,
        traced: fx.GraphModule,
        region: set[fx.Node],
        target: Target,
        resolve: Callable[[str], QConfig | None],
        lenient: bool,
        strict: bool,
    ) -> None:
        self.traced = traced
        self.lenient = lenient
        self.strict = strict
        self.rejected: dict[str, str] = {}
        self.region = region
        self.target = target
        self.scale_rule: ScaleRule = target.quantization.scale_rule
        self.resolve = resolve
        self.modules = dict(traced.named_modules())
        self.kinds = {node: op_kind(node, self.modules) for node in region}
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.new_modules: dict[str, nn.Module] = {}
        self.fusions: dict[fx.Node, _Fusion] = {}
        self.absorbed: set[fx.Node] = set()
        self.float_outputs: dict[fx.Node, fx.Node] = {}
        self.dequantized: dict[fx.Node, fx.Node] = {}
        self.constants = constant_tensors(traced)
        self.quantized_constants: dict[fx.Node, fx.Node] = {}

    # ---- driver ---------------------------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        self._check_single_calls()
        self._find_fusions()
        for node in self.traced.graph.nodes:
            if node in self.absorbed:
                continue
            if node in self.region and (source := self._float_tuple(node)) is not None:
                self._keep_float(node, self.float_outputs[source].meta[FLOAT_REASON_KEY])
            elif node in self.region and (reason := self._float_reason(node)) is not None:
                self._emit_float(node, reason)
            elif node in self.region:
                self._emit_integer_op(node)
            elif node.op == "call_module" and op_kind(node, self.modules) is OpKind.DEQUANT_STUB:
                self.env[node] = self._call(str(node.target), DequantizeOutput(), node.args, node)
            else:
                self.env[node] = self._copy(node)
                if node in self.constants:
                    self.env[node].meta[CONSTANT_KEY] = True
        if self.target.quantization.concat_shares_input_scale:
            self._share_concat_scales()
        self._check_int32_outputs()
        prepared = fx.GraphModule(self.new_modules, self.graph, class_name=f"{type(self.traced).__name__}QAT")
        prepared.graph.lint()
        return prepared

    def _last(self, node: fx.Node) -> fx.Node:
        fusion = self.fusions.get(node)
        return fusion.last if fusion else node

    def _check_single_calls(self) -> None:
        calls = Counter(n.target for n in self.region if n.op == "call_module" and self.kinds[n] in _SINGLE_CALL_KINDS)
        for path, count in calls.items():
            if count > 1:
                raise QuantizationError(
                    f"{type(self.modules[path]).__name__} '{path}': called {count} times in the integer region; each "
                    "call needs its own quantization, so give each call a module of its own"
                )

    # ---- fusion ---------------------------------------------------------------------------------------------
    def _sole_user(self, node: fx.Node) -> fx.Node | None:
        users = list(node.users)
        if len(users) != 1 or users[0] not in self.region or self._float_reason(users[0]) is not None:
            return None
        operands = [n for n in input_nodes(users[0]) if n not in folded_parameters(users[0])]
        return users[0] if operands == [node] else None

    def _gating_mul(self, node: fx.Node) -> fx.Node | None:
        """The ``x * node`` that makes ``node = g(x)`` a gated activation (``x * sigmoid(x)`` is SiLU)."""
        users = list(node.users)
        if len(users) != 1 or users[0] not in self.region or self.kinds.get(users[0]) is not OpKind.MUL:
            return None
        if self._float_reason(users[0]) is not None:
            return None
        operands = [argument(users[0], 0, "input"), argument(users[0], 1, "other")]
        return users[0] if sorted(operands, key=id) == sorted([node, node.args[0]], key=id) else None

    def _follows_conv(self, batchnorm: fx.Node) -> bool:
        """Whether ``batchnorm`` folds into the conv that produces its input."""
        source = batchnorm.args[0]
        return self.kinds.get(source) is OpKind.CONV2D and self._sole_user(source) is batchnorm

    def _find_fusions(self) -> None:
        for node, kind in self.kinds.items():
            if self._float_reason(node) is not None:
                continue
            if kind is OpKind.BATCHNORM2D:
                self.absorbed.update(p for p in folded_parameters(node) if len(p.users) == 1)
            gated = kind is OpKind.TABLE_ACTIVATION and gated_op(table_op(node, self.modules)) is not None
            if gated and (mul := self._gating_mul(node)) is not None:
                self.fusions[node] = _Fusion(node, activation_node=mul)
                self.absorbed.add(mul)
            if kind not in (OpKind.CONV2D, OpKind.LINEAR, OpKind.ADD, OpKind.BATCHNORM2D) or (
                kind is OpKind.BATCHNORM2D and self._follows_conv(node)
            ):
                continue
            fusion = _Fusion(node)
            follower = self._sole_user(node)
            if kind is OpKind.CONV2D and follower is not None and self.kinds.get(follower) is OpKind.BATCHNORM2D:
                fusion.batchnorm = follower
                follower = self._sole_user(follower)
            if follower is not None and self.kinds.get(follower) in _FUSABLE_ACTIVATIONS:
                fusion.activation_node = follower
                fusion.activation = _FUSABLE_ACTIVATIONS[self.kinds[follower]]
            self.fusions[node] = fusion
            self.absorbed.update(fusion.absorbed)

    # ---- copying float, shape and reshape nodes ------------------------------------------------------------
    def _copy(self, node: fx.Node) -> fx.Node:
        """``node`` as it is: its arguments as an integer op reads them in the region, as they are outside (shape
        arithmetic, constants)."""
        if node.op == "call_module":
            self.new_modules[node.target] = self.modules[node.target]
        elif node.op == "get_attr":
            self.new_modules[node.target] = getattr_path(self.traced, node.target)
        return self.graph.node_copy(node, self._integer_value if node in self.region else self._value_outside)

    def _value_outside(self, node: fx.Node) -> fx.Node:
        return self.env[node] if node in self.env else self.float_outputs[node]

    def _call(self, path: str, module: nn.Module, args: Sequence[object], source: fx.Node) -> fx.Node:
        self.new_modules[path] = module
        mapped = fx.node.map_arg(tuple(args), self._integer_value)
        new_node = self.graph.call_module(path, mapped)
        new_node.meta = dict(source.meta)
        return new_node

    def _functional_path(self, node: fx.Node, base: str) -> str:
        """Where the canonical op of ``node`` goes: the module's own path (each further call of a module without
        weights nor quantizer, such as SPPF's max pool, gets ``<path>_1``...), or ``<scope>.<base>``."""
        if node.op == "call_module":
            path = str(node.target)
            return self._unique_path(path) if path in self.new_modules else path
        scope = module_scope(node)
        return self._unique_path(f"{scope}.{base}" if scope else base)

    def _unique_path(self, stem: str) -> str:
        path, suffix = stem, 0
        while path in self.new_modules or path in self.modules:
            suffix += 1
            path = f"{stem}_{suffix}"
        return path

    # ---- quantizers -----------------------------------------------------------------------------------------
    def _qconfig(self, node: fx.Node, allows_int32: bool) -> QConfig:
        qconfig = self.resolve(module_scope(node)) or self._global_qconfig
        if qconfig.output_dtype == "int32" and not allows_int32:
            raise QuantizationError(
                f"{describe_node(node, self.modules)}: its qconfig asks for an int32 output, which only a Conv2d or "
                "Linear followed by a DeQuantStub can give; set the int32 qconfig on that layer alone"
            )
        return qconfig

    def _quantizer(self, node: fx.Node, path: str, fixed_scale: float | None = None) -> ActivationFakeQuantize:
        if fixed_scale is not None:
            return ActivationFakeQuantize(None, self.scale_rule, fixed_scale=fixed_scale, owner=path)
        qconfig = self._qconfig(node, allows_int32=False)
        return ActivationFakeQuantize(qconfig.activation_observer(), self.scale_rule, owner=path)

    @property
    def _global_qconfig(self) -> QConfig:
        return self.resolve("") or default_qat_qconfig

    # ---- float fallback -------------------------------------------------------------------------------------
    def _float_reason(self, node: fx.Node) -> str | None:
        """Why ``node`` stays float (``None``: it is an integer op); stubs and data movement never do."""
        kind = self.kinds[node]
        if kind in (OpKind.QUANT_STUB, OpKind.RESHAPE, OpKind.DROPOUT):
            return None
        if self.resolve(module_scope(node)) is None:
            return "its qconfig is None (left float)"
        if kind not in EMITTERS:
            return "edgeq has no integer implementation of this op"
        return None

    def _emit_float(self, node: fx.Node, reason: str) -> None:
        """Copy ``node`` as a float op: a dequantize before each integer input, a quantize after on demand."""
        if self.strict:
            raise self._unsupported(node, f"{reason}; strict=True asks for a fully integer model")
        warnings.warn(
            f"{describe_node(node, self.modules)}: {reason}: it runs in float on the CPU between a dequantize and "
            "a calibrated quantize (prepare_qat_fx(..., strict=True) refuses it instead)",
            FloatFallbackWarning,
            stacklevel=5,
        )
        self._keep_float(node, reason)

    def _keep_float(self, node: fx.Node, reason: str) -> None:
        if node.op == "call_module":
            self.new_modules[node.target] = self.modules[node.target]
        copied = self.graph.node_copy(node, self._float_value)
        copied.meta[FLOAT_REASON_KEY] = reason
        self.float_outputs[node] = copied

    def _float_tuple(self, node: fx.Node) -> fx.Node | None:
        """The op left in float whose tuple result ``node`` takes an item of (``attention(x, x, x)[0]``): the item is
        part of that op, in float too (a tuple has no quantize)."""
        if self.kinds[node] is not OpKind.RESHAPE:
            return None
        return next((n for n in input_nodes(node) if n in self.float_outputs and isinstance(n.meta.get(VALUE_KEY), tuple)), None)

    def _float_value(self, node: fx.Node) -> fx.Node:
        """``node``'s value as a float op reads it: its float output, or its integer value dequantized."""
        if node in self.float_outputs:
            return self.float_outputs[node]
        if node not in self.region:
            return self.env[node]
        if node not in self.dequantized:
            value = self.env[node]
            path = self._unique_path(f"{self._functional_path(node, node.name)}_dequantize")
            self.new_modules[path] = EnterFloat()
            with self.graph.inserting_after(value):
                self.dequantized[node] = self.graph.call_module(path, (value,))
            self.dequantized[node].meta = dict(node.meta)
        return self.dequantized[node]

    def _integer_value(self, node: fx.Node) -> fx.Node:
        """``node``'s value as an integer op reads it: itself, or the calibrated quantize of a float op's output
        or of a constant tensor (a parameter such as ViT's class token)."""
        if node in self.constants:
            if node not in self.quantized_constants:
                stem = str(node.target) if node.op == "get_attr" else node.name
                self.quantized_constants[node] = self._leave_float(node, self.env[node], stem)
            return self.quantized_constants[node]
        if node not in self.env:
            self.env[node] = self._leave_float(node, self.float_outputs[node], self._functional_path(node, node.name))
        return self.env[node]

    def _leave_float(self, node: fx.Node, value: fx.Node, stem: str) -> fx.Node:
        """A calibrated quantize, at ``<stem>_quantize``, of the float ``value`` computed by ``node``."""
        path = self._unique_path(f"{stem}_quantize")
        observer = self._global_qconfig.activation_observer()
        self.new_modules[path] = LeaveFloat(ActivationFakeQuantize(observer, self.scale_rule, owner=path))
        with self.graph.inserting_after(value):
            quantized = self.graph.call_module(path, (value,))
        quantized.meta = dict(node.meta)
        return quantized

    # ---- one emitter per op kind ----------------------------------------------------------------------------
    def _emit_integer_op(self, node: fx.Node) -> None:
        try:
            self.env[self._last(node)] = EMITTERS[self.kinds[node]](self, node)
        except (UnsupportedOpError, QuantizationError) as error:
            fused = node in self.fusions and bool(self.fusions[node].absorbed)
            if isinstance(error, UnsupportedOpError) and not self.strict and not fused:
                self._emit_float(node, error.reason)
            elif not self.lenient:
                raise
            else:
                copied = self._copy(node)
                self.rejected[copied.name] = error.reason if isinstance(error, UnsupportedOpError) else str(error)
                self.env[node] = copied

    def _unsupported(self, node: fx.Node, reason: str) -> UnsupportedOpError:
        return UnsupportedOpError(
            f"{describe_node(node, self.modules)}: {reason}. Supported in the integer region: {SUPPORTED_OPS}. "
            "To keep this op in float, prepare without strict=True (it then runs in float on the CPU), or move it "
            "after a DeQuantStub (and re-enter with a QuantStub)",
            reason=reason,
        )

    @_emits(OpKind.QUANT_STUB)
    def _emit_quant_stub(self, node: fx.Node) -> fx.Node:
        path = str(node.target)
        fixed_scale = fixed_scale_of(self.modules[path])
        if fixed_scale is not None and self.scale_rule is ScaleRule.POWER_OF_TWO and not is_power_of_two(fixed_scale):
            raise QuantizationError(
                f"QuantStub '{path}': fixed scale {fixed_scale:.6g} is not a power of two; target "
                f"'{self.target.name}' accepts power-of-two scales only (e.g. 1/128, 1/64)"
            )
        self._qconfig(node, allows_int32=False)
        return self._call(path, QuantizeInput(self._quantizer(node, path, fixed_scale)), node.args, node)

    @_emits(OpKind.CONV2D)
    def _emit_conv2d(self, node: fx.Node) -> fx.Node:
        conv = self.modules[node.target]
        fusion = self.fusions[node]
        if conv.padding_mode != "zeros":
            raise self._unsupported(node, f"padding_mode '{conv.padding_mode}' (allowed: 'zeros')")
        conv.padding = _explicit_padding(conv, lambda reason: self._unsupported(node, reason))
        batchnorm = self._batchnorm(fusion.batchnorm) if fusion.batchnorm is not None else None
        quantizer = self._weighted_output_quantizer(node, fusion)
        module = ConvAct2d(conv, batchnorm, fusion.activation, self.scale_rule, quantizer)
        return self._call(str(node.target), module, node.args, fusion.last)

    @_emits(OpKind.LINEAR)
    def _emit_linear(self, node: fx.Node) -> fx.Node:
        fusion = self.fusions[node]
        quantizer = self._weighted_output_quantizer(node, fusion)
        module = LinearAct(self.modules[node.target], fusion.activation, self.scale_rule, quantizer)
        return self._call(str(node.target), module, node.args, fusion.last)

    def _weighted_output_quantizer(self, node: fx.Node, fusion: _Fusion) -> ActivationFakeQuantize | None:
        path = str(node.target)
        if self._qconfig(node, allows_int32=True).output_dtype == "int8":
            return self._quantizer(node, path)
        if fusion.activation is not Activation.NONE:
            raise QuantizationError(
                f"{describe_node(node, self.modules)}: an int32 output cannot have a fused "
                f"{fusion.activation.value}; use the int32 qconfig on a final layer without activation"
            )
        return None

    def _batchnorm(self, node: fx.Node) -> nn.BatchNorm2d:
        """The BatchNorm2d of a module call, or one sharing the parameters of an ``F.batch_norm`` call."""
        if node.op == "call_module":
            batchnorm = self.modules[node.target]
        else:
            tensors = [argument(node, i, name) for i, name in enumerate(_BATCH_NORM_TENSORS, start=1)]
            running_mean, running_var, weight, bias = (
                getattr_path(self.traced, n.target) if isinstance(n, fx.Node) and n.op == "get_attr" else n
                for n in tensors
            )
            if running_mean is None or running_var is None:
                raise self._unsupported(node, "F.batch_norm without running statistics cannot be folded")
            batchnorm = nn.BatchNorm2d(
                running_mean.numel(),
                eps=argument(node, 7, "eps", 1e-5),
                momentum=argument(node, 6, "momentum", 0.1),
                affine=weight is not None,
            )
            batchnorm.running_mean, batchnorm.running_var = running_mean, running_var
            if weight is not None:
                batchnorm.weight, batchnorm.bias = weight, bias
        if batchnorm.running_var is None:
            raise self._unsupported(node, "BatchNorm2d without running statistics cannot be folded")
        return batchnorm

    @_emits(OpKind.BATCHNORM2D)
    def _emit_batchnorm2d(self, node: fx.Node) -> fx.Node:
        """A BatchNorm2d with no conv before it: a per-channel affine, i.e. a depthwise 1x1 conv of unit weights
        with the BatchNorm folded in (docs/numerics.md "BatchNorm")."""
        fusion = self.fusions[node]
        batchnorm = self._batchnorm(node)
        channels = batchnorm.running_var.numel()
        identity = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        identity.weight.requires_grad_(False)
        nn.init.ones_(identity.weight)
        path = self._functional_path(node, "batch_norm")
        quantizer = self._quantizer(node, path)
        module = ConvAct2d(identity, batchnorm, fusion.activation, self.scale_rule, quantizer)
        return self._call(path, module, (node.args[0],), fusion.last)

    @_emits(OpKind.ADD)
    def _emit_add(self, node: fx.Node) -> fx.Node:
        left, right = argument(node, 0, "input"), argument(node, 1, "other")
        if not (isinstance(left, fx.Node) and isinstance(right, fx.Node)):
            raise self._unsupported(node, "only the sum of two quantized tensors is supported (not a constant)")
        if argument(node, 2, "alpha", 1) != 1:
            raise self._unsupported(node, "add with alpha != 1")
        fusion = self.fusions[node]
        path = self._functional_path(node, "add")
        module = AddAct(fusion.activation, self._quantizer(node, path))
        return self._call(path, module, (left, right), fusion.last)

    @_emits(OpKind.CAT)
    def _emit_cat(self, node: fx.Node) -> fx.Node:
        tensors = list(argument(node, 0, "tensors"))
        rank = len(tensor_info(node).shape)
        dim = argument(node, 1, "dim", 0) % rank
        path = self._functional_path(node, "cat")
        return self._call(path, Concat(dim, self._quantizer(node, path)), tensors, node)

    def _pool_settings(self, node: fx.Node, names: tuple[str, ...], defaults: tuple[object, ...]) -> list:
        """Pooling settings by name, from the module or from the functional call (same names in both)."""
        if node.op == "call_module":
            values = [getattr(self.modules[node.target], name) for name in names]
        else:
            values = [argument(node, i + 1, name, default) for i, (name, default) in enumerate(zip(names, defaults))]
        kernel, stride, *rest = values
        return [pair(kernel), pair(stride or kernel), *rest]

    @_emits(OpKind.MAXPOOL2D)
    def _emit_maxpool2d(self, node: fx.Node) -> fx.Node:
        kernel, stride, padding, dilation, ceil_mode, return_indices = self._pool_settings(
            node,
            ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
            (None, None, 0, 1, False, False),
        )
        if return_indices:
            raise self._unsupported(node, "max pooling with return_indices")
        module = MaxPool2d(kernel, stride, pair(padding), pair(dilation), ceil_mode=bool(ceil_mode))
        return self._call(self._functional_path(node, "max_pool2d"), module, (node.args[0],), node)

    @_emits(OpKind.AVGPOOL2D)
    def _emit_avgpool2d(self, node: fx.Node) -> fx.Node:
        kernel, stride, padding, ceil_mode, count_include_pad, divisor_override = self._pool_settings(
            node,
            ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
            (None, None, 0, False, True, None),
        )
        padding = pair(padding)
        if divisor_override is not None:
            raise self._unsupported(node, "avg pooling with divisor_override")
        if any(padding) and not count_include_pad:
            raise self._unsupported(node, "avg pooling over padding with count_include_pad=False (the divisor varies)")
        if ceil_mode and _pooled_size(node, kernel, stride, padding, ceil=True) != _pooled_size(
            node, kernel, stride, padding, ceil=False
        ):
            raise self._unsupported(node, "avg pooling whose ceil_mode creates partial windows (the divisor varies)")
        path = self._functional_path(node, "avg_pool2d")
        return self._call(path, AvgPool2d(kernel, stride, padding, self._quantizer(node, path)), (node.args[0],), node)

    @_emits(OpKind.ADAPTIVE_AVGPOOL2D)
    def _emit_adaptive_avgpool2d(self, node: fx.Node) -> fx.Node:
        source = node.args[0]
        height, width = tensor_info(source).shape[-2:]
        size = self.modules[node.target].output_size if node.op == "call_module" else argument(node, 1, "output_size")
        size = size if isinstance(size, (tuple, list)) else (size, size)
        out_h, out_w = (height if size[0] is None else size[0]), (width if size[1] is None else size[1])
        path = self._functional_path(node, "adaptive_avg_pool2d")
        if (out_h, out_w) == (1, 1):
            module: nn.Module = GlobalAvgPool2d(True, (height, width), self._quantizer(node, path))
        elif height % out_h == 0 and width % out_w == 0:
            kernel = (height // out_h, width // out_w)
            module = AvgPool2d(kernel, kernel, (0, 0), self._quantizer(node, path))
        else:
            return self._emit_uneven_adaptive_avgpool2d(node, path, (out_h, out_w))
        return self._call(path, module, (source,), node)

    def _emit_uneven_adaptive_avgpool2d(self, node: fx.Node, path: str, out_size: tuple[int, int]) -> fx.Node:
        """Adaptive average pooling whose windows differ in size: the mean of each window (a global average pool
        of its slice) requantized straight to the pool's scale, the windows concatenated along W and viewed as
        the output grid (docs/numerics.md, "Adaptive average pooling")."""
        source = self._integer_value(node.args[0])
        info = tensor_info(node.args[0])
        quantizer = self._quantizer(node, path)
        windows = itertools.product(*(enumerate(adaptive_windows(n, o)) for n, o in zip(info.shape[2:], out_size)))
        means = []
        for (row, (top, bottom)), (column, (left, right)) in windows:
            index = (slice(None), slice(None), slice(top, bottom), slice(left, right))
            window = self.graph.call_function(operator.getitem, (source, index))
            window.meta[VALUE_KEY] = TensorInfo((*info.shape[:2], bottom - top, right - left), info.dtype)
            mean = GlobalAvgPool2d(True, (bottom - top, right - left), None)
            mean.share_output_scale_with(path)
            mean_path = f"{path}_{row}_{column}"
            self.new_modules[mean_path] = mean
            means.append(self.graph.call_module(mean_path, (window,)))
            means[-1].meta[VALUE_KEY] = TensorInfo((*info.shape[:2], 1, 1), info.dtype)
        concat = self._call(path, Concat(3, quantizer), (), node)
        concat.args = tuple(means)
        concat.meta = {VALUE_KEY: TensorInfo((*info.shape[:2], 1, len(means)), info.dtype)}
        grid = self.graph.call_method("reshape", (concat, -1, info.shape[1], *out_size))
        grid.meta = dict(node.meta)
        return grid

    @_emits(OpKind.MEAN)
    def _emit_mean(self, node: fx.Node) -> fx.Node:
        source = node.args[0]
        shape = tensor_info(source).shape
        dims = argument(node, 1, "dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        if len(shape) != 4 or sorted(d % 4 for d in dims) != [2, 3] or argument(node, 3, "dtype") is not None:
            raise self._unsupported(node, f"mean over dims {dims} of a {len(shape)}-D tensor (allowed: H and W of 4-D)")
        path = self._functional_path(node, "mean")
        module = GlobalAvgPool2d(bool(argument(node, 2, "keepdim", False)), shape[2:], self._quantizer(node, path))
        return self._call(path, module, (source,), node)

    @_emits(OpKind.UPSAMPLE)
    def _emit_upsample(self, node: fx.Node) -> fx.Node:
        settings = _interpolation(node, self.modules)
        if settings.mode == "bilinear":
            return self._emit_bilinear(node, settings)
        if settings.mode != "nearest":
            raise self._unsupported(node, f"upsampling mode '{settings.mode}' (allowed: 'nearest', 'bilinear')")
        source = node.args[0]
        in_shape, out_shape = tensor_info(source).shape[-2:], tensor_info(node).shape[-2:]
        if any(o % i for o, i in zip(out_shape, in_shape)):
            raise self._unsupported(node, f"upsampling {in_shape} to {out_shape} is not by integer factors")
        factor = (out_shape[0] // in_shape[0], out_shape[1] // in_shape[1])
        return self._call(self._functional_path(node, "upsample"), UpsampleNearest2d(factor), (source,), node)

    def _emit_bilinear(self, node: fx.Node, settings: _Interpolation) -> fx.Node:
        """Bilinear resize (docs/numerics.md, "Bilinear resize"): its coordinates are those of the input and output
        sizes, which torch also uses unless a ``scale_factor`` that does not give the output size exactly drives them
        (``align_corners=False``)."""
        source = node.args[0]
        in_shape, out_shape = tensor_info(source).shape, tensor_info(node).shape
        if len(in_shape) != 4:
            raise self._unsupported(node, f"bilinear resize of a {len(in_shape)}-D tensor (allowed: 4-D NCHW)")
        if settings.antialias:
            raise self._unsupported(node, "bilinear resize with antialias=True (allowed: antialias=False)")
        factors = settings.scale_factor
        if factors is not None and not settings.align_corners and not settings.recompute_scale_factor:
            factors = factors if isinstance(factors, (tuple, list)) else (factors, factors)
            if any(Fraction(f) * i != o for f, i, o in zip(factors, in_shape[2:], out_shape[2:])):
                raise self._unsupported(
                    node,
                    f"bilinear resize by scale_factor {tuple(factors)} maps {tuple(in_shape[2:])} to "
                    f"{tuple(out_shape[2:])} rows and columns inexactly (allowed: factors that give whole sizes, or size=)",
                )
        path = self._functional_path(node, "upsample")
        module = UpsampleBilinear2d(tuple(out_shape[2:]), settings.align_corners, self._quantizer(node, path))
        return self._call(path, module, (source,), node)

    @_emits(OpKind.RELU)
    def _emit_relu(self, node: fx.Node) -> fx.Node:
        return self._emit_clamp(node, Activation.RELU)

    @_emits(OpKind.RELU6)
    def _emit_relu6(self, node: fx.Node) -> fx.Node:
        return self._emit_clamp(node, Activation.RELU6)

    def _emit_clamp(self, node: fx.Node, activation: Activation) -> fx.Node:
        path = self._functional_path(node, activation.value)
        return self._call(path, Clamp(activation), (node.args[0],), node)

    @_emits(OpKind.TABLE_ACTIVATION)
    def _emit_lookup_table(self, node: fx.Node) -> fx.Node:
        op = table_op(node, self.modules)
        fusion = self.fusions.get(node)
        if fusion is not None:
            op = gated_op(op)
        if op is Op.LEAKYRELU:
            module = self.modules[node.target] if node.op == "call_module" else None
            alpha = module.negative_slope if module is not None else argument(node, 1, "negative_slope", 0.01)
        else:
            alpha = 0.0
        path = self._functional_path(node, op.value)
        module = LookupTableActivation(op, alpha, self._quantizer(node, path))
        return self._call(path, module, (node.args[0],), fusion.last if fusion else node)

    @_emits(OpKind.MUL)
    def _emit_mul(self, node: fx.Node) -> fx.Node:
        left, right = argument(node, 0, "input"), argument(node, 1, "other")
        if not all(makes_one_tensor(operand) for operand in (left, right)):
            raise self._unsupported(node, "only the product of two quantized tensors is supported (not a constant)")
        path = self._functional_path(node, "mul")
        return self._call(path, Multiply(self._quantizer(node, path)), (left, right), node)

    @_emits(OpKind.MATMUL)
    def _emit_matmul(self, node: fx.Node) -> fx.Node:
        """A matrix product of two activations (docs/numerics.md, "Matrix product"); ``torch.bmm`` names its second
        operand ``mat2``."""
        left, right = argument(node, 0, "input"), argument(node, 1, "other", node.kwargs.get("mat2"))
        if not (makes_one_tensor(left) and makes_one_tensor(right)):
            raise self._unsupported(node, "only the matrix product of two quantized tensors is supported (not a constant)")
        ranks = [len(tensor_info(operand).shape) for operand in (left, right)]
        if min(ranks) < 2:
            raise self._unsupported(node, f"matrix product of {ranks[0]}-D and {ranks[1]}-D tensors (allowed: 2-D or more)")
        path = self._functional_path(node, "matmul")
        module = MatMul(tensor_info(left).shape[-1], self._quantizer(node, path))
        return self._call(path, module, (left, right), node)

    @_emits(OpKind.RESHAPE)
    def _emit_reshape(self, node: fx.Node) -> fx.Node:
        return self._copy(node)

    @_emits(OpKind.DROPOUT)
    def _emit_dropout(self, node: fx.Node) -> fx.Node:
        return self._copy(node)

    # ---- target constraints and final checks ----------------------------------------------------------------
    def _share_concat_scales(self) -> None:
        """Each input of a concat that has a quantizer of its own (an op's output, a constant's quantize) and no
        other reader is quantized at the concat's scale."""
        constants = set(self.quantized_constants.values())
        for node in self.graph.nodes:
            if node.op != "call_module" or not isinstance(self.new_modules[node.target], Concat):
                continue
            for producer in input_nodes(node):
                module = self.new_modules.get(producer.target) if producer.op == "call_module" else None
                if (
                    isinstance(module, Requantizing)
                    and (not isinstance(module, QuantizeInput) or producer in constants)
                    and module.output_quantizer is not None
                    and len(producer.users) == 1
                ):
                    module.share_output_scale_with(str(node.target))

    def _check_int32_outputs(self) -> None:
        for node in self.graph.nodes:
            module = self.new_modules.get(node.target) if node.op == "call_module" else None
            if isinstance(module, (ConvAct2d, LinearAct)) and module.output_dtype == "int32":
                consumers = [self.new_modules.get(user.target) for user in node.users if user.op == "call_module"]
                if len(consumers) != len(node.users) or not all(isinstance(c, DequantizeOutput) for c in consumers):
                    raise QuantizationError(
                        f"{type(module).__name__} '{node.target}': an int32 output must go straight to a DeQuantStub; "
                        "it feeds other ops. Use the int32 qconfig on the model's final layer only"
                    )


def _explicit_padding(conv: nn.Conv2d, unsupported: Callable[[str], Exception]) -> tuple[int, int]:
    if not isinstance(conv.padding, str):
        return pair(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(total % 2 for total in totals):
        raise unsupported("padding='same' with an even kernel pads unevenly; pad explicitly")
    return (totals[0] // 2, totals[1] // 2)


def adaptive_windows(size: int, out_size: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` of each of adaptive pooling's ``out_size`` windows over ``size`` (PyTorch's rule)."""
    return [(i * size // out_size, -(-(i + 1) * size // out_size)) for i in range(out_size)]


def _pooled_size(
    node: fx.Node, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], ceil: bool
) -> tuple[int, ...]:
    size = tensor_info(node.args[0]).shape[-2:]
    result = []
    for length, k, s, p in zip(size, kernel, stride, padding):
        span = length + 2 * p - k
        out = (-(-span // s) if ceil else span // s) + 1
        if ceil and (out - 1) * s >= length + p:
            out -= 1
        result.append(out)
    return tuple(result)


@dataclass(frozen=True)
class _Interpolation:
    """The settings of an ``F.interpolate`` call or an ``nn.Upsample`` / ``nn.Upsampling*2d`` module."""

    mode: str
    align_corners: bool
    scale_factor: float | tuple[float, ...] | None
    recompute_scale_factor: bool
    antialias: bool


def _interpolation(node: fx.Node, modules: dict[str, nn.Module]) -> _Interpolation:
    """The interpolation settings of an upsample node, whether a module or ``F.interpolate`` (positional or keyword)."""
    if node.op == "call_module":
        module = modules[node.target]
        factor, recompute = module.scale_factor, module.recompute_scale_factor
        return _Interpolation(module.mode, bool(module.align_corners), factor, bool(recompute), False)
    return _Interpolation(
        argument(node, 3, "mode", "nearest"),
        bool(argument(node, 4, "align_corners", False)),
        argument(node, 2, "scale_factor"),
        bool(argument(node, 5, "recompute_scale_factor", False)),
        bool(argument(node, 6, "antialias", False)),
    )
