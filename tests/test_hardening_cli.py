"""Issue 29, the command line and file output: every bad input or output path is one line naming the path (exit
status 1, or 2 for a bad option value), never a traceback; an output never replaces the input, a folder or a device;
a failed write leaves no file behind."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from models import SmallCNN, integer_model

from edgeq.cli import EXIT_ERROR, main
from edgeq.compile import compile_model
from edgeq.errors import OutputFileError
from edgeq.export import to_onnx
from edgeq.fileio import atomic_write

EXIT_USAGE = 2
DEV_NULL = Path("/dev/null")
needs_dev_null = pytest.mark.skipif(not DEV_NULL.is_char_device(), reason="/dev/null is not a character device here")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """A small QDQ ONNX model and its artifact (compiled for this machine)."""
    torch.manual_seed(0)
    example = torch.rand(2, 1, 8, 8)
    folder = tmp_path_factory.mktemp("hardening_cli")
    onnx_path = to_onnx(integer_model(SmallCNN().eval(), example, "npu-s"), (example,), folder / "m.onnx")
    return onnx_path, compile_model(onnx_path, out=folder / "m.edgeq", simulate=True).artifact


def fails(capsys, *argv: object) -> str:
    """Run ``edgeq argv``; assert exit status 1 and exactly one line on standard error, no traceback; the line."""
    assert main([str(a) for a in argv]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err.strip()


def fingerprint(path: Path) -> tuple:
    """What must not change about a file the command was not to write: inode, type, device number, mode, bytes."""
    info = os.stat(path)
    content = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else None
    return info.st_ino, stat.S_IFMT(info.st_mode), info.st_rdev, info.st_mode, info.st_mtime_ns, content


# ---- an output that is the input ----------------------------------------------------------------------------------


OUTPUT_IS_INPUT = {  # command: (argv before the output path, the option, the input: "onnx" or "artifact")
    "compile -o": (["compile", "{model}", "--simulate", "-o"], "-o", "onnx"),
    "check --json": (["check", "{model}", "--json"], "--json", "onnx"),
    "visualize -o": (["visualize", "{model}", "-o"], "-o", "artifact"),
}


@pytest.mark.parametrize("spelling", ["same path", "./ path", "symbolic link", "hard link"])
@pytest.mark.parametrize("command", OUTPUT_IS_INPUT)
def test_an_output_that_is_the_input_is_refused(files, tmp_path, capsys, command, spelling):
    argv, option, kind = OUTPUT_IS_INPUT[command]
    source = {"onnx": files[0], "artifact": files[1]}[kind]
    model = tmp_path / f"model{source.suffix}"
    model.write_bytes(source.read_bytes())
    output = {
        "same path": model,
        "./ path": f"{tmp_path}/./{model.name}",
        "symbolic link": tmp_path / "link",
        "hard link": tmp_path / "hard",
    }[spelling]
    if spelling == "symbolic link":
        (tmp_path / "link").symlink_to(model)
    if spelling == "hard link":
        os.link(model, tmp_path / "hard")
    before = fingerprint(model)
    line = fails(capsys, *(a.format(model=model) for a in argv), output)
    assert line == f"edgeq {command.split()[0]}: error: {Path(output)}: {option} names the input file; give another path for the output"
    assert fingerprint(model) == before


# ---- an output path where something other than a file is ----------------------------------------------------------


def output_argv(command: str, files: tuple[Path, Path], output: Path) -> list[object]:
    """The command line of ``command`` writing ``output`` (a file; for perf and run, a folder)."""
    onnx_path, artifact = files
    return {
        "compile": ["compile", onnx_path, "--simulate", "-o", output],
        "check": ["check", onnx_path, "--json", output],
        "visualize": ["visualize", artifact, "-o", output],
        "perf": ["perf", artifact, "-o", output],
        "run": ["run", artifact, "--output-dir", output],
    }[command]


@pytest.mark.parametrize("command", ["compile", "check", "visualize"])
def test_an_output_onto_a_folder_is_refused(files, tmp_path, capsys, command):
    folder = tmp_path / "out"
    (folder / "inside").mkdir(parents=True)
    line = fails(capsys, *output_argv(command, files, folder))
    assert line == f"edgeq {command}: error: {folder}: a folder is there, not a file; give the path of a file to write"
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in folder.iterdir()] == ["inside"]


@pytest.mark.parametrize("command", ["compile", "check", "visualize"])
def test_an_output_onto_a_named_pipe_is_refused(files, tmp_path, capsys, command):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    line = fails(capsys, *output_argv(command, files, pipe))
    assert line == f"edgeq {command}: error: {pipe}: a named pipe is there, not a file; give the path of a file to write"
    assert stat.S_ISFIFO(os.stat(pipe).st_mode) and os.listdir(tmp_path) == ["pipe"]


@needs_dev_null
@pytest.mark.parametrize("command", ["compile", "check", "visualize"])
def test_an_output_onto_a_device_leaves_the_device_alone(files, capsys, command):
    """The bug: as root, the atomic rename replaced /dev/null by a regular file."""
    before = fingerprint(DEV_NULL)
    line = fails(capsys, *output_argv(command, files, DEV_NULL))
    assert line == f"edgeq {command}: error: /dev/null: a character device is there, not a file; give the path of a file to write"
    assert fingerprint(DEV_NULL) == before and DEV_NULL.is_char_device()


@needs_dev_null
def test_the_installed_command_leaves_the_device_alone(files):
    """The same, as a process: one line on standard error, exit status 1, /dev/null still the device."""
    before = fingerprint(DEV_NULL)
    completed = subprocess.run([sys.executable, "-m", "edgeq.cli", "check", str(files[0]), "--json", str(DEV_NULL)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == EXIT_ERROR and "Traceback" not in completed.stderr
    assert completed.stderr.splitlines() == [
        "edgeq check: error: /dev/null: a character device is there, not a file; give the path of a file to write"
    ]
    assert fingerprint(DEV_NULL) == before


def test_perf_onto_a_report_path_that_is_a_folder(files, tmp_path, capsys):
    (tmp_path / "report.json").mkdir()
    line = fails(capsys, "perf", files[1], "-o", tmp_path)
    path = tmp_path / "report.json"
    assert line == f"edgeq perf: error: {path}: a folder is there, not a file; give the path of a file to write"
    assert path.is_dir() and not list(tmp_path.glob(".*.partial"))


# ---- a file where a folder should be: the OS error, as one line ---------------------------------------------------


@pytest.mark.parametrize("command", ["compile", "check", "visualize", "perf", "run"])
def test_an_output_under_a_file_is_one_line(files, tmp_path, capsys, command):
    """``<file>/x``: NotADirectoryError, from the command's own folder creation or from the top-level catch."""
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    output = blocker / "x"
    line = fails(capsys, *output_argv(command, files, output))
    assert line.startswith(f"edgeq {command}: error: {output}: ") or line.startswith(f"edgeq {command}: error: {blocker}: ")
    assert "is a file, not a folder" in line or "Not a directory" in line
    assert blocker.read_text() == "a file, not a folder" and os.listdir(tmp_path) == ["file"]


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder where creating a file fails for lack of permission: a 0o555 folder, or, for root (whom permission
    bits do not stop), /sys."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        yield folder
        folder.chmod(0o755)
        return
    try:
        handle, probe = tempfile.mkstemp(dir="/sys")
    except PermissionError:
        yield Path("/sys")
        return
    except OSError as error:
        pytest.skip(f"/sys refuses files with {error.strerror}, not a permission error")
    os.close(handle)
    os.unlink(probe)
    pytest.skip("root may write in /sys here")


