"""The performance estimator: how fast a compiled model runs on its target, layer by layer, without a board.

``perf_model`` compiles the model if needed, costs every op of its compiled graph and every NPU<->CPU transition
(:mod:`.estimate`, formulas in docs/perf.md), and writes ``report.json``. CPU layers use figures measured on this
machine when the CPU is this machine's kind (:mod:`.calibrate`), the target's nominal ones otherwise.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from edgeq.compile.compiled_graph import CompiledGraph
from edgeq.compile.graph_source import compiled_graph_of, is_artifact
from edgeq.errors import EdgeqError
from edgeq.export.sources import ModelLike
from edgeq.fileio import make_folder
from edgeq.perf.calibrate import Calibration, calibrate, host_figures
from edgeq.perf.estimate import estimate
from edgeq.perf.result import LayerEstimate, PerfResult, PerfSummary, TransitionEstimate
from edgeq.perf.vela_compare import artifact_vela_regions, compare
from edgeq.quantization.integer_model import IntegerModel
from edgeq.targets import Target, TargetLike, host_cpu, load_target

__all__ = [
    "Calibration",
    "LayerEstimate",
    "PerfResult",
    "PerfSummary",
    "TransitionEstimate",
    "calibrate",
    "estimate_graph",
    "perf_model",
]

REPORT_JSON = "report.json"


def estimate_graph(graph: CompiledGraph, target: Target | None = None, source: str = "", recalibrate: bool = False) -> PerfResult:
    """Estimate a compiled graph on its target (or ``target``, which must be the one it was compiled for).

    Raises:
        EdgeqError: ``target`` is not the graph's.
    """
    if target is not None and target.name != graph.target.name:
        raise EdgeqError(f"{source or 'the graph'} was compiled for {graph.target.name}, not {target.name}; compile it for {target.name}")
    resolved = target or load_target(graph.target.name)
    if resolved.firmware_host is not None:  # every op on the NPU: no CPU figures
        return estimate(graph, resolved, None, f"none (the {resolved.firmware_host} runs your firmware)", source)
    figures, cpu_source = host_figures(host_cpu(resolved), recalibrate)
    return estimate(graph, resolved, figures, cpu_source, source)


def with_vela(result: PerfResult, artifact: ModelLike | CompiledGraph, compiled_here: bool) -> PerfResult:
    """``result`` with Vela's estimate of its NPU regions beside edgeq's, on a target Vela compiles for: the one the
    artifact stores (``compiled_here``: the artifact compiled for this estimate, whose compile ran Vela on each NPU
    region's TOSA graph). Where it comes from is ``figures["vela_source"]``."""
    target = load_target(result.graph.target.name)
    if target.vela is None or not any(region.placement == "NPU" for region in result.graph.regions):
        return result
    regions = artifact_vela_regions(artifact) if is_artifact(artifact) else None
    if compiled_here:
        source = "Vela run on each NPU region's TOSA graph for this estimate"
    elif regions is not None:
        source = "stored in the artifact by edgeq compile"
    else:
        source = "none: the artifact stores no Vela estimate (compile the model again to store it)"
    figures = {**result.figures, "vela_source": source}
    return dataclasses.replace(result, figures=figures, vela=compare(result, regions) if regions is not None else None)


def _compiled(model: ModelLike | CompiledGraph, example_inputs: Sequence[torch.Tensor] | None, target: Target | None, folder: Path) -> Path | None:
    """``model`` compiled into ``folder`` for this estimate (built for this machine: its graph and Vela's regions are
    the same for every build machine); None for an artifact or a compiled graph, which are estimated as they are."""
    if isinstance(model, CompiledGraph) or is_artifact(model):
        return None
    from edgeq.compile import compile_model

    out = folder / "model.edgeq"
    return compile_model(model, example_inputs, target=target, out=out, simulate=True, progress=lambda _: None).artifact


def perf_model(
    model: ModelLike,
    example_inputs: Sequence[torch.Tensor] | None = None,
    out_dir: str | Path = "perf",
    target: TargetLike | None = None,
    layer_details: bool = True,
    recalibrate: bool = False,
    float_model: nn.Module | None = None,
    int_model: IntegerModel | None = None,
) -> PerfResult:
    """Estimate the latency of ``model`` on ``target``, layer by layer, and write ``out_dir/report.json`` and
    ``out_dir/report.html``.

    Args:
        model: a ``.edgeq`` artifact, or anything ``compile_model`` takes (a QDQ ONNX or edgeq TorchScript file,
            the integer model, a calibrated prepared model), which is compiled for this estimate.
        example_inputs: inputs of the right shape, for PyTorch models.
        out_dir: folder of ``report.json`` (created if needed).
        target: target name, file or :class:`~edgeq.targets.Target` (default: the artifact's, or the model's).
        layer_details: include the per-layer estimates in ``report.json``.
        recalibrate: measure this machine's CPU figures again instead of using the cached ones.
        float_model: the float model; with ``example_inputs`` (real samples: the statistics are over the batch),
            the report compares every layer's integer output with the float model's (docs/perf.md, "Per-layer
            accuracy").
        int_model: the integer model to compare, when ``model`` is not the integer model itself (an artifact).

    Returns:
        The estimate; ``result.to_dict()`` is ``report.json`` (docs/perf.md).

    Raises:
        CompiledGraphError: an artifact that cannot be read.
        TargetError: an unknown target.
        EdgeqError: an artifact compiled for another target than ``target``; compile errors for other models;
            ``float_model`` without ``example_inputs`` or without an integer model.
    """
    if float_model is not None:
        int_model = model if isinstance(model, IntegerModel) else int_model
        if int_model is None or example_inputs is None:
            raise EdgeqError("per-layer accuracy needs the integer model (as model or int_model) and example_inputs besides float_model")
    resolved = load_target(target) if target is not None else None
    with tempfile.TemporaryDirectory() as folder:
        compiled = _compiled(model, example_inputs, resolved, Path(folder))
        graph = compiled_graph_of(compiled or model, None, resolved)
        result = estimate_graph(graph, resolved, str(model) if isinstance(model, (str, Path)) else type(model).__name__, recalibrate)
        result = with_vela(result, compiled or model, compiled is not None)
    out = make_folder(out_dir)
    from edgeq.report import layer_accuracy, write_report  # the report renders PerfResult: imported on use

    accuracy = layer_accuracy(float_model, int_model, example_inputs, graph) if float_model is not None else None
    html = write_report(result, out, accuracy)
    return dataclasses.replace(result, report_json=result.write_json(out / REPORT_JSON, layer_details), report_html=html, accuracy=accuracy)
