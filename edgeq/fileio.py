"""Reading and writing files safely: an input is checked before it is read; an output is written so that a failure
never leaves a half-written file, and never replaces a folder, a device or the input it was made from."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgeq.errors import EdgeqError, InputFileError, OutputFileError

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    """What a file of mode ``mode`` (``st_mode``) is: ``"a file"``, ``"a folder"``, ``"a character device"``, ..."""
    return next((name for is_kind, name in _KINDS if is_kind(mode)), "a file")


def readable_file(path: str | Path) -> Path:
    """``path``, once checked to name a regular file (through symbolic links) that this process may read.

    Raises:
        InputFileError: it is missing, a folder, a device or a pipe, or unreadable; naming ``path``.

    Example:
        >>> readable_file("/")
        Traceback (most recent call last):
        ...
        edgeq.errors.InputFileError: /: a folder, not a file; give the path of a file
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise InputFileError(f"{path}: no such file") from None
    except OSError as error:
        raise InputFileError(f"{path}: cannot read: {error.strerror}") from None
    if not stat.S_ISREG(mode):
        raise InputFileError(f"{path}: {_kind(mode)}, not a file; give the path of a file")
    if not os.access(path, os.R_OK):
        raise InputFileError(f"{path}: cannot read: permission denied")
    return path


def refuse_input_as_output(output: str | Path, source: str | Path, option: str) -> None:
    """Refuse an output path that names the input it is made from (the same file, through links).

    Args:
        output: the output path; it may not exist yet.
        source: the input file.
        option: the option that named ``output`` (``"-o"``), for the message.

    Raises:
        OutputFileError: ``output`` is ``source``.

    Example:
        >>> import tempfile
        >>> model = tempfile.mkstemp(suffix=".onnx")[1]
        >>> refuse_input_as_output(model, model, "-o")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        edgeq.errors.OutputFileError: ...onnx: -o names the input file; give another path for the output
    """
    try:
        same = os.path.samefile(output, source)
    except OSError:  # one of them does not exist
        return
    if same:
        raise OutputFileError(f"{output}: {option} names the input file; give another path for the output")


def make_folder(path: str | Path) -> Path:
    """Create the folder ``path`` and its parents if missing, like ``mkdir -p``.

    Raises:
        OutputFileError: it cannot be created (a file is in the way, no permission, ...), saying why.

    Example:
        >>> import tempfile, pathlib
        >>> make_folder(pathlib.Path(tempfile.mkdtemp()) / "a" / "b").is_dir()
        True
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocker = next((p for p in [*reversed(path.parents), path] if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is {_kind(blocker.stat().st_mode)}, not a folder" if blocker else error.strerror
        raise OutputFileError(f"{path}: cannot create the folder: {reason}") from None
    return path


def refuse_non_file(path: str | Path) -> None:
    """Refuse an output path where something other than a regular file is (through symbolic links): writing would
    replace a folder, a device (``/dev/null``), a pipe or a socket by a file.

    Raises:
        OutputFileError: something other than a file is at ``path``.

    Example:
        >>> refuse_non_file("/dev/null")
        Traceback (most recent call last):
        ...
        edgeq.errors.OutputFileError: /dev/null: a character device is there, not a file; give the path of a file to write
    """  # noqa: W505 (a doctest's output)
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:  # nothing there (or unreachable: creating the file will say why)
        return
    if not stat.S_ISREG(mode):
        raise OutputFileError(f"{path}: {_kind(mode)} is there, not a file; give the path of a file to write")


def _new_file_mode(path: Path) -> int:
    """The permissions for the file written at ``path``: those of the file it replaces, else those ``open`` gives a
    new file (0o666 less the umask; a temporary file has 0o600)."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


def _write_error(path: Path, temporary: str, error: BaseException) -> OutputFileError | None:
    """``error`` as an :class:`OutputFileError` naming ``path`` when it is an OS error in writing ``temporary`` or
    renaming it to ``path`` (the error names one of them, or no file at all, as a full disk does); None for any
    other error, edgeq's own included."""
    if not isinstance(error, OSError) or isinstance(error, EdgeqError):
        return None
    names = {os.fspath(name) for name in (error.filename, error.filename2) if name is not None}
    if names - {temporary, os.fspath(path)}:
        return None
    return OutputFileError(f"{path}: cannot write: {error.strerror or error}")


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure delete it. The folder
    of ``path`` is created with its parents if missing (:func:`make_folder`).

    Raises:
        OutputFileError: ``path`` is a folder, a device, a pipe or a socket (left as it is), or the file cannot be
            written (no permission, a full disk, ...), naming ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "new" / "out.txt"
        >>> with atomic_write(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    path = Path(path)
    refuse_non_file(path)
    make_folder(path.parent)
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    except OSError as error:
        raise OutputFileError(f"{path}: cannot write: {error.strerror}") from None
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, _new_file_mode(path))
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        failure = _write_error(path, temporary, error)
        if failure is not None:
            raise failure from None
        raise


CACHE_VARIABLE = "EDGEQ_CACHE_DIR"
"""Environment variable naming edgeq's cache folder (default ``~/.cache/edgeq``)."""


def cache_dir() -> Path:
    """edgeq's cache folder: measured CPU figures, tuning records (``$EDGEQ_CACHE_DIR``, default
    ``~/.cache/edgeq``)."""
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "edgeq")


def slug(text: str) -> str:
    """``text`` as a file name part: lower case, runs of other characters as one ``-``.

    Example:
        >>> slug("AMD EPYC 7B13 64-Core")
        'amd-epyc-7b13-64-core'
    """
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"
