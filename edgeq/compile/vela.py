"""The Vela driver: one TOSA graph compiled by Arm's Vela for an Ethos-U target (its ``[vela]`` options), with
Vela's command stream, memory sizes and performance estimate as typed values.

Vela runs as a child process (``python -m ethosu.vela``, the installed Vela's own command line), not through its
Python functions, because:

- Vela's only entry point is that command line (``ethosu.vela.vela.main``): it parses options, prints its tables
  and writes its results as files (the raw ``.npz``, the per-layer and summary CSVs); the functions behind it
  (``process_regor``, ``ethosu.regor.compile``) are internal and change between releases, and ``ethosu.vela.api``
  is the legacy core's register-level API, not a compiler.
- Vela's compiler is a C++ core (``ethosu.regor``): a graph that trips one of its assertions ends the process.
  In a child process that is one error naming the region; in edgeq's own it would end ``edgeq compile`` with no
  message.

A refusal (Vela's ``Non-passthrough operation (Conv2D) could not run on NPU``, or any other failure) becomes one
:class:`VelaRefusal` naming the op of edgeq's graph that wrote the refused operator (through the TOSA writer's
:class:`~edgeq.export.tosa.writer.TosaGraph.operators`) and Vela's reason, never Vela's traceback.
"""

from __future__ import annotations

import csv
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import CompileError
from edgeq.export.tosa.writer import TosaGraph
from edgeq.vela_configs import VelaOptions, vela_version

RAW_SUFFIX = "_vela.npz"
PER_LAYER_SUFFIX = "_per-layer.csv"
TIMEOUT_S = 1800
"""How long one Vela run may take: a generous bound (the digits CNN compiles in under a second here)."""


@dataclass(frozen=True)
class VelaTensor:
    """Where the command stream reads an input or writes an output: its shape (Vela's, 6-D), bytes per element,
    memory region (the base pointer the driver sets) and offset in it."""

    shape: tuple[int, ...]
    element_bytes: int
    region: int
    offset: int


@dataclass(frozen=True)
class CommandStream:
    """Vela's raw output (``--output-format raw``): the NPU's command stream, its encoded weights and the sizes of
    the scratch areas a driver allocates, and the file Vela wrote them in (``raw``, an ``.npz``)."""

    commands: bytes
    weights: bytes
    weight_region: int
    scratch_bytes: int
    scratch_region: int
    fast_scratch_bytes: int
    fast_scratch_region: int
    inputs: tuple[VelaTensor, ...]
    outputs: tuple[VelaTensor, ...]
    raw: bytes


@dataclass(frozen=True)
class VelaLayer:
    """One row of Vela's per-layer estimate (``--verbose-performance``).

    ``name`` is the layer's name as Vela prints it (the TOSA tensor it writes), ``op`` the op of edgeq's graph that
    wrote that tensor (:meth:`~edgeq.export.tosa.writer.TosaGraph.source_of`; for a layer Vela fused, the last op:
    ``conv1/Relu`` for conv1's convolution and its ReLU; None when Vela names a tensor of its own).
    """

    name: str
    op: str | None
    original_operator: str
    operator: str
    target: str
    """Where Vela runs the layer: ``NPU`` (``CPU`` makes the compile a :class:`VelaRefusal`)."""
    cycles: int
    npu_cycles: int
    sram_access_cycles: int
    dram_access_cycles: int
    on_chip_flash_access_cycles: int
    off_chip_flash_access_cycles: int
    macs: int
    mac_utilisation_percent: float
    staging_bytes: int


@dataclass(frozen=True)
class VelaSummary:
    """Vela's summary of the whole graph (its summary CSV): cycles, the inference time at the target's clock, the
    memory each area holds and the bytes moved, the weights before and after Vela's encoding."""

    npu_cycles: int
    total_cycles: int
    clock_hz: float
    inference_time_s: float
    macs: int
    sram_bytes: int
    dram_bytes: int
    on_chip_flash_bytes: int
    off_chip_flash_bytes: int
    sram_traffic_bytes: int
    dram_traffic_bytes: int
    original_weight_bytes: int
    encoded_weight_bytes: int


@dataclass(frozen=True)
class VelaResult:
    """A TOSA graph compiled by Vela: the command stream, Vela's version and exact command-line options, its
    per-layer estimate and its summary."""

    command_stream: CommandStream
    version: str
    options: tuple[str, ...]
    layers: tuple[VelaLayer, ...]
    summary: VelaSummary


