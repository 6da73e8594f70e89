"""The terminal view of an estimate (``edgeq perf``): each region, with Vela's estimate of an NPU region beside
edgeq's layer by layer (op groups as Vela runs them), and the NPU<->CPU transitions. The same
:class:`~edgeq.perf.result.PerfResult` as ``report.json`` and the HTML report."""

from __future__ import annotations

from edgeq.perf.result import PerfResult
from edgeq.perf.vela_compare import VelaRegion

KIB = 1024


def _memory(region: VelaRegion) -> str:
    summary = region.summary
    used = [("SRAM", summary.sram_bytes), ("DRAM", summary.dram_bytes), ("on-chip flash", summary.on_chip_flash_bytes),
            ("off-chip flash", summary.off_chip_flash_bytes)]  # fmt: skip
    return ", ".join(f"{name} {size / KIB:.1f} KiB" for name, size in used if size)


def perf_region_lines(result: PerfResult) -> list[str]:
    """One line per region (edgeq's time; Vela's time, cycles and memory used for an NPU region it compiled), one
    per op group of such a region, one per transition, and how far edgeq's NPU estimate is from Vela's."""
    vela = {region.region: region for region in result.vela.regions} if result.vela is not None else {}
    groups = result.vela.groups if result.vela is not None else ()
    lines = []
    for region in result.graph.regions:
        edgeq_ms = sum(layer.latency_ms for layer in result.layers if layer.op.region == region.name)
        line = f"{region.name} ({region.placement}, {len(region.ops)} ops): edgeq {edgeq_ms:.3f} ms"
        compiled = vela.get(region.name)
        if compiled is not None:
            summary = compiled.summary
            line += (
                f"; Vela {summary.inference_time_s * 1e3:.3f} ms ({summary.total_cycles:,} cycles at {summary.clock_hz / 1e6:g} MHz), "
                f"{_memory(compiled)}"
            )
        lines.append(line)
        for group in (g for g in groups if set(g.ops) <= set(region.ops)):
            cycles = group.vela
            lines.append(
                f"  {' + '.join(group.ops)}: edgeq {group.estimated_ms:.4f} ms, Vela {cycles.time_ms:.4f} ms ({cycles.cycles:,} cycles; "
                f"access cycles SRAM {cycles.sram_access_cycles:,}, DRAM {cycles.dram_access_cycles:,}, flash {cycles.flash_access_cycles:,})"
            )
    for t in result.transitions:
        lines.append(f"transition {t.from_region} -> {t.to_region}: {t.bytes:,} bytes, {t.latency_ms:.3f} ms")
    if result.vela is not None:
        v = result.vela
        lines.append(
            f"NPU: edgeq {v.estimated_ms:.3f} ms, Vela {v.vela_ms:.3f} ms (Vela's compiler model, not silicon): "
            f"edgeq {100 * v.error:+.1f} %, Spearman {v.spearman:.2f} over {len(v.groups)} op groups"
        )
    if "vela_source" in result.figures:
        lines.append(f"Vela's estimate: {result.figures['vela_source']}")
    return lines
