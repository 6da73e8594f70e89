"""The one exception hierarchy of edgeq.

Every error that edgeq raises on purpose derives from :class:`EdgeqError`, so a caller (and the CLI) can
catch one type and print one line. Messages follow two shapes:

- for graph nodes: ``<op> '<node>': <rule>; got <actual> (allowed: <range>)``
- for files: ``<file>: <key path>: <problem>``
"""

from __future__ import annotations


class EdgeqError(Exception):
    """Base class of every error edgeq raises on purpose."""


class TargetError(EdgeqError):
    """A target name is unknown or a target file is malformed."""


class TraceError(EdgeqError):
    """Neither torch.fx nor torch.export could capture the model as a static graph edgeq reads."""


class UnsupportedOpError(EdgeqError):
    """A node in the quantized region has no integer implementation.

    Attributes:
        reason: why, without the node's name (``"padding_mode 'reflect' (allowed: 'zeros')"``).
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class QuantizationError(EdgeqError):
    """Quantization parameters are missing, inconsistent or outside the range the numerics allow."""


class ExportError(EdgeqError):
    """A model cannot be exported (an op or a value has no representation in the output format)."""


class ModelFileError(EdgeqError):
    """A model file is missing, unreadable, malformed, or its quantization is inconsistent."""


class InputFileError(EdgeqError):
    """An input path names no file, a folder, a device or a pipe, or a file this process may not read."""


class OutputFileError(EdgeqError, OSError):
    """An output cannot be written: its path names a folder, a device or the input, or the system refuses (no
    permission, a full disk, a file where a folder should be). Also an :class:`OSError`, so that code catching the
    system's write errors catches it too."""


class CompileError(EdgeqError):
    """A model cannot be compiled for the target (the message names the node and the op)."""


class TuneError(EdgeqError):
    """Tuning cannot start or go on (no tracker, no board with the key, nothing to tune)."""


def first_line(error: BaseException) -> str:
    """The first line of an error's text (its message without what follows it), or "" for an error without text."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
