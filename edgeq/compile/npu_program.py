"""The NPU program: what a real NPU driver would be given for each NPU region, as data, derived from the
:class:`~edgeq.compile.compiled_graph.CompiledGraph`.

Per region: the fused ops in order (as in ``graph.json``: attributes, tensors, requantization multipliers and
shifts from :mod:`edgeq.numerics`), and a memory plan: where each activation tensor lives in an on-chip arena while
it is live, and whether weights and arena fit the SRAM. Here NPU regions execute as a bit-exact simulation
compiled for the host; this program is what a driver for real silicon would consume.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from edgeq.check.report import Placement
from edgeq.compile.compiled_graph import CompiledGraph, GraphOp, Region
from edgeq.targets import Target


def memory_plan(region: Region, graph: CompiledGraph, target: Target) -> dict[str, Any]:
    """First-fit placement of each op's outputs in an activation arena, over the ops' order of execution.

    A tensor is live from the op that makes it to the last op of the region that reads it (to the end of the
    region when a later region or the program reads it). Weights and biases are counted apart.
    """
    ops = [graph.op(name) for name in region.ops]
    index = {op.name: i for i, op in enumerate(ops)}
    placed: list[dict[str, Any]] = []
    for i, op in enumerate(ops):
        for name in op.outputs:
            tensor = graph.tensors[name]
            readers = [index[c] for c in tensor.consumers if c in index]
            end = len(ops) - 1 if name in region.outputs else max(readers, default=i)
            live = sorted((p for p in placed if p["first_op"] <= end and i <= p["last_op"]), key=lambda p: p["offset"])
            offset = 0
            for other in live:
                if offset + tensor.bytes <= other["offset"]:
                    break
                offset = max(offset, other["offset"] + other["bytes"])
            placed.append({"tensor": name, "bytes": tensor.bytes, "offset": offset, "first_op": i, "last_op": end})
    arena = max((p["offset"] + p["bytes"] for p in placed), default=0)
    weights = sum(op.weight_bytes for op in ops)
    sram = target.hardware.sram_bytes
    return {
        "activation_arena_bytes": arena,
        "weight_bytes": weights,
        "sram_bytes": sram,
        "arena_fits_sram": arena <= sram,
        "weights_fit_sram": arena + weights <= sram,
        "tensors": placed,
    }


def _op_entry(op: GraphOp, graph: CompiledGraph) -> dict[str, Any]:
    entry = {**asdict(op), "attributes": op.attributes.to_json()}
    entry["input_shapes"] = [graph.tensors[t].shape for t in op.inputs]
    entry["output_shapes"] = [graph.tensors[t].shape for t in op.outputs]
    return entry


def npu_program(graph: CompiledGraph, target: Target) -> dict[str, Any]:
    """The program of every NPU region of ``graph`` (see the module docstring)."""
    regions = [
        {
            "region": region.name,
            "inputs": region.inputs,
            "outputs": region.outputs,
            "ops": [_op_entry(graph.op(name), graph) for name in region.ops],
            "memory_plan": memory_plan(region, graph, target),
        }
        for region in graph.regions
        if region.placement == Placement.NPU.value
    ]
    return {
        "target": target.name,
        "execution": "simulated on the host CPU, bit-exact to docs/numerics.md",
        "hardware": target.hardware.model_dump() if target.hardware else None,
        "inputs": [asdict(graph.tensors[t]) for t in graph.inputs],
        "outputs": [asdict(graph.tensors[t]) for t in graph.outputs],
        "regions": regions,
    }