@pytest.mark.parametrize("command", ["compile", "check"])
def test_an_output_in_a_read_only_folder_is_one_line(files, read_only_folder, capsys, command):
    output = read_only_folder / "edgeq-hardening-test.out"
    line = fails(capsys, *output_argv(command, files, output))
    assert line == f"edgeq {command}: error: {output}: cannot write: Permission denied"
    assert not output.exists() and not list(read_only_folder.glob(".edgeq-hardening-test.out.*"))


@needs_dev_null
def test_perf_output_folder_onto_a_device_is_one_line(files, capsys):
    """perf creates its folder itself: the OS error reaches the command line's top-level catch."""
    before = fingerprint(DEV_NULL)
    line = fails(capsys, "perf", files[1], "-o", DEV_NULL)
    assert line.startswith("edgeq perf: error: /dev/null")
    assert fingerprint(DEV_NULL) == before


@pytest.mark.parametrize(
    "error, line",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/models/m.onnx"), "/models/m.onnx: Permission denied"),
        (OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b"), "a -> b: Invalid cross-device link"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "Connection refused"),
    ],
)
def test_an_unforeseen_os_error_is_one_line(files, capsys, monkeypatch, error, line):
    import edgeq.check

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(edgeq.check, "check_model", fail)
    assert fails(capsys, "check", files[0]) == f"edgeq check: error: {line}"


