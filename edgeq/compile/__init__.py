"""compile_model: a quantized model becomes one deployable ``.edgeq`` artifact.

The steps, one module each: read the model as QDQ (:mod:`edgeq.export.sources`), place its ops with the target's
rules (:mod:`edgeq.check`), cut it into NPU and CPU regions (:mod:`.partition`), import each region with TVM's
ONNX frontend and lower it to integers (:mod:`.lower_integer`), build one library (:mod:`.codegen`), and write the
artifact with the compiled graph, the kernel each op landed in and the NPU program derived from it
(:mod:`.artifact`, :mod:`.compiled_graph`, :mod:`.kernel_map`, :mod:`.npu_program`).

NPU hardware does not exist here: NPU regions are compiled for the host CPU as a bit-exact simulation of the
NPU, and the artifact records the NPU program a driver for real silicon would take. For an Arm Ethos-U target,
Vela also compiles each NPU region (as TOSA) into the command stream the NPU runs (:mod:`.vela_regions`).
"""

from __future__ import annotations

import logging
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
import tvm
from tvm import relax
from tvm.target.codegen import llvm_get_system_cpu

from edgeq import __version__
from edgeq.check import CheckReport, check_qdq
from edgeq.compile.artifact import CHECK, GRAPH, LIBRARY, NPU_PROGRAM, json_bytes, write_artifact
from edgeq.compile.codegen import Machine, build_library, build_relax_module, input_quantizer
from edgeq.compile.compiled_graph import CompiledGraph, build_compiled_graph
from edgeq.compile.cpu_features import DotProduct, library_features
from edgeq.compile.kernel_map import kernel_map
from edgeq.compile.npu_program import npu_program
from edgeq.compile.partition import Partition, TensorSpec, partition
from edgeq.compile.pipeline import OPT_LEVELS, check_opt_level
from edgeq.compile.provenance import Provenance
from edgeq.compile.schedules import TUNABLE, KernelSchedule
from edgeq.compile.tuning_records import TuningRecords, has_records, records_folder
from edgeq.compile.vela_regions import RegionCommandStream, command_stream_manifest, command_stream_members, compile_vela_regions
from edgeq.compile.vela_regions import summary_lines as command_stream_lines
from edgeq.errors import CompileError
from edgeq.export.onnx_reader import QDQModel, read_qdq
from edgeq.export.sources import ModelLike, quantized_form
from edgeq.fileio import refuse_input_as_output
from edgeq.targets import Target, TargetKind, TargetLike, host_cpu, load_target, resolve_target
from edgeq_runtime.names import safe_file_names

__all__ = ["BuildPlan", "CompileError", "CompileResult", "compile_model", "kernels_dot_product", "plan_build"]

logger = logging.getLogger(__name__)

SIMULATION_NOTE = "NPU execution is simulated: NPU regions run on the host CPU, bit-exact to the NPU's integer arithmetic"


@dataclass
class CompileResult:
    """What ``compile_model`` made: the artifact, and everything that stays inspectable after compile.

    Attributes:
        artifact: path of the ``.edgeq`` file.
        target: the target compiled for.
        arch: the architecture of the library (``x86_64`` or ``aarch64``).
        report: the check report the placement came from.
        partition: the program's inputs, outputs and regions.
        module: the Relax module after integer lowering, before the build pipeline.
        graph: the compiled graph (``graph.json``): ops, tensors, regions and kernels.
        manifest: the artifact's manifest (without the member checksums).
        kernels: the schedule of every scheduled kernel of the library (empty at ``-O0``), tuned or default;
            :func:`edgeq.compile.codegen.scheduled_module` gives the fused module these names refer to.
        tuning_records: the folder of tuning records the tuned schedules came from (None: none used).
        seconds: time of each step.
    """

    artifact: Path
    target: Target
    arch: str
    report: CheckReport
    partition: Partition
    module: relax.IRModule
    graph: CompiledGraph
    manifest: dict[str, Any]
    kernels: list[KernelSchedule] = field(default_factory=list)
    tuning_records: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    command_streams: list[RegionCommandStream] = field(default_factory=list)
    """An Ethos-U target's NPU regions compiled by Vela (:mod:`.vela_regions`); empty for other targets."""

    def summary_lines(self) -> list[str]:
        """Placement, size and time, for the end of ``edgeq compile``."""
        summary = self.report.summary
        regions = self.partition.regions
        npu = sum(r.placement.value == "NPU" for r in regions)
        lines = [f"placement: {summary.verdict}"]
        if self.target.kind is TargetKind.NPU:
            lines.append(
                f"  {summary.ops_on_npu}/{summary.ops} ops and {summary.npu_mac_share:.1%} of MACs on the NPU, "
                f"{npu} NPU region(s), {len(regions) - npu} CPU region(s)"
            )
            lines.append(f"  {SIMULATION_NOTE}" + ("" if self.arch == "aarch64" else f" ({self.arch} build)"))
            lines += command_stream_lines(self.command_streams, self.target)
        size = self.artifact.stat().st_size
        lines.append(f"artifact: {self.artifact} ({size / 2**20:.1f} MiB, {self.arch} library)")
        if self.kernels:
            lines.append(self._schedules_line())
        lines.append(f"compile time: {sum(self.seconds.values()):.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()) + ")")
        return lines

    def _schedules_line(self) -> str:
        tunable = [k for k in self.kernels if k.schedule in TUNABLE]
        tuned = sum(k.tuned for k in tunable)
        line = f"schedules: {len(self.kernels)} kernels, {tuned} of the {len(tunable)} tunable ones from tuning records"
        if self.tuning_records is None:
            return line + " (none for this target and CPU; `edgeq tune` measures them)"
        return line + f" ({self.tuning_records}), the rest default"


