"""``edgeq run``: run an artifact on .npy inputs with the Python or the C++ runtime, on this machine or under qemu.

An artifact built for this machine's architecture runs in-process (Python runtime) or with ``edgeq-run`` (C++
runtime). An aarch64 artifact on an x86_64 machine runs with the aarch64 build of ``edgeq-run`` under
``qemu-aarch64``: results are exact, timings say nothing about ARM speed. NPU regions always run as the
bit-exact simulation compiled into the artifact.

Output ``o`` goes to ``OUTPUT_DIR/<o.file>.npy`` (``file``: the manifest's safe file name, docs/artifact.md), a
path checked to resolve inside ``OUTPUT_DIR`` before anything runs, and written whole or not at all. The Python
runtime's inputs are checked by their .npy header (shape, dtype, size) before their data is read.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tokenize
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.fileio import atomic_write, make_folder, readable_file

if TYPE_CHECKING:
    from edgeq_runtime import Artifact
    from edgeq_runtime.model import TensorInfo

_REPOSITORY = Path(__file__).resolve().parent.parent
_CROSS_SYSROOT = {"aarch64": "/usr/aarch64-linux-gnu"}
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
"""The .npy format versions read (numpy writes 1.0, and 2.0 for headers over 64 KiB), and their header readers."""


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
    """Run ``artifact`` on .npy ``inputs`` and write each output as ``output_dir/<file>.npy`` (the folder and its
    parents are created if missing). Inference runs on ``threads`` threads (default: every core).

    Raises:
        EdgeqError: unreadable artifact or inputs, an output folder that cannot be created or written, an output
            path resolving outside it, a runtime that is not built, or a failed run (with its message).
    """
    from edgeq_runtime import Artifact, ArtifactError
    from edgeq_runtime.manifest import COMMAND_STREAMS_KEY
    from edgeq_runtime.model import command_stream_note, host_arch

    try:
        verified = Artifact.read(artifact)
    except ArtifactError as error:
        raise EdgeqError(str(error)) from None
    manifest = verified.manifest
    files = _ordered_inputs(inputs, [i["name"] for i in manifest["inputs"]])
    make_folder(output_dir)
    outputs = {o["name"]: _output_path(output_dir, o["file"]) for o in manifest["outputs"]}
    arch = manifest["library"]["arch"]
    emulated = arch != host_arch()
    if manifest.get("npu_execution"):
        say(f"NPU target {manifest['target']['name']}: NPU regions run as a bit-exact simulation on the CPU")
    if COMMAND_STREAMS_KEY in manifest:
        say(command_stream_note(manifest["target"]["name"], [s["region"] for s in manifest[COMMAND_STREAMS_KEY]]))
    if emulated and runtime == "python":
        say(f"the artifact is built for {arch}: running it with the C++ runtime")
        runtime = "cpp"
    if runtime == "python":
        return _run_python(verified, files, outputs, bench, raw, threads)
    return _run_cpp(artifact, files, output_dir, outputs, arch, emulated, bench, raw, say, threads)


def _output_path(output_dir: Path, file: str) -> Path:
    """Where the output of safe file name ``file`` goes: ``output_dir/<file>.npy``.

    Raises:
        EdgeqError: that path resolves outside ``output_dir`` (a symbolic link there leading elsewhere).
    """
    path = output_dir / f"{file}.npy"
    resolved = path.resolve()
    if not resolved.is_relative_to(output_dir.resolve()):
        raise EdgeqError(f"{path}: leads to {resolved}, outside the output folder {output_dir}; nothing was written")
    return path


def _read_input(path: Path, info: TensorInfo) -> np.ndarray:
    """The array of the .npy file ``path`` for input ``info``: its header is checked against the input (shape,
    dtype) and the file's size before any data is read, so a header announcing terabytes costs nothing.

    Raises:
        EdgeqError: the file is missing, not a file, unreadable, not a .npy file, or does not fit the input, in one
            line naming it.
    """
    try:
        with open(readable_file(path), "rb") as file:
            shape, _, dtype = _npy_header(file)
            info.check(shape, dtype)
            announced, held = math.prod(shape) * dtype.itemsize, os.fstat(file.fileno()).st_size - file.tell()
            if held < announced:
                raise ValueError(f"truncated: its header announces {announced} bytes of data, it holds {held}")
            file.seek(0)
            return np.load(file, allow_pickle=False)
    except OSError as error:
        raise EdgeqError(f"{path}: cannot read: {error.strerror or error}") from None
    except ValueError as error:
        raise EdgeqError(f"{path}: {' '.join(str(error).split())}") from None


def _npy_header(file: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The (shape, fortran_order, dtype) of the .npy header at the start of ``file``, leaving ``file`` at its data.

    Raises:
        ValueError: not a .npy file, or of a format version not read.
    """
    try:
        version = np.lib.format.read_magic(file)
    except ValueError:
        raise ValueError("not a .npy file") from None
    reader = _NPY_HEADER_READERS.get(version)
    if reader is None:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not read (1.0 and 2.0 are)")
    try:
        return reader(file)
    except (ValueError, SyntaxError, tokenize.TokenError) as error:  # numpy tokenizes the header's Python literal
        raise ValueError(f"not a valid .npy header ({error})") from None


def _run_python(
    artifact: Artifact, files: list[Path], outputs: dict[str, Path], bench: int | None, raw: bool, threads: int | None
) -> RunResult:
    from edgeq_runtime import ArtifactError, CommandStreamWarning, Model
    from edgeq_runtime.model import TensorInfo
    from edgeq_runtime.vm import RuntimeLibraryError

    infos = [TensorInfo.from_manifest(entry) for entry in artifact.manifest["inputs"]]
    if len(files) != len(infos):
        raise EdgeqError(f"{artifact.path}: {len(files)} input(s) given; the model takes {len(infos)}")
    arrays = [_read_input(path, info) for path, info in zip(files, infos)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CommandStreamWarning)  # said already, as a line of edgeq run's
            model = Model.from_artifact(artifact, threads)
        with model:
            values = model.run(arrays, raw=raw)
            timing = model.benchmark(arrays, runs=bench) if bench else None
    except (ValueError, ArtifactError, RuntimeLibraryError) as error:  # the runtime's messages name the input
        raise EdgeqError(str(error)) from None
    for name, value in values.items():  # whole or not at all; a refusal names the file (atomic_write)
        with atomic_write(outputs[name]) as temporary, open(temporary, "wb") as file:
            np.save(file, value)  # to a file object: given a name, np.save would add .npy to it
    return RunResult(outputs, "python", False, str(timing) if timing else None)


def _run_cpp(
    artifact: Path,
    files: list[Path],
    output_dir: Path,
    outputs: dict[str, Path],
    arch: str,
    emulated: bool,
    bench: int | None,
    raw: bool,
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
    completed = subprocess.run(command, capture_output=True, text=True, errors="replace", check=False)
    if completed.returncode != 0:
        raise EdgeqError(completed.stderr.strip().removeprefix("edgeq-run: error: ") or f"edgeq-run failed ({completed.returncode})")
    timing = next((line for line in completed.stdout.splitlines() if line.startswith("latency")), None)
    return RunResult(outputs, "cpp", emulated, timing)
