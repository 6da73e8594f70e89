"""The safe-name rule: every name that reaches a file system (artifact members, the files of inputs and outputs)
follows it, checked when compiling and again by both readers (docs/artifact.md). Its C++ twin is
``kSafeName`` in ``runtime/cpp/src/artifact.cc``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
"""A plain file name: no folder, no ``..``, no leading dot, at most 128 characters."""

_UNSAFE_CHARACTER = re.compile(r"[^A-Za-z0-9_.-]")


def is_safe_name(name: object) -> bool:
    """Whether ``name`` is a string following :data:`SAFE_NAME`.

    >>> is_safe_name("logits"), is_safe_name("../x"), is_safe_name(".hidden")
    (True, False, False)
    """
    return isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None


def safe_file_names(names: Iterable[str]) -> list[str]:
    """A distinct safe file name for each of ``names``: the name itself when it follows the rule, otherwise every
    other character becomes ``_``, leading dots and dashes are dropped, it is cut to the rule's length, and
    ``_2``, ``_3``, ... keep the names distinct.

    >>> safe_file_names(["logits", "../../pwned", "/conv/out:0", "", "logits"])
    ['logits', 'pwned', 'conv_out_0', 'tensor', 'logits_2']
    """
    chosen: list[str] = []
    for name in names:
        stem = _UNSAFE_CHARACTER.sub("_", name).lstrip("._-")[:120] or "tensor"
        candidate, copy = stem, 1
        while candidate in chosen:
            copy += 1
            candidate = f"{stem}_{copy}"
        chosen.append(candidate)
    return chosen