class VelaRefusal(CompileError):
    """Vela refused or failed to compile a TOSA graph.

    Attributes:
        operator: the operator Vela named (its own spelling, ``Conv2D``), or None.
        ops: the ops of edgeq's graph that wrote a TOSA operator of that kind (the one refused among them).
        reason: Vela's message.
    """

    def __init__(self, message: str, operator: str | None, ops: tuple[str, ...], reason: str) -> None:
        super().__init__(message)
        self.operator, self.ops, self.reason = operator, ops, reason


def vela_arguments(options: VelaOptions) -> tuple[str, ...]:
    """The exact ``vela`` options edgeq compiles with: the target's ``[vela]`` section, raw output and the
    per-layer estimate."""
    return (*options.arguments(), "--output-format", "raw", "--verbose-performance")


def compile_tosa(graph: TosaGraph, options: VelaOptions, what: str = "the TOSA graph") -> VelaResult:
    """Compile ``graph`` with Vela for a target's ``[vela]`` options, in a temporary folder.

    Args:
        graph: the TOSA graph (the TOSA writer's, so that Vela's layer and operator names map to edgeq's ops).
        options: the target's ``[vela]`` section.
        what: the graph as messages name it (``NPU region 2``).

    Raises:
        VelaRefusal: Vela refused the graph or failed, naming the op and Vela's reason.
    """
    arguments = vela_arguments(options)
    with tempfile.TemporaryDirectory(prefix="edgeq-vela-") as folder:
        work = Path(folder)
        network = work / "region.tosa"
        network.write_bytes(graph.flatbuffer)
        command = [sys.executable, "-m", "ethosu.vela", *arguments, "--output-dir", str(work / "out"), str(network)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            reason = f"Vela did not finish in {TIMEOUT_S} s"
            raise VelaRefusal(f"{what}: {reason}", None, (), reason) from None
        if done.returncode != 0:
            raise _refusal(graph, what, done)
        out = work / "out"
        summaries = list(out.glob(f"region_summary_{options.system_config}.csv"))
        if not summaries:
            raise VelaRefusal(f"{what}: Vela wrote no summary; its output ends: {_last_line(done.stdout)}", None, (), done.stdout)
        layers = read_layers(out / f"region{PER_LAYER_SUFFIX}", graph)
        refuse_cpu_operators(what, done.stdout, layers)
        return VelaResult(
            command_stream=read_command_stream(out / f"region{RAW_SUFFIX}"),
            version=vela_version(),
            options=arguments,
            layers=layers,
            summary=read_summary(summaries[0]),
        )


# ---- Vela's files --------------------------------------------------------------------------------------------------
def read_command_stream(path: Path) -> CommandStream:
    """Vela's raw ``.npz`` as a :class:`CommandStream` (the quantization entries, Python objects, are not read)."""
    raw = path.read_bytes()
    with np.load(path, allow_pickle=False) as data:

        def tensors(kind: str) -> tuple[VelaTensor, ...]:
            fields = (data[f"{kind}_shape"], data[f"{kind}_elem_size"], data[f"{kind}_region"], data[f"{kind}_offset"])
            return tuple(VelaTensor(tuple(int(d) for d in s), int(e), int(r), int(o)) for s, e, r, o in zip(*fields, strict=True))

        return CommandStream(
            commands=bytes(data["cmd_data"].item()),
            weights=bytes(data["weight_data"].item()),
            weight_region=int(data["weight_region"]),
            scratch_bytes=int(data["scratch_size"]),
            scratch_region=int(data["scratch_region"]),
            fast_scratch_bytes=int(data["scratch_fast_size"]),
            fast_scratch_region=int(data["scratch_fast_region"]),
            inputs=tensors("input"),
            outputs=tensors("output"),
            raw=raw,
        )


def read_layers(path: Path, graph: TosaGraph) -> tuple[VelaLayer, ...]:
    """Vela's per-layer CSV, each layer with the op of edgeq's graph that wrote its tensor."""
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    return tuple(
        VelaLayer(
            name=row["Name"],
            op=graph.source_of(row["Name"]),
            original_operator=row["Original Operator"],
            operator=row["NNG Operator"],
            target=row["Target"],
            cycles=int(row["Op Cycles"]),
            npu_cycles=int(row["NPU"]),
            sram_access_cycles=int(row["SRAM AC"]),
            dram_access_cycles=int(row["DRAM AC"]),
            on_chip_flash_access_cycles=int(row["OnFlash AC"]),
            off_chip_flash_access_cycles=int(row["OffFlash AC"]),
            macs=int(row["MAC Count"]),
            mac_utilisation_percent=float(row["Util% (MAC)"]),
            staging_bytes=int(row["Staging Usage"]),
        )
        for row in rows
    )


def read_summary(path: Path) -> VelaSummary:
    """Vela's summary CSV (one row; memory used in KiB, as Vela writes it, read as bytes)."""
    with path.open(newline="") as file:
        row = next(csv.DictReader(file))

    def kib(key: str) -> int:
        return round(float(row[key]) * 1024)

    return VelaSummary(
        npu_cycles=int(row["cycles_npu"]),
        total_cycles=int(row["cycles_total"]),
        clock_hz=float(row["core_clock"]),
        inference_time_s=float(row["inference_time"]),
        macs=int(row["nn_macs"]),
        sram_bytes=kib("sram_memory_used"),
        dram_bytes=kib("dram_memory_used"),
        on_chip_flash_bytes=kib("on_chip_flash_memory_used"),
        off_chip_flash_bytes=kib("off_chip_flash_memory_used"),
        sram_traffic_bytes=int(row["sram_total_bytes"]),
        dram_traffic_bytes=int(row["dram_total_bytes"]),
        original_weight_bytes=int(row["total_original_weights"]),
        encoded_weight_bytes=int(row["total_npu_encoded_weights"]),
    )


# ---- refusals ------------------------------------------------------------------------------------------------------
_OPERATOR = re.compile(r"operation \((\w+)\)")
_EXCEPTION = re.compile(r"^(?:[\w.]+(?:Error|Exception)|Error): (.*)$")


def _refusal(graph: TosaGraph, what: str, done: subprocess.CompletedProcess) -> VelaRefusal:
    """One error for a failed Vela run: the exception's message (never its traceback), or the signal that ended
    it, with the op of edgeq's graph that wrote an operator of the kind Vela names."""
    if done.returncode < 0:
        reason = f"Vela crashed ({signal.Signals(-done.returncode).name})"
    else:
        messages = [m.group(1) for line in done.stderr.splitlines() if (m := _EXCEPTION.match(line.strip()))]
        reason = messages[-1] if messages else _last_line(done.stderr) or _last_line(done.stdout) or f"exit status {done.returncode}"
    named = _OPERATOR.search(reason)
    operator = named.group(1) if named else None
    ops = ops_writing(graph, operator) if operator else ()
    if len(ops) == 1:
        where = f"op '{ops[0]}' ({operator})"
    elif ops:
        where = f"one of the ops {', '.join(repr(o) for o in ops)} ({operator})"
    else:
        where = "the graph"
    return VelaRefusal(f"{what}: Vela refuses {where}: {reason}", operator, ops, reason)


_CPU_OPERATORS = re.compile(r"^CPU operators = (\d+)", re.M)


def refuse_cpu_operators(what: str, stdout: str, layers: tuple[VelaLayer, ...]) -> None:
    """A graph Vela compiled with operators left to a CPU is refused too: TOSA input has no CPU fallback, so those
    operators would run nowhere.

    Raises:
        VelaRefusal: naming the layers Vela placed on the CPU and their ops (or their count, when it names none).
    """
    counted = _CPU_OPERATORS.search(stdout)
    on_cpu = [layer for layer in layers if layer.target != "NPU"]
    if not on_cpu and (counted is None or int(counted.group(1)) == 0):
        return
    named = ", ".join(f"'{layer.op or layer.name}' ({layer.original_operator})" for layer in on_cpu)
    reason = f"Vela leaves {named or counted.group(1) + ' operator(s)'} to a CPU; a TOSA graph has no CPU fallback"
    ops = tuple(dict.fromkeys(layer.op for layer in on_cpu if layer.op is not None))
    raise VelaRefusal(f"{what}: {reason}", on_cpu[0].original_operator if on_cpu else None, ops, reason)


def ops_writing(graph: TosaGraph, operator: str) -> tuple[str, ...]:
    """The ops of edgeq's graph that wrote a TOSA operator of the kind Vela calls ``operator`` (Vela's ``Conv2D``,
    ``MaxPool`` are TOSA's ``CONV2D``, ``MAX_POOL2D``), in graph order."""
    kind = _kind(operator)
    return tuple(dict.fromkeys(o.source for o in graph.operators if _kind(o.kind) == kind))


def _kind(name: str) -> str:
    return name.lower().replace("_", "").removesuffix("2d")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Warning:")]
    return lines[-1] if lines else ""


__all__ = [
    "CommandStream", "VelaLayer", "VelaRefusal", "VelaResult", "VelaSummary", "VelaTensor", "compile_tosa", "vela_arguments",
]  # fmt: skip
