"""The target's constraints on quantization that ``prepare_qat_fx`` applies (docs/targets.md): a QuantStub's fixed
scale under a power-of-two scale rule, concat inputs sharing the concat's scale, and int32 outputs only where a
DeQuantStub reads them."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from edgeq.errors import QuantizationError
from edgeq.numerics import is_power_of_two
from edgeq.quantization.graph import input_nodes
from edgeq.quantization.qat_modules import Concat, ConvAct2d, DequantizeOutput, LinearAct, QuantizeInput, Requantizing
from edgeq.targets import ScaleRule, Target


def check_fixed_scale(target: Target, path: str, fixed_scale: float | None) -> None:
    """Refuse a QuantStub's fixed scale that the target's scale rule does not allow."""
    rule = target.quantization.scale_rule
    if fixed_scale is not None and rule is ScaleRule.POWER_OF_TWO and not is_power_of_two(fixed_scale):
        raise QuantizationError(
            f"QuantStub '{path}': fixed scale {fixed_scale:.6g} is not a power of two; target "
            f"'{target.name}' accepts power-of-two scales only (e.g. 1/128, 1/64)"
        )


def share_concat_scales(graph: fx.Graph, modules: dict[str, nn.Module], quantized_constants: set[fx.Node]) -> None:
    """Each input of a concat that has a quantizer of its own (an op's output, a constant's quantize) and no
    other reader is quantized at the concat's scale."""
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], Concat):
            continue
        for producer in input_nodes(node):
            module = modules.get(producer.target) if producer.op == "call_module" else None
            if (
                isinstance(module, Requantizing)
                and (not isinstance(module, QuantizeInput) or producer in quantized_constants)
                and module.output_quantizer is not None
                and len(producer.users) == 1
            ):
                module.share_output_scale_with(str(node.target))


def check_int32_outputs(graph: fx.Graph, modules: dict[str, nn.Module]) -> None:
    """Refuse an int32 output (conv or linear) that anything but a DeQuantStub reads."""
    for node in graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, (ConvAct2d, LinearAct)) and module.output_dtype == "int32":
            consumers = [modules.get(user.target) for user in node.users if user.op == "call_module"]
            if len(consumers) != len(node.users) or not all(isinstance(c, DequantizeOutput) for c in consumers):
                raise QuantizationError(
                    f"{type(module).__name__} '{node.target}': an int32 output must go straight to a DeQuantStub; "
                    "it feeds other ops. Use the int32 qconfig on the model's final layer only"
                )
