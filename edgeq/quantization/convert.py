"""``convert_fx``: a calibrated / QAT model becomes the integer model.

Each canonical op of the prepared graph becomes its integer twin: BatchNorm is folded with its running
statistics, weights are quantized exactly as the QAT model fake-quantized them, biases become int32 (a layer whose
bias passes int32 accumulates in int64, with a :class:`WideAccumulatorWarning`), and every requantization factor
becomes a fixed-point multiplier and shift (docs/numerics.md). Ops that only move values
(reshape, transpose, chunk, getitem) are kept; dropout disappears. Ops left in float are kept as they are,
between the dequantize and the quantize of the float fallback.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn

from edgeq.errors import QuantizationError
from edgeq.numerics import (
    ACTIVATION_QMAX,
    ACTIVATION_QMIN,
    INT32_MAX,
    FixedPointMultiplier,
    accumulator_bounds,
    add_multipliers,
    bias_scales,
    bilinear_multiplier,
    check_accumulator_bound,
    check_product_accumulator_bound,
    clamp_levels,
    conv_multipliers,
    lookup_table,
    needs_int64_accumulator,
    product_multiplier,
    quantize_bias,
    quantize_multiplier,
    quantize_weight,
    real_multiplier,
    relu6_ceiling,
)
from edgeq.ops import LOOKUP_TABLE_OPS, Op, OpTable
from edgeq.quantization.distributed import synchronize_ranks
from edgeq.quantization.fake_quantize import weight_scales
from edgeq.quantization.graph import getattr_path, input_nodes
from edgeq.quantization.integer_model import IntegerModel
from edgeq.quantization.integer_ops import (
    IntAdd,
    IntAvgPool2d,
    IntClamp,
    IntConcat,
    IntConv2d,
    IntDequantize,
    IntEnterFloat,
    IntGlobalAvgPool2d,
    IntLeaveFloat,
    IntLinear,
    IntLookupTable,
    IntMatMul,
    IntMaxPool2d,
    IntMul,
    IntQuantize,
    IntUpsampleBilinear2d,
    IntUpsampleNearest2d,
    TensorQuant,
)
from edgeq.quantization.patterns import PreFusionOp, moves_values, source_op
from edgeq.quantization.prepare import ROUNDING_ATTRIBUTE, TARGET_ATTRIBUTE, is_prepared
from edgeq.quantization.qat_modules import (
    CANONICAL,
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
from edgeq.targets import Rounding

logger = logging.getLogger(__name__)

Converter = Callable[["_Converter", fx.Node, nn.Module], "tuple[nn.Module, TensorQuant | None]"]

CONVERTERS: OpTable[Converter] = OpTable("converter in convert.py", lambda info: not info.movement)
"""How ``convert_fx`` turns each op's canonical module into its integer op (a method of ``_Converter``)."""


class WideAccumulatorWarning(UserWarning):
    """A conv or linear layer's accumulator can pass int32 (a channel's bias is large for its tiny ``s_in * s_w``):
    it is computed exactly with an int64 accumulator, on the CPU (docs/numerics.md section 5)."""


def _warn_wide_accumulator(what: str, bounds: list[int], bias: torch.Tensor, scales: list[float]) -> None:
    channel = max(range(len(bounds)), key=bounds.__getitem__)
    warnings.warn(
        f"{what}: its accumulator can reach {bounds[channel]} (int32: up to {INT32_MAX}; channel {channel}'s bias is "
        f"{int(bias[channel])} steps of its scale {scales[channel]:.6g}): it is computed exactly with an int64 "
        "accumulator, on the CPU of NPU targets (ONNX Runtime's fused int8 kernels misread the QDQ file's bias: run it "
        "with graph optimizations off, docs/numerics.md section 8). Calibrating with representative data, or training "
        "the layer, brings it within int32",
        WideAccumulatorWarning,
        stacklevel=2,
    )


def convert_fx(model: fx.GraphModule) -> IntegerModel:
    """Convert a prepared (calibrated or QAT-trained) model to the integer model.

    The prepared model is not modified, except under torch.distributed: there every rank's observers are first
    combined and BatchNorm statistics copied from rank 0 (a collective: every rank converts), so every rank
    converts the same integer model. Convert in any fake-quant state: the ranges observed so far are used.

    Raises:
        QuantizationError: the model was not prepared by ``prepare_qat_fx``, an activation range was never
            observed, or a scale, multiplier or bias falls outside the ranges of docs/numerics.md.
    """
    if not is_prepared(model):
        raise QuantizationError(
            f"convert_fx: {type(model).__name__} was not prepared by edgeq's prepare_qat_fx; prepare, calibrate "
            "or train, then convert"
        )
    synchronize_ranks(model)
    converter = _Converter(model)
    with torch.no_grad(), torch.autocast("cpu", enabled=False), _cuda_autocast_disabled():  # scales are float32 values
        graph_module, tensor_quant = converter.run()
    target = getattr(model, TARGET_ATTRIBUTE)
    logger.info("converted %s to the integer model for %s (rounding %s)", type(model).__name__, target, converter.rounding.value)
    return IntegerModel(graph_module, tensor_quant, target, converter.rounding)