# ---- a missing or unusable input ----------------------------------------------------------------------------------


def input_argv(command: str, model: Path, tmp_path: Path) -> list[object]:
    """The command line of ``command`` reading the model ``model``, writing into ``tmp_path/out``."""
    out = tmp_path / "out"
    return {
        "check": ["check", model],
        "compile": ["compile", model, "-o", out],
        "tune": ["tune", model, "-o", out],
        "perf": ["perf", model, "-o", out],
        "visualize": ["visualize", model, "-o", out],
        "run": ["run", model, "--output-dir", out],
    }[command]


def bad_input(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """A model path of ``kind`` and what the message says of it."""
    if kind == "missing":
        return tmp_path / "absent.onnx", "no such file"
    if kind == "under a file":
        (tmp_path / "file").write_text("")
        return tmp_path / "file" / "m.onnx", "no such file"
    if kind == "folder":
        (tmp_path / "folder.onnx").mkdir()
        return tmp_path / "folder.onnx", "a folder, not a file; give the path of a file"
    if kind == "named pipe":
        os.mkfifo(tmp_path / "pipe.onnx")
        return tmp_path / "pipe.onnx", "a named pipe, not a file; give the path of a file"
    return DEV_NULL, "a character device, not a file; give the path of a file"


@pytest.mark.parametrize("kind", ["missing", "under a file", "folder", "named pipe", "device"])
@pytest.mark.parametrize("command", ["check", "compile", "tune", "perf", "visualize", "run"])
def test_a_bad_input_model_is_one_line(tmp_path, capsys, command, kind):
    model, problem = bad_input(kind, tmp_path)
    assert fails(capsys, *input_argv(command, model, tmp_path)) == f"edgeq {command}: error: {model}: {problem}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["check", "compile", "run"])
def test_an_unreadable_input_model_is_one_line(files, tmp_path, capsys, monkeypatch, command):
    model = tmp_path / "locked.onnx"
    model.write_bytes(files[0].read_bytes())
    model.chmod(0)
    if os.geteuid() == 0:  # root reads any file: the access check answers as for another user
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: Path(path) != model and access(path, mode, **kwargs))
    line = fails(capsys, *input_argv(command, model, tmp_path))
    assert line == f"edgeq {command}: error: {model}: cannot read: permission denied"


