"""The NPU program: what a real NPU driver would be given for each NPU region, as data.

Per region: the fused ops in order with their shapes, quantization parameters and requantization constants
(multipliers and shifts from :mod:`edgeq.numerics`), and a memory plan: where each activation tensor lives in an
on-chip arena while it is live, and whether weights and arena fit the SRAM. Here NPU regions execute as a
bit-exact simulation compiled for the host; this program is what the perf estimator and visualizer read, and what
a driver for real silicon would consume.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from edgeq.check.records import OpRecord, QuantFacts
from edgeq.check.report import CheckReport, Placement
from edgeq.compile.partition import Partition, Region, TensorSpec
from edgeq.ops import LOOKUP_TABLE_OPS, OP_NAMES, Op, OpTable
from edgeq.numerics import conv_multipliers, lookup_table, product_multiplier, quantize_multiplier, quantize_multipliers, real_multiplier
from edgeq.targets import Target


def _plain(value: Any) -> Any:
    """JSON-ready: tuples become lists, recursively."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


Requantization = Callable[[OpRecord, QuantFacts, str], dict[str, Any]]

REQUANTIZATION: OpTable[Requantization] = OpTable("requantization in npu_program.py", lambda info: info.requantizes)
"""The integer constants of each op whose output scale differs from its input's, as the NPU program lists them."""


def requantization(record: OpRecord) -> dict[str, Any] | None:
    """The integer constants an op's requantization uses (None when it keeps its input's scale)."""
    quant = record.quant
    if quant is None or quant.output_scale is None or record.op not in OP_NAMES:
        return None
    constants = REQUANTIZATION.get(Op(record.op))
    return constants(record, quant, f"'{record.name}'") if constants is not None else None


@REQUANTIZATION.register(Op.CONV2D, Op.LINEAR)
def _per_channel(record: OpRecord, quant: QuantFacts, what: str) -> dict[str, Any]:
    bounds = quant.accumulator_bounds or None
    multipliers = conv_multipliers(quant.input_scales[0], quant.weight_scales, quant.output_scale, what=what, bounds=bounds)
    return {"per_channel": [{"multiplier": m.multiplier, "shift": m.shift} for m in multipliers]}


@REQUANTIZATION.register(Op.ADD)
def _sum(record: OpRecord, quant: QuantFacts, what: str) -> dict[str, Any]:
    reals = [real_multiplier(s, quant.output_scale) for s in quant.input_scales]
    multipliers, shift = quantize_multipliers(reals, what=what)
    return {"multipliers": multipliers, "shift": shift}


@REQUANTIZATION.register(Op.MUL)
def _product(record: OpRecord, quant: QuantFacts, what: str) -> dict[str, Any]:
    fixed = product_multiplier(quant.input_scales, quant.output_scale, what=what)
    return {"multiplier": fixed.multiplier, "shift": fixed.shift}


@REQUANTIZATION.register(Op.CONCAT)
def _per_input(record: OpRecord, quant: QuantFacts, what: str) -> dict[str, Any]:
    return {"inputs": [_multiplier(real_multiplier(s, quant.output_scale), what) for s in quant.input_scales]}


@REQUANTIZATION.register(Op.AVG_POOL2D, Op.GLOBAL_AVG_POOL2D)
def _average(record: OpRecord, quant: QuantFacts, what: str) -> dict[str, Any]:
    count = math.prod(record.attrs["kernel"]) if record.op == "avg_pool2d" else math.prod(record.input_shapes[0][2:])
    return {"count": count, **_multiplier(real_multiplier(quant.input_scales[0], quant.output_scale, count=count), what)}


@REQUANTIZATION.register(*LOOKUP_TABLE_OPS)
def _table(record: OpRecord, quant: QuantFacts, what: str) -> dict[str, Any]:
    table = lookup_table(Op(record.op), quant.input_scales[0], quant.output_scale, record.attrs.get("alpha", 0.0))
    return {"table": table.tolist()}


