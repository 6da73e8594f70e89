"""The compiled graph as data (``graph.json``): every op with its placement, region, shapes and quantization, and
the data edges between ops. The visualizer draws it; the perf estimator and the HTML report read it."""

from __future__ import annotations

from typing import Any

from edgeq.check.records import INPUT_PREFIX
from edgeq.check.report import CheckReport
from edgeq.compile.npu_program import quant_scales, requantization
from edgeq.compile.partition import Partition


def compiled_graph(partition: Partition, report: CheckReport) -> dict[str, Any]:
    """Nodes (ops and model inputs), edges, and the regions that group the ops."""
    region_of = {name: region.name for region in partition.regions for name in region.nodes}
    nodes: list[dict[str, Any]] = [
        {"name": INPUT_PREFIX + spec.source, "op": "input", "shape": list(spec.shape), "dtype": spec.dtype}
        for spec in partition.inputs
    ]
    edges = []
    for node in report.nodes:
        record = node.record
        entry: dict[str, Any] = {
            "name": record.name,
            "op": record.op,
            "source_op": record.source_op,
            "placement": node.placement.value,
            "region": region_of[record.name],
            "output_shape": list(record.output_shape) if record.output_shape else None,
            "macs": record.macs,
            "reasons": [r.message for r in node.reasons],
        }
        if record.quant is not None:
            entry["quant"] = {**quant_scales(record.quant), "requantization": requantization(record)}
        nodes.append(entry)
        edges += [{"from": source, "to": record.name} for source in record.inputs]
    regions = [
        {"name": r.name, "placement": r.placement.value, "ops": r.nodes, "inputs": r.inputs, "outputs": r.outputs}
        for r in partition.regions
    ]
    return {"target": report.target.name, "nodes": nodes, "edges": edges, "regions": regions}
