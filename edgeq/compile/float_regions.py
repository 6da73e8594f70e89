"""A compiled artifact's float regions against the integer model's, each given the same int8 inputs.

A float region (docs/numerics.md "Float fallback": ops left in float between a dequantize and a quantize) is not
bit-exact across implementations: where its float result lies within float32 rounding of a half step, the artifact
and the integer model quantize it one step apart, and the exact integer ops after it carry that step on (a deep
random-init network spreads it far). :func:`float_region_differences` tells a region's own difference from what it
inherits: it compiles the QDQ file with every float region's int8 inputs and output as extra outputs of the artifact
("probes", in as many artifacts as the manifest's output limit needs), runs it, then runs the integer model with
each probed tensor replaced by the artifact's value, so that every region's integer-model output is computed from
the artifact's own inputs, and the model's outputs from the artifact's float regions: where those equal the
artifact's, every difference end to end is the float regions' own, carried by exact integer ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper

from edgeq.compile import compile_model
from edgeq.export.peer import integer_value, intermediate_values, op_units
from edgeq.quantization.integer_model import IntegerModel
from edgeq.quantization.integer_ops import IntLeaveFloat

_PROBE = ".probe"


@dataclass(frozen=True)
class RegionDifference:
    """One float region: its quantized output in the QDQ file, and |artifact - integer model| in steps per value,
    the integer model given the artifact's float regions before it (``steps``: the region's own difference where
    the integer ops are exact, :attr:`FloatRegionComparison.integer_ops`) and the model input (``end_to_end``: what
    the region's output inherits as well)."""

    output: str
    steps: np.ndarray
    end_to_end: np.ndarray


@dataclass(frozen=True)
class FloatRegionComparison:
    """Every float region's :class:`RegionDifference` (in the file's order); |artifact - integer model| in steps on
    every float region's inputs and the model's outputs (by name), the integer model's float regions given as the
    artifact's outputs of them (``integer_ops``: what the integer ops add, 0 where they are exact); and on the model's
    outputs, end to end (``outputs_end_to_end``)."""

    regions: list[RegionDifference]
    integer_ops: dict[str, np.ndarray]
    outputs_end_to_end: dict[str, np.ndarray]


def float_region_differences(
    model_file: str | Path, int_model: IntegerModel, inputs: Sequence[torch.Tensor], target: str, work: str | Path
) -> FloatRegionComparison:
    """The float regions of ``model_file`` (the QDQ file of ``int_model``) compiled for ``target`` into probed
    artifacts in the folder ``work``, run on ``inputs``, against the integer model."""
    from edgeq_runtime.manifest import SCHEMA

    model = onnx.load(str(model_file))
    values = intermediate_values(int_model, *inputs)
    regions = _float_regions(model, int_model, values)
    probes = list(dict.fromkeys(t for output, region_inputs in regions for t in (*region_inputs, output)))
    per_artifact = SCHEMA["properties"]["outputs"]["maxItems"] - len(model.graph.output)
    artifact_values: dict[str, np.ndarray] = {}
    for start in range(0, len(probes), per_artifact):
        folder = Path(work) / f"probes{start // per_artifact}"
        artifact_values.update(_run_probed(model, probes[start : start + per_artifact], values, inputs, target, folder))
    outputs = _quantized_outputs(model)
    given = _integer_model_given(int_model, {t: artifact_values[t] for t, _ in regions}, [*outputs.values(), *probes], inputs)
    region_inputs = [t for t in probes if t not in {output for output, _ in regions}]
    return FloatRegionComparison(
        regions=[
            RegionDifference(t, _steps(artifact_values[t], given[t]), _steps(artifact_values[t], integer_value(values, t))) for t, _ in regions
        ],
        integer_ops={
            **{t: _steps(artifact_values[t], given[t]) for t in region_inputs},
            **{name: _steps(artifact_values[name], given[t]) for name, t in outputs.items()},
        },
        outputs_end_to_end={name: _steps(artifact_values[name], integer_value(values, t)) for name, t in outputs.items()},
    )


def _quantized_outputs(model: onnx.ModelProto) -> dict[str, str]:
    """Each model output's name -> the int8 tensor its DequantizeLinear reads."""
    producer = {out: node for node in model.graph.node for out in node.output}
    return {o.name: producer[o.name].input[0] for o in model.graph.output if producer[o.name].op_type == "DequantizeLinear"}


def _float_regions(model: onnx.ModelProto, int_model: IntegerModel, values: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(output, inputs) of every op unit of ``model`` that ends in a float fallback's quantize."""
    modules = dict(int_model.graph_module.named_modules())
    leaving = {
        f"{node.target}.q"
        for node in int_model.graph_module.graph.nodes
        if node.op == "call_module" and isinstance(modules[node.target], IntLeaveFloat)
    }
    return [(output, inputs) for output, inputs in op_units(model, lambda name: integer_value(values, name) is not None) if output in leaving]


def _run_probed(
    model: onnx.ModelProto, tensors: list[str], values: dict[str, Any], inputs: Sequence[torch.Tensor], target: str, folder: Path
) -> dict[str, np.ndarray]:
    """The artifact's int8 values of ``tensors``, and its raw outputs by name: ``model`` with each of ``tensors`` as
    an extra output, compiled and run."""
    from edgeq_runtime import Model

    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    readers = {node.input[0]: node for node in model.graph.node if node.op_type == "DequantizeLinear"}
    for tensor in tensors:
        probe = f"{tensor}{_PROBE}"
        probed.graph.node.append(helper.make_node("DequantizeLinear", [tensor, *readers[tensor].input[1:]], [probe], name=probe))
        shape = list(integer_value(values, tensor).shape)
        probed.graph.output.append(helper.make_tensor_value_info(probe, TensorProto.FLOAT, shape))
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(probed, str(folder / "probed.onnx"))
    result = compile_model(folder / "probed.onnx", target=target, out=folder / "probed.edgeq", progress=lambda _: None)
    initializers = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    with Model.load(result.artifact) as artifact:
        outputs = artifact.run({name: x.numpy() for name, x in zip(names, inputs)}, raw=True)
    return {**{tensor: outputs[f"{tensor}{_PROBE}"] for tensor in tensors}, **{o.name: outputs[o.name] for o in model.graph.output}}


def _integer_model_given(
    int_model: IntegerModel, replacements: dict[str, np.ndarray], watched: list[str], inputs: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The integer model's value of each tensor of ``watched`` (by QDQ name) when every tensor of ``replacements``
    is replaced by the given values once computed."""
    computed: dict[str, torch.Tensor] = {}
    watched = set(watched)

    class Replacing(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            value = super().run_node(node)
            path = str(node.target) if node.op == "call_module" else node.name
            if isinstance(value, torch.Tensor):
                return replaced(f"{path}.q", value)
            if isinstance(value, tuple):
                return tuple(replaced(f"{path}.{i}.q", v) if isinstance(v, torch.Tensor) else v for i, v in enumerate(value))
            return value

    def replaced(tensor: str, value: torch.Tensor) -> torch.Tensor:
        if tensor in watched:
            computed[tensor] = value
        if tensor not in replacements:
            return value
        return torch.from_numpy(replacements[tensor]).to(value.dtype).reshape(value.shape)

    with torch.no_grad():
        Replacing(int_model.graph_module).run(*inputs)
    return computed


def _steps(artifact: np.ndarray, integer: torch.Tensor) -> np.ndarray:
    return np.abs(artifact.astype(np.int64) - integer.numpy().astype(np.int64).reshape(artifact.shape))