def _cuda_autocast_disabled() -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", enabled=False) if torch.cuda.is_available() else contextlib.nullcontext()


class _Converter:
    """Builds the integer graph node by node (one instance per call)."""

    def __init__(self, prepared: fx.GraphModule) -> None:
        self.prepared = prepared
        self.rounding: Rounding = getattr(prepared, ROUNDING_ATTRIBUTE, Rounding.HALF_TO_EVEN)
        self.modules = dict(prepared.named_modules())
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.new_modules: dict[str, nn.Module] = {}
        self.quant: dict[fx.Node, TensorQuant] = {}
        self.boundaries: dict[type[nn.Module], Converter] = {
            QuantizeInput: _Converter._quantize,
            LeaveFloat: _Converter._quantize,
            DequantizeOutput: _Converter._dequantize,
            EnterFloat: _Converter._dequantize,
        }

    def _converter(self, module: nn.Module) -> Converter | None:
        op = CANONICAL.op_of_instance(module)
        return CONVERTERS[op] if op is not None else self.boundaries.get(type(module))

    def run(self) -> tuple[fx.GraphModule, dict[str, TensorQuant]]:
        for node in self.prepared.graph.nodes:
            module = self.modules.get(node.target) if node.op == "call_module" else None
            converter = self._converter(module) if module is not None else None
            if converter is not None:
                integer_op, quant = converter(self, node, module)
                self.new_modules[node.target] = integer_op
                self.env[node] = self.graph.call_module(node.target, fx.node.map_arg(node.args, self.env.__getitem__))
                if quant is not None:
                    self.quant[node] = quant
            elif self._is_integer_passthrough(node):
                self._pass_through(node)
            else:
                self._copy(node)
        graph_module = fx.GraphModule(self.new_modules, self.graph, class_name=self.prepared.__class__.__name__.replace("QAT", "Int"))
        graph_module.graph.lint()
        tensor_quant = {self.env[node].name: quant for node, quant in self.quant.items()}
        return graph_module, tensor_quant

    # ---- nodes that are not canonical ops -------------------------------------------------------------------
    def _is_integer_passthrough(self, node: fx.Node) -> bool:
        if node.op not in ("call_module", "call_function", "call_method"):
            return False
        op = source_op(node, self.modules)
        if not (moves_values(op) or op is PreFusionOp.DROPOUT):
            return False
        return any(n in self.quant for n in input_nodes(node))

    def _pass_through(self, node: fx.Node) -> None:
        source = next(n for n in input_nodes(node) if n in self.quant)
        self.quant[node] = self.quant[source]
        if source_op(node, self.modules) is PreFusionOp.DROPOUT or (node.op == "call_module" and isinstance(self.modules[node.target], nn.Identity)):
            self.env[node] = self.env[source]
            return
        self._copy(node)

    def _copy(self, node: fx.Node) -> None:
        if node.op == "call_module":
            self.new_modules[node.target] = copy.deepcopy(self.modules[node.target])
        elif node.op == "get_attr":
            self.new_modules[node.target] = copy.deepcopy(getattr_path(self.prepared, node.target))
        self.env[node] = self.graph.node_copy(node, self.env.__getitem__)

    # ---- scales -----------------------------------------------------------------------------------------------
    def _input_quant(self, node: fx.Node, index: int = 0) -> TensorQuant:
        source = node.args[index]
        if source not in self.quant:
            raise QuantizationError(f"'{node.target}': input '{source.name}' is not quantized")
        quant = self.quant[source]
        if quant.dtype != "int8":
            raise QuantizationError(f"'{node.target}': input '{source.name}' is {quant.dtype}; expected int8")
        return quant

    def _output_scale(self, module: Requantizing) -> float:
        if module.output_scale_from is not None:
            module = self.modules[module.output_scale_from]
        assert module.output_quantizer is not None
        return module.output_quantizer.scale()

    def _clamp_for(self, activation: Activation, scale: float) -> tuple[int, int]:
        if activation is Activation.RELU:
            return (0, ACTIVATION_QMAX)
        if activation is Activation.RELU6:
            return (0, relu6_ceiling(scale, self.rounding))
        return (ACTIVATION_QMIN, ACTIVATION_QMAX)

    # ---- one converter per canonical op ---------------------------------------------------------------------
    def _quantize(self, node: fx.Node, module: QuantizeInput) -> tuple[nn.Module, TensorQuant]:
        """A QuantStub, or the quantize after an op left in float."""
        scale = self._output_scale(module)
        integer_op = IntLeaveFloat if isinstance(module, LeaveFloat) else IntQuantize
        return integer_op(scale, self.rounding), TensorQuant("int8", (scale,))

    def _dequantize(self, node: fx.Node, module: DequantizeOutput | EnterFloat) -> tuple[nn.Module, None]:
        """A DeQuantStub, or the dequantize before an op left in float."""
        integer_op = IntEnterFloat if isinstance(module, EnterFloat) else IntDequantize
        return integer_op(self.quant[node.args[0]]), None

    def _weighted(self, node: fx.Node, module: ConvAct2d | LinearAct, channel_axis: int) -> dict:
        path = str(node.target)
        input_scale = self._input_quant(node).scale
        weight = module.folded_weight().detach()
        scales = weight_scales(weight, module.scale_rule)
        weight_q = quantize_weight(weight, scales)
        scale_list = [float(s) for s in scales]
        bias_scale = bias_scales(input_scale, scale_list)
        what = f"{type(module).__name__} '{path}'"
        bias_q = quantize_bias(module.folded_bias(), bias_scale, what=what)
        if module.output_dtype == "int32":
            check_accumulator_bound(weight[0].numel(), bias_q, what=what)
            output, multipliers, clamp = TensorQuant("int32", tuple(bias_scale), axis=channel_axis), None, None
        else:
            output_scale = self._output_scale(module)
            output = TensorQuant("int8", (output_scale,))
            bounds = accumulator_bounds(weight_q, bias_q, axis=0)
            if needs_int64_accumulator(bounds):
                _warn_wide_accumulator(what, bounds, bias_q, bias_scale)
            multipliers = conv_multipliers(input_scale, scale_list, output_scale, what=what, bounds=bounds, rounding=self.rounding)
            clamp = self._clamp_for(module.activation, output_scale)
        return dict(
            weight=weight_q,
            bias=bias_q,
            input_scale=input_scale,
            weight_scales=scale_list,
            output=output,
            multipliers=multipliers,
            clamp=clamp,
            rounding=self.rounding,
        )

    @CONVERTERS.register(Op.CONV2D)
    def _conv(self, node: fx.Node, module: ConvAct2d) -> tuple[nn.Module, TensorQuant]:
        parts = self._weighted(node, module, channel_axis=1)
        op = IntConv2d(**parts, stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
        return op, parts["output"]

    @CONVERTERS.register(Op.LINEAR)
    def _linear(self, node: fx.Node, module: LinearAct) -> tuple[nn.Module, TensorQuant]:
        parts = self._weighted(node, module, channel_axis=-1)
        return IntLinear(**parts), parts["output"]

    @CONVERTERS.register(Op.ADD)
    def _add(self, node: fx.Node, module: AddAct) -> tuple[nn.Module, TensorQuant]:
        scales = (self._input_quant(node, 0).scale, self._input_quant(node, 1).scale)
        output_scale = self._output_scale(module)
        multipliers, shift = add_multipliers(
            [real_multiplier(s, output_scale) for s in scales], what=f"add '{node.target}'", rounding=self.rounding
        )
        clamp = self._clamp_for(module.activation, output_scale)
        op = IntAdd(scales, output_scale, (multipliers[0], multipliers[1]), shift, clamp, self.rounding)
        return op, TensorQuant("int8", (output_scale,))

    @CONVERTERS.register(Op.MUL)
    def _mul(self, node: fx.Node, module: Multiply) -> tuple[nn.Module, TensorQuant]:
        scales = (self._input_quant(node, 0).scale, self._input_quant(node, 1).scale)
        output_scale = self._output_scale(module)
        multiplier = product_multiplier(scales, output_scale, what=f"mul '{node.target}'", rounding=self.rounding)
        return IntMul(scales, output_scale, multiplier, self.rounding), TensorQuant("int8", (output_scale,))

    @CONVERTERS.register(Op.MATMUL)
    def _matmul(self, node: fx.Node, module: MatMul) -> tuple[nn.Module, TensorQuant]:
        what = f"matmul '{node.target}'"
        scales = (self._input_quant(node, 0).scale, self._input_quant(node, 1).scale)
        output_scale = self._output_scale(module)
        check_product_accumulator_bound(module.reduction_size, what=what)
        multiplier = product_multiplier(scales, output_scale, what=what, reduction_size=module.reduction_size, rounding=self.rounding)
        return IntMatMul(scales, output_scale, module.reduction_size, multiplier, self.rounding), TensorQuant("int8", (output_scale,))

    @CONVERTERS.register(Op.CONCAT)
    def _concat(self, node: fx.Node, module: Concat) -> tuple[nn.Module, TensorQuant]:
        scales = [self._input_quant(node, i).scale for i in range(len(node.args))]
        output_scale = self._output_scale(module)
        multipliers = [
            quantize_multiplier(real_multiplier(s, output_scale), what=f"cat '{node.target}' input {i}", rounding=self.rounding)
            for i, s in enumerate(scales)
        ]
        return IntConcat(module.dim, scales, output_scale, multipliers, self.rounding), TensorQuant("int8", (output_scale,))

    def _pooling_multiplier(
        self, node: fx.Node, module: Requantizing, count: int
    ) -> tuple[float, float, FixedPointMultiplier]:
        input_scale = self._input_quant(node).scale
        output_scale = self._output_scale(module)
        multiplier = quantize_multiplier(
            real_multiplier(input_scale, output_scale, count=count), what=f"'{node.target}'", rounding=self.rounding
        )
        return input_scale, output_scale, multiplier

    @CONVERTERS.register(Op.AVG_POOL2D)
    def _avg_pool(self, node: fx.Node, module: AvgPool2d) -> tuple[nn.Module, TensorQuant]:
        count = module.kernel_size[0] * module.kernel_size[1]
        input_scale, output_scale, multiplier = self._pooling_multiplier(node, module, count)
        op = IntAvgPool2d(module.kernel_size, module.stride, module.padding, input_scale, output_scale, multiplier, self.rounding)
        return op, TensorQuant("int8", (output_scale,))

    @CONVERTERS.register(Op.GLOBAL_AVG_POOL2D)
    def _global_avg_pool(self, node: fx.Node, module: GlobalAvgPool2d) -> tuple[nn.Module, TensorQuant]:
        count = module.input_size[0] * module.input_size[1]
        input_scale, output_scale, multiplier = self._pooling_multiplier(node, module, count)
        op = IntGlobalAvgPool2d(module.keepdim, module.input_size, input_scale, output_scale, multiplier, self.rounding)
        return op, TensorQuant("int8", (output_scale,))

    @CONVERTERS.register(Op.RELU)
    def _clamp(self, node: fx.Node, module: Clamp) -> tuple[nn.Module, TensorQuant]:
        quant = self._input_quant(node)
        return IntClamp(*clamp_levels(module.bounds, quant.scale, self.rounding)), quant

    @CONVERTERS.register(Op.MAX_POOL2D)
    def _max_pool(self, node: fx.Node, module: MaxPool2d) -> tuple[nn.Module, TensorQuant]:
        quant = self._input_quant(node)
        op = IntMaxPool2d(module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
        return op, quant

    @CONVERTERS.register(*LOOKUP_TABLE_OPS)
    def _lookup_table(self, node: fx.Node, module: LookupTableActivation) -> tuple[nn.Module, TensorQuant]:
        input_scale, output_scale = self._input_quant(node).scale, self._output_scale(module)
        table = lookup_table(module.op, input_scale, output_scale, module.alpha, rounding=self.rounding)
        op = IntLookupTable(module.op, module.alpha, input_scale, output_scale, torch.from_numpy(table), self.rounding)
        return op, TensorQuant("int8", (output_scale,))

    @CONVERTERS.register(Op.UPSAMPLE_BILINEAR2D)
    def _bilinear(self, node: fx.Node, module: UpsampleBilinear2d) -> tuple[nn.Module, TensorQuant]:
        input_scale, output_scale = self._input_quant(node).scale, self._output_scale(module)
        multiplier = bilinear_multiplier(input_scale, output_scale, what=f"'{node.target}'", rounding=self.rounding)
        op = IntUpsampleBilinear2d(module.size, module.align_corners, input_scale, output_scale, multiplier, self.rounding)
        return op, TensorQuant("int8", (output_scale,))

    @CONVERTERS.register(Op.UPSAMPLE_NEAREST2D)
    def _upsample(self, node: fx.Node, module: UpsampleNearest2d) -> tuple[nn.Module, TensorQuant]:
        return IntUpsampleNearest2d(module.scale_factor), self._input_quant(node)