_THIS_MACHINE = {"x86_64": "x86_64-native", "aarch64": "aarch64"}
"""The CPU target a simulated build is for, by this machine's architecture: its own CPU (the aarch64 target builds
for the compiling CPU when it is one)."""


def _machine(target: Target, simulate: bool) -> Machine:
    """The CPU the library runs on: the target's own, its NPU's host, or this machine's CPU when simulating or when
    the NPU's host is a firmware host edgeq builds no code for (the library is then the simulation only)."""
    here = {"arm64": "aarch64"}.get(platform.machine(), platform.machine())
    if simulate or target.firmware_host is not None:
        if here not in _THIS_MACHINE:
            raise CompileError(f"simulation needs an x86_64 or aarch64 build machine; this one is {platform.machine()}")
        cpu = load_target(_THIS_MACHINE[here])
    else:
        cpu = host_cpu(target)
    arch = cpu.llvm.arch
    native = arch == here
    llvm = {"kind": "llvm", "mtriple": cpu.llvm.mtriple}
    mcpu = cpu.llvm.mcpu or (llvm_get_system_cpu() if native else None)
    if mcpu:
        llvm["mcpu"] = mcpu
    if cpu.llvm.mattr:
        llvm["mattr"] = list(cpu.llvm.mattr)
    return Machine(arch, llvm, None if native else f"{arch}-linux-gnu-g++")


def kernels_dot_product(target: Target) -> DotProduct:
    """The int8 dot product the CPU kernels of a build for ``target`` use (its host CPU's, for an NPU target; not
    simulated)."""
    return _machine(target, simulate=False).dot_product()


def _with_input_shapes(qdq: QDQModel, shapes: dict[str, Sequence[int]]) -> QDQModel:
    model = onnx.ModelProto()
    model.CopyFrom(qdq.model)
    names = [i.name for i in model.graph.input]
    for name, shape in shapes.items():
        if name not in names:
            raise CompileError(f"--input-shape: the model has no input '{name}' (inputs: {', '.join(names)})")
        info = next(i for i in model.graph.input if i.name == name)
        dims = info.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise CompileError(f"--input-shape {name}: {len(shape)} dimensions given; the input has {len(dims)}")
        for dim, size in zip(dims, shape):
            dim.Clear()
            dim.dim_value = int(size)
    return read_qdq(model, qdq.source)


def _tensor_entry(spec: TensorSpec, file: str) -> dict[str, Any]:
    """A tensor's manifest entry; ``file``: the safe file name it is read from or written to."""
    entry: dict[str, Any] = {"name": spec.source, "file": file, "shape": list(spec.shape), "dtype": spec.dtype, "quant": None}
    if spec.quant is not None:
        entry["quant"] = {
            "scale": list(spec.quant.scales),
            "zero_point": list(spec.quant.zero_points),
            "axis": spec.quant.axis,
        }
    return entry