def _weighted(record: OpRecord) -> bool:
    return record.op in OP_NAMES and Op(record.op).info.weighted


def quant_scales(quant: QuantFacts) -> dict[str, Any]:
    """The scales around an op, as JSON."""
    return {
        "input_scales": list(quant.input_scales),
        "output_scale": quant.output_scale,
        "weight_scales": list(quant.weight_scales),
    }


def _multiplier(real: float, what: str) -> dict[str, int]:
    fixed = quantize_multiplier(real, what=what)
    return {"multiplier": fixed.multiplier, "shift": fixed.shift}


def _op_entry(record: OpRecord) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": record.name,
        "op": record.op,
        "source_op": record.source_op,
        "attrs": _plain(record.attrs),
        "input_shapes": _plain(record.input_shapes),
        "output_shape": _plain(record.output_shape),
        "macs": record.macs,
    }
    if record.quant is not None:
        entry["quant"] = quant_scales(record.quant)
        entry["requantization"] = requantization(record)
    return entry


def _tensor_bytes(record: OpRecord) -> int:
    int32_output = _weighted(record) and record.quant is not None and record.quant.output_scale is None
    return math.prod(record.output_shape or ()) * (4 if int32_output else 1)


def memory_plan(region: Region, records: list[OpRecord], target: Target) -> dict[str, Any]:
    """First-fit placement of each op's output in an activation arena, over the ops' order of execution.

    A tensor is live from the op that makes it to the last op of the region that reads it (to the end of the
    region when a later region reads it). Weights and int32 biases are counted apart.
    """
    index = {r.name: i for i, r in enumerate(records)}
    escaping = set(region.output_producers.values())
    last_use = {r.name: len(records) - 1 if r.name in escaping else i for i, r in enumerate(records)}
    for i, record in enumerate(records):
        for source in record.inputs:
            if source in last_use:
                last_use[source] = max(last_use[source], i)
    placed: list[dict[str, Any]] = []
    for record in records:
        size = _tensor_bytes(record)
        start, end = index[record.name], last_use[record.name]
        live = sorted((p for p in placed if p["first_op"] <= end and start <= p["last_op"]), key=lambda p: p["offset"])
        offset = 0
        for other in live:
            if offset + size <= other["offset"]:
                break
            offset = max(offset, other["offset"] + other["bytes"])
        placed.append({"tensor": record.name, "bytes": size, "offset": offset, "first_op": start, "last_op": end})
    arena = max((p["offset"] + p["bytes"] for p in placed), default=0)
    weights = sum(r.attrs.get("weight_bytes", 0) + 4 * r.attrs.get("out_channels", 0) for r in records if _weighted(r))
    sram = target.hardware.sram_bytes
    return {
        "activation_arena_bytes": arena,
        "weight_bytes": weights,
        "sram_bytes": sram,
        "arena_fits_sram": arena <= sram,
        "weights_fit_sram": arena + weights <= sram,
        "tensors": placed,
    }


def _tensor(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}


def npu_program(partition: Partition, report: CheckReport) -> dict[str, Any]:
    """The program of every NPU region (see the module docstring)."""
    target = report.target
    records = {n.record.name: n.record for n in report.nodes}
    regions = []
    for region in partition.regions:
        if region.placement is not Placement.NPU:
            continue
        region_records = [records[name] for name in region.nodes]
        regions.append(
            {
                "region": region.name,
                "inputs": region.inputs,
                "outputs": region.outputs,
                "ops": [_op_entry(r) for r in region_records],
                "memory_plan": memory_plan(region, region_records, target),
            }
        )
    return {
        "target": target.name,
        "execution": "simulated on the host CPU, bit-exact to docs/numerics.md",
        "hardware": target.hardware.model_dump() if target.hardware else None,
        "inputs": [_tensor(s) for s in partition.inputs],
        "outputs": [_tensor(s) for s in partition.outputs],
        "regions": regions,
    }
