"""LLVM's names as TVM's LLVM knows them: the triples edgeq builds for, CPU models and features, and the nearest
known names to a misspelt one (the checks of a target file's ``[llvm]`` section, :class:`edgeq.targets.LLVMCodegen`)."""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
from collections.abc import Iterator
from functools import cache

BUILD_ARCHITECTURES = ("x86_64", "aarch64")
"""The CPU architectures edgeq builds libraries for (and its runtimes are built for)."""
BUILDABLE_TRIPLE = re.compile(rf"^({'|'.join(BUILD_ARCHITECTURES)})(-[a-z0-9_]+)?-linux-gnu$")
"""An LLVM triple edgeq builds for: ``<architecture>[-<vendor>]-linux-gnu`` (Linux shared libraries)."""


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Discard what native code (LLVM's warnings) writes to the process's standard error meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@cache
def llvm_cpus(triple: str) -> tuple[str, ...]:
    """The CPU models LLVM (TVM's) knows for ``triple``, sorted."""
    import tvm  # on first use: importing edgeq.targets stays light (TVM takes seconds to load)

    return tuple(sorted(tvm.target.codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm", "mtriple": triple}))))


@cache
def llvm_knows_feature(triple: str, feature: str) -> bool:
    """Whether LLVM knows ``feature`` (no sign) for ``triple``: enabling it shows it among the CPU's features (an
    unknown one LLVM ignores, with a warning kept from the terminal)."""
    import tvm

    with _quiet_stderr():
        probe = tvm.target.Target({"kind": "llvm", "mtriple": triple, "mattr": [f"+{feature}"]})
        return bool(tvm.target.codegen.llvm_cpu_has_features(feature, probe))


@cache
def llvm_cpu_features(triple: str) -> tuple[str, ...]:
    """Every feature some CPU model of ``triple`` has, sorted: the names an unknown feature is compared with."""
    import tvm

    features: set[str] = set()
    for cpu in llvm_cpus(triple):
        features |= tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": cpu}))
    return tuple(sorted(features))


def nearest(name: str, known: tuple[str, ...]) -> str:
    """``(nearest: a, b, c)``: the known names closest to a misspelt ``name``, for a message."""
    close = difflib.get_close_matches(name, known, n=4, cutoff=0.6)
    return f"(nearest: {', '.join(close)})" if close else f"(none is close among the {len(known)} LLVM knows)"
