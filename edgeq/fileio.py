"""Writing files so that a failure never leaves a half-written one."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgeq.errors import EdgeqError


def make_folder(path: str | Path) -> Path:
    """Create the folder ``path`` and its parents if missing, like ``mkdir -p``.

    Raises:
        EdgeqError: it cannot be created (a file is in the way, no permission, ...), saying why.

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
        reason = f"{blocker} is a file, not a folder" if blocker else error.strerror
        raise EdgeqError(f"{path}: cannot create the folder: {reason}") from None
    return path


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure delete it. The folder
    of ``path`` is created with its parents if missing (:func:`make_folder`).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "new" / "out.txt"
        >>> with atomic_write(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    path = Path(path)
    make_folder(path.parent)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
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