def _tensor_entries(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    """The manifest entries of the program's inputs or outputs, each with a distinct safe file name."""
    files = safe_file_names(spec.source for spec in specs)
    return [_tensor_entry(spec, file) for spec, file in zip(specs, files)]


def _input_entries(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    """The inputs' manifest entries; a quantized one names the library function quantizing float values for it."""
    entries = _tensor_entries(specs)
    for index, (spec, entry) in enumerate(zip(specs, entries)):
        if spec.quant is not None:
            entry["quantizer"] = input_quantizer(index)
    return entries


@dataclass(frozen=True)
class BuildPlan:
    """What a build starts from: the model read and placed, cut into regions and lowered to integers.

    Attributes:
        qdq: the model as QDQ; source: what it was read from (for messages and the manifest).
        target: the target compiled for; machine: the CPU the library is built for.
        report: the check report the placement comes from; partition: its regions.
        module: the Relax module after integer lowering; provenance: the graph op each of its region's bindings
            computes (part of).
    """

    qdq: QDQModel
    source: str
    target: Target
    machine: Machine
    report: CheckReport
    partition: Partition
    module: relax.IRModule
    provenance: Provenance


def plan_build(
    model: ModelLike,
    example_inputs: Sequence[torch.Tensor] | None,
    target: TargetLike | None,
    simulate: bool,
    input_shapes: dict[str, Sequence[int]] | None,
    report_progress: Callable[[str], None],
    step: Callable[[str], None] = lambda name: None,
) -> BuildPlan:
    """Read, place, partition and lower ``model`` (the arguments as :func:`compile_model` takes them);
    ``step`` is called with the name of each step done."""
    report_progress("import: reading the model")
    quantized = quantized_form(model, example_inputs)
    if quantized is None:
        raise CompileError(
            f"{type(model).__name__} is not quantized yet: prepare, calibrate (or train) and convert it, or pass the "
            "prepared model after calibration"
        )
    qdq, source = quantized
    if input_shapes:
        qdq = _with_input_shapes(qdq, input_shapes)
    resolved = resolve_target(target, qdq.target, str(qdq.source))
    check_rounding(qdq, resolved)
    step("import")

    report_progress(f"partition: placing {source} on {resolved.name}")
    report = check_qdq(qdq, resolved)
    parts = partition(qdq, report)  # refuses an unsupported op before any other work
    machine = _machine(resolved, simulate)
    step("partition")

    module, provenance = build_relax_module(parts, report_progress, resolved.quantization.rounding)
    step("lowering")
    return BuildPlan(qdq, source, resolved, machine, report, parts, module, provenance)


def check_rounding(qdq: QDQModel, target: Target) -> None:
    """Refuse a model whose integers round ties by another rule than the target's (docs/export.md).

    Raises:
        CompileError: one line naming the file, both rules and what to do.
    """
    rule = target.quantization.rounding
    if qdq.rounding is not rule:
        raise CompileError(
            f"{qdq.source}: its integers round {qdq.rounding.value} (ONNX metadata 'edgeq.rounding'), but target "
            f"{target.name} rounds {rule.value}; quantize the model for {target.name} (prepare_qat_fx(..., "
            f"target='{target.name}')), convert and export it again"
        )


def _tuning_records(plan: BuildPlan, folder: str | Path | None, tuned: bool) -> TuningRecords | None:
    """The tuning records a build uses: ``folder``'s, else the default folder's for the target and CPU if it has
    records; None when ``tuned`` is False."""
    if not tuned:
        return None
    llvm_target = tvm.target.Target(plan.machine.llvm)
    if folder is not None:
        return TuningRecords(Path(folder), llvm_target)
    default = records_folder(plan.target.name, plan.machine.llvm)
    return TuningRecords(default, llvm_target) if has_records(default) else None


def compile_model(
    model: ModelLike,
    example_inputs: Sequence[torch.Tensor] | None = None,
    target: TargetLike | None = None,
    out: str | Path | None = None,
    opt_level: int = 2,
    simulate: bool = False,
    input_shapes: dict[str, Sequence[int]] | None = None,
    progress: Callable[[str], None] | None = None,
    tuning_records: str | Path | None = None,
    tuned: bool = True,
) -> CompileResult:
    """Compile a quantized model for ``target`` into one ``.edgeq`` artifact.

    Args:
        model: path of a QDQ ONNX or edgeq TorchScript file, an edgeq TorchScript module, the integer model, or a
            calibrated / trained prepared model.
        example_inputs: inputs of the right shape, for PyTorch models.
        target: target name, file or :class:`~edgeq.targets.Target` (default: the one the model was quantized for).
        out: artifact path (default: the model file's name with ``.edgeq``, or ``model.edgeq``).
        opt_level: 0, 1 or 2 (default; see :mod:`edgeq.compile.codegen`); the numbers are the same at every level.
        simulate: build for this machine instead of the target's CPU (NPU targets run on an aarch64 host).
        input_shapes: static shapes for ONNX inputs with dynamic dimensions, by input name.
        progress: called with a line before each long step (default: logging at INFO level).
        tuning_records: folder of tuning records (``edgeq tune -o``); default: the target's and CPU's folder in
            edgeq's cache (:func:`edgeq.compile.tuning_records.records_folder`) when ``edgeq tune`` filled it.
        tuned: False builds with the default schedules only, whatever records exist. Records are used at
            ``-O2`` only (they are measured with parallel tiles; ``-O1`` keeps one core).

    Raises:
        CompileError: unsupported ops (named), an NPU region Vela refuses (region, op and Vela's reason), a model
            that is not quantized, an unknown optimisation level, a ``tuning_records`` folder without records, or a
            failure of TVM or the linker (with the region).
        TargetError, ModelFileError: no target given or recorded, unknown target (listing the known ones),
            unreadable model.
        OutputFileError: ``out`` is the model file itself, or cannot be written (a folder, a device, ...).
    """
    report_progress = progress or logger.info
    check_opt_level(opt_level)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def step(name: str) -> None:
        nonlocal started
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - started
        started = now

    out_path = Path(out) if out is not None else _default_out(model)
    if isinstance(model, (str, Path)):
        refuse_input_as_output(out_path, model, "out")
    plan = plan_build(model, example_inputs, target, simulate, input_shapes, report_progress, step)
    command_streams = compile_vela_regions(plan.qdq, plan.partition, plan.target, report_progress)
    if command_streams:
        step("vela")
    records = _tuning_records(plan, tuning_records, tuned) if opt_level == max(OPT_LEVELS) else None
    with tempfile.TemporaryDirectory() as folder:
        library = Path(folder) / LIBRARY
        built = build_library(plan.module, plan.machine, opt_level, str(library), report_progress, records, plan.provenance)
        library_bytes = library.read_bytes()
    step("codegen")
    graph = build_compiled_graph(plan.qdq, plan.report, plan.partition, plan.machine.arch, plan.machine.dot_product().name)
    graph = graph.with_kernels(kernel_map(built.executable, built.calls), {k.kernel for k in built.kernels if k.parallel})

    report_progress(f"write {out_path}")
    resolved, parts, report = plan.target, plan.partition, plan.report
    manifest = {
        "edgeq_version": __version__,
        "tvm_version": tvm.__version__,
        "target": {"name": resolved.name, "kind": resolved.kind.value, "host": resolved.host},
        "library": {
            "member": LIBRARY,
            "arch": plan.machine.arch,
            "entry": "main",
            "format": "tvm-relax-vm",
            "cpu_features": library_features(tvm.target.Target(plan.machine.llvm)),
        },
        "npu_execution": "simulated" if resolved.kind is TargetKind.NPU else None,
        "opt_level": opt_level,
        "tuned_kernels": sum(k.tuned for k in built.kernels),
        "source": plan.source,
        "inputs": _input_entries(parts.inputs),
        "outputs": _tensor_entries(parts.outputs),
        "placement": {**asdict(report.summary), "regions": [{"name": r.name, "placement": r.placement.value, "ops": len(r.nodes)} for r in parts.regions]},
        **command_stream_manifest(command_streams),
    }
    members = {
        LIBRARY: library_bytes,
        NPU_PROGRAM: json_bytes(npu_program(graph, resolved)),
        GRAPH: json_bytes(graph.to_dict()),
        CHECK: json_bytes(report.to_dict()),
        **command_stream_members(command_streams),
    }
    write_artifact(out_path, manifest, members)
    step("write")
    used = records.folder if records is not None else None
    return CompileResult(
        out_path, resolved, plan.machine.arch, report, parts, plan.module, graph, manifest, built.kernels, used, seconds, command_streams
    )


def _default_out(model: ModelLike) -> Path:
    if isinstance(model, (str, Path)):
        return Path(model).with_suffix(".edgeq")
    return Path("model.edgeq")
