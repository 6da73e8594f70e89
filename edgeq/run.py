"""``edgeq run``: run an artifact on .npy inputs with the Python or the C++ runtime, on this machine or under qemu.

An artifact built for this machine's architecture runs in-process (Python runtime) or with ``edgeq-run`` (C++
runtime). An aarch64 artifact on an x86_64 machine runs with the aarch64 build of ``edgeq-run`` under
``qemu-aarch64``: results are exact, timings say nothing about ARM speed. NPU regions always run as the
bit-exact simulation compiled into the artifact.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.fileio import make_folder

if TYPE_CHECKING:
    from edgeq_runtime import Artifact

_REPOSITORY = Path(__file__).resolve().parent.parent
_CROSS_SYSROOT = {"aarch64": "/usr/aarch64-linux-gnu"}


@dataclass(frozen=True)
class RunResult:
    """Where the outputs went, and how the artifact ran."""

    outputs: dict[str, Path]
    runtime: str
    emulated: bool
    timing: str | None


def runtime_binary(arch: str) -> Path:
    """The ``edgeq-run`` build for ``arch``: ``$EDGEQ_RUN_<ARCH>``, else ``runtime/cpp/build/<arch>/edgeq-run``.

    Raises:
        EdgeqError: it is not built, with the command that builds it.
    """
    explicit = os.environ.get(f"EDGEQ_RUN_{arch.upper()}")
    binary = Path(explicit) if explicit else _REPOSITORY / "runtime" / "cpp" / "build" / arch / "edgeq-run"
    if not binary.is_file():
        raise EdgeqError(f"the {arch} C++ runtime is not built ({binary}); build it with scripts/build_runtime.sh {arch}")
    return binary


def _ordered_inputs(inputs: Sequence[str], names: list[str]) -> list[Path]:
    """Input files in the program's order, from ``path`` (positional) or ``name=path`` arguments."""
    named = dict(i.split("=", 1) for i in inputs if "=" in i and not Path(i).exists())
    if not named:
        return [Path(i) for i in inputs]
    unknown, missing = sorted(set(named) - set(names)), [n for n in names if n not in named]
    if unknown or missing or len(named) != len(inputs):
        raise EdgeqError(f"--input: names {unknown} are unknown and {missing} missing (inputs: {', '.join(names)})")
    return [Path(named[n]) for n in names]


def run_artifact(
    artifact: Path,
    inputs: Sequence[str],
    output_dir: Path,
    runtime: str = "python",
    bench: int | None = None,
    raw: bool = False,
    say: Callable[[str], None] = print,
    threads: int | None = None,
) -> RunResult:
    """Run ``artifact`` on .npy ``inputs`` and write each output as ``output_dir/<name>.npy`` (the folder and its
    parents are created if missing). Inference runs on ``threads`` threads (default: every core).

    Raises:
        EdgeqError: unreadable artifact or inputs, an output folder that cannot be created, a runtime that is not
            built, or a failed run (with its message).
    """
    from edgeq_runtime import Artifact, ArtifactError
    from edgeq_runtime.model import host_arch

    try:
        verified = Artifact.read(artifact)
    except ArtifactError as error:
        raise EdgeqError(str(error)) from None
    manifest = verified.manifest
    files = _ordered_inputs(inputs, [i["name"] for i in manifest["inputs"]])
    make_folder(output_dir)
    arch = manifest["library"]["arch"]
    emulated = arch != host_arch()
    if manifest.get("npu_execution"):
        say(f"NPU target {manifest['target']['name']}: NPU regions run as a bit-exact simulation on the CPU")
    if emulated and runtime == "python":
        say(f"the artifact is built for {arch}: running it with the C++ runtime")
        runtime = "cpp"
    if runtime == "python":
        return _run_python(verified, files, output_dir, bench, raw, threads)
    names = [o["name"] for o in manifest["outputs"]]
    return _run_cpp(artifact, files, output_dir, arch, emulated, bench, raw, names, say, threads)


def _run_python(
    artifact: Artifact, files: list[Path], output_dir: Path, bench: int | None, raw: bool, threads: int | None
) -> RunResult:
    from edgeq_runtime import ArtifactError, Model
    from edgeq_runtime.vm import RuntimeLibraryError

    try:
        arrays = [np.load(f, allow_pickle=False) for f in files]
    except (OSError, ValueError) as error:
        raise EdgeqError(f"cannot read an input: {error}") from None
    try:
        with Model.from_artifact(artifact, threads) as model:
            outputs = model.run(arrays, raw=raw)
            timing = model.benchmark(arrays, runs=bench) if bench else None
    except (ValueError, ArtifactError, RuntimeLibraryError) as error:  # the runtime's messages name the input
        raise EdgeqError(str(error)) from None
    written = {}
    for name, value in outputs.items():
        written[name] = output_dir / f"{name}.npy"
        np.save(written[name], value)
    return RunResult(written, "python", False, str(timing) if timing else None)


def _run_cpp(
    artifact: Path,
    files: list[Path],
    output_dir: Path,
    arch: str,
    emulated: bool,
    bench: int | None,
    raw: bool,
    names: list[str],
    say: Callable[[str], None],
    threads: int | None,
) -> RunResult:
    command = [str(runtime_binary(arch)), str(artifact), "--output-dir", str(output_dir)]
    for path in files:
        command += ["--input", str(path)]
    if raw:
        command.append("--raw")
    if bench:
        command += ["--bench", str(bench)]
    if threads is not None:
        command += ["--threads", str(threads)]
    if emulated:
        emulator = f"qemu-{arch}"
        if shutil.which(emulator) is None:
            raise EdgeqError(f"running a {arch} artifact here needs {emulator} (Debian: apt-get install qemu-user)")
        say(f"running the {arch} build of edgeq-run under {emulator}: exact results, timings that say nothing about {arch} speed")
        command = [emulator, "-L", _CROSS_SYSROOT[arch], *command]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise EdgeqError(completed.stderr.strip().removeprefix("edgeq-run: error: ") or f"edgeq-run failed ({completed.returncode})")
    timing = next((line for line in completed.stdout.splitlines() if line.startswith("latency")), None)
    return RunResult({n: output_dir / f"{n}.npy" for n in names}, "cpp", emulated, timing)