# ---- option values ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compile", "m.onnx", "-O", "7"], "argument -O: invalid choice: 7 (choose from 0, 1, 2)"),
        (["compile", "m.onnx", "-O", "-1"], "argument -O: invalid choice: -1 (choose from 0, 1, 2)"),
        (["compile", "m.onnx", "--input-shape", "x=1x0x8"], "argument --input-shape: expected NAME=1x3x224x224 (each dimension >= 1); got 'x=1x0x8'"),
        (["compile", "m.onnx", "--input-shape", "x=1x-3"], "argument --input-shape: expected NAME=1x3x224x224 (each dimension >= 1); got 'x=1x-3'"),
        (["compile", "m.onnx", "--input-shape", "=1x3"], "argument --input-shape: expected NAME=1x3x224x224 (each dimension >= 1); got '=1x3'"),
        (["compile", "m.onnx", "--input-shape", "x=1xx3"], "argument --input-shape: expected NAME=1x3x224x224 (each dimension >= 1); got 'x=1xx3'"),
        (["compile", "m.onnx", "--input-shape", "x=1x3", "--input-shape", "x=1x4"], "argument --input-shape: input 'x' given twice"),
        (["tune", "m.onnx", "--input-shape", "x=1", "--input-shape", "x=1"], "argument --input-shape: input 'x' given twice"),
        (["tune", "m.onnx", "--budget", "inf"], "argument --budget: expected a positive number of minutes; got 'inf'"),
        (["tune", "m.onnx", "--budget", "nan"], "argument --budget: expected a positive number of minutes; got 'nan'"),
        (["tune", "m.onnx", "--budget", "-1"], "argument --budget: expected a positive number of minutes; got '-1'"),
        (["run", "m.edgeq", "--output-dir", "out", "--bench", "-1"], "argument --bench: expected a whole number >= 1; got '-1'"),
        (["run", "m.edgeq", "--output-dir", "out", "--bench", "0"], "argument --bench: expected a whole number >= 1; got '0'"),
        (["run", "m.edgeq", "--output-dir", "out", "--threads", "0"], "argument --threads: expected a whole number >= 1; got '0'"),
        (["run", "m.edgeq", "--output-dir", ""], "argument --output-dir: expected a path; got ''"),
        (["compile", "m.onnx", "-o", ""], "argument -o/--output: expected a path; got ''"),
        (["check", "m.onnx", "--json", ""], "argument --json: expected a path; got ''"),
        (["perf", "m.edgeq", "-o", ""], "argument -o/--output: expected a path; got ''"),
        (["visualize", ""], "argument model: expected a path; got ''"),
    ],
)
def test_a_bad_option_value_is_a_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == EXIT_USAGE
    assert f"edgeq {argv[0]}: error: {message}" in capsys.readouterr().err


# ---- atomic_write -------------------------------------------------------------------------------------------------


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    with pytest.raises(OutputFileError, match=f"^{path}: cannot write: No space left on device$"), atomic_write(path) as temporary:
        temporary.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]


def test_an_error_about_another_file_passes_through(tmp_path):
    """An input that cannot be read while writing is not disguised as a write error."""
    with pytest.raises(FileNotFoundError, match="input.npy"), atomic_write(tmp_path / "out.bin"):
        open(tmp_path / "input.npy", "rb")
    assert os.listdir(tmp_path) == []


def test_an_error_of_edgeq_while_writing_passes_through(tmp_path):
    """An OutputFileError from inside (a nested write) keeps its own message."""
    with pytest.raises(OutputFileError, match="^/dev/null: a character device is there"), atomic_write(tmp_path / "a"):
        with atomic_write("/dev/null"):
            pass
    assert os.listdir(tmp_path) == []


def test_an_interrupted_write_leaves_no_temporary(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "a.edgeq") as temporary:
        temporary.write_bytes(b"PK")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_a_written_file_has_the_usual_permissions(tmp_path):
    """A new file gets 0o666 less the umask (not the temporary file's 0o600); a replaced file keeps its own."""
    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "new") as temporary:
            temporary.write_text("new")
        (tmp_path / "kept").write_text("old")
        (tmp_path / "kept").chmod(0o640)
        with atomic_write(tmp_path / "kept") as temporary:
            temporary.write_text("new")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "kept").st_mode) == 0o640
