"""Which TVM kernel calls each op runs in: the calls the build's provenance traced (:mod:`.provenance`), checked
against the built Relax VM executable's.

The executable's instructions (``as_text()``) list, per region function, every kernel call with its arguments;
:func:`kernel_calls` reads them (the perf measurement times these calls). An op's calls are the indices of the
calls that compute it, or part of it, among its region's: one for an op in a kernel of its own or fused into
another op's, several for an op TVM builds from several kernels (a global average pool's sum and the kernel
requantizing it, a bilinear resize's gathers and weighted sums), none for a view (a reshape TVM makes a view).
The last of them writes its output, and its kernel is the op's kernel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tvm import relax

from edgeq.compile.provenance import KernelCalls
from edgeq.errors import CompileError

_CALL = re.compile(r"^\s*call\s+(\S+)\s+in:(.*?)\s+dst:")
_FUNCTION = re.compile(r"^@(\S+):$")


@dataclass(frozen=True)
class KernelCall:
    """One kernel call in a VM function: the kernel, and how many arguments the VM passes it (registers and
    constants, the output included)."""

    kernel: str
    arguments: int


def kernel_calls(text: str) -> dict[str, list[KernelCall]]:
    """The kernel calls of each VM function, in call order (VM built-ins and calls of other functions left out).

    Args:
        text: the executable's instructions (``as_text()`` of the built executable or of the loaded library).
    """
    raw = _instructions(text)
    return {
        function: [KernelCall(name, arguments) for name, arguments in instructions if not name.startswith("vm.") and name not in raw]
        for function, instructions in raw.items()
    }


def function_calls(text: str, function: str = "main") -> list[str]:
    """The VM functions ``function`` calls, in call order (``main``'s: the function running each region, in the
    order of the regions)."""
    raw = _instructions(text)
    return [name for name, _ in raw.get(function, []) if name in raw]


def _instructions(text: str) -> dict[str, list[tuple[str, int]]]:
    """The calls of each VM function: what is called, and how many arguments it takes."""
    raw: dict[str, list[tuple[str, int]]] = {}
    current: list | None = None
    for line in text.splitlines():
        function = _FUNCTION.match(line)
        if function:
            current = raw.setdefault(function.group(1), [])
            continue
        call = _CALL.match(line)
        if call and current is not None:
            current.append((call.group(1), len([a for a in call.group(2).split(",") if a.strip()])))
    return raw


def kernel_map(executable: relax.VMExecutable, traced: KernelCalls) -> dict[str, tuple[str, list[int]]]:
    """Each op that runs in a kernel call -> (the kernel writing its output, the indices of its calls among those
    of the function running its region), by op name.

    Args:
        executable: the built executable (a region runs the VM function of its name, or of an identical earlier
            region's).
        traced: the kernel calls the build's provenance traced, with their ops (:meth:`Provenance.kernel_calls`).

    Raises:
        CompileError: the traced calls of a region are not the executable's (a bug in edgeq's provenance).
    """
    built = kernel_calls(executable.as_text())
    placed: dict[str, tuple[str, list[int]]] = {}
    for region, (function, calls) in traced.items():
        kernels = [kernel for kernel, _ in calls]
        if kernels != [call.kernel for call in built.get(function, [])]:
            raise CompileError(
                f"{region}: the kernel calls traced through the build are not the executable's; this is a bug in edgeq's "
                "provenance (compile/provenance.py), please report it with the model"
            )
        indices: dict[str, list[int]] = {}
        for index, (_, ops) in enumerate(calls):
            for op in ops:
                indices.setdefault(op, []).append(index)
        placed.update((op, (kernels[found[-1]], found)) for op, found in indices.items())
    return placed
