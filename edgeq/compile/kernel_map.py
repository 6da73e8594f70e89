"""Which TVM kernel (PrimFunc) each op landed in, read from the built Relax VM executable.

After fusion TVM names a kernel after the primitive ops it fused, in order (``fused_conv2d_add_..._maximum``,
``max_pool2d``, ``sum``). Each region function calls its kernels in the order of the region's ops, so the ops
are matched to the calls in one pass: an op takes the next kernel whose name holds one of its op kind's
primitive names; an op TVM fuses into the kernel of its producer (an activation, a residual add, a reshape)
joins that kernel when the name says so; an op that needs no kernel (a reshape that is a view) gets none.
"""

from __future__ import annotations

import re

from tvm import relax

from edgeq.compile.compiled_graph import CompiledGraph

_PRIMITIVES: dict[str, tuple[str, ...]] = {
    "conv2d": ("conv2d",),
    "linear": ("matmul", "dense"),
    "add": ("add",),
    "relu": ("maximum", "clip", "relu"),
    "max_pool2d": ("max_pool2d",),
    "avg_pool2d": ("avg_pool2d", "conv2d", "sum"),
    "global_avg_pool2d": ("sum", "mean", "adaptive_avg_pool2d"),
    "concat": ("concatenate", "concat"),
    "reshape": ("reshape",),
    "transpose": ("transpose",),
    "upsample_nearest2d": ("repeat", "resize2d"),
    "split": ("split",),
    "slice": ("strided_slice",),
}
"""Names of the primitive (Relax / TIR) ops an edgeq op kind becomes, as they appear in kernel names."""

FUSED_FOLLOWERS = ("relu", "add", "reshape", "transpose")
"""Op kinds TVM fuses into the kernel that makes their input."""

VIEW_OPS = ("reshape",)
"""Op kinds that need no kernel of their own when TVM can make them a view."""

_CALL = re.compile(r"^\s*call\s+(\S+)\s+in:")
_FUNCTION = re.compile(r"^@(\S+):$")


def kernel_calls(text: str) -> dict[str, list[str]]:
    """The kernels each VM function calls, in call order (VM built-ins and calls of other functions left out).

    Args:
        text: the executable's instructions (``as_text()`` of the built executable or of the loaded library).
    """
    calls: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        function = _FUNCTION.match(line)
        if function:
            current = calls.setdefault(function.group(1), [])
            continue
        call = _CALL.match(line)
        if call and current is not None and not call.group(1).startswith("vm."):
            current.append(call.group(1))
    functions = set(calls)
    return {name: [k for k in kernels if k not in functions] for name, kernels in calls.items()}


def _holds(kernel: str, op: str) -> bool:
    return any(re.search(rf"(^|_){name}\d*(_|$)", kernel) for name in _PRIMITIVES.get(op, ()))


def op_calls(calls: dict[str, list[str]], graph: CompiledGraph) -> dict[str, tuple[str, int]]:
    """Which kernel call each op of ``graph`` runs in: (region, index in the region's calls), by op name.

    Args:
        calls: the kernels each region calls, in order (:func:`kernel_calls`, or a profile of a run).
        graph: the compiled graph.
    """
    placed: dict[str, tuple[str, int]] = {}
    for region in graph.regions:
        kernels = calls.get(region.name, [])
        cursor = 0
        for name in region.ops:
            op = graph.op(name)
            made_by = [placed[p][1] for t in op.inputs if (p := graph.tensors[t].producer) in placed and placed[p][0] == region.name]
            last = max(made_by, default=None)
            if op.op in FUSED_FOLLOWERS and last is not None and last == cursor - 1 and _holds(kernels[last], op.op):
                placed[name] = (region.name, last)
                continue
            end = cursor + 1 if op.op in VIEW_OPS else len(kernels)
            found = next((i for i in range(cursor, end) if op.op not in _PRIMITIVES or _holds(kernels[i], op.op)), None)
            if found is not None:
                placed[name] = (region.name, found)
                cursor = found + 1
    return placed


def kernel_map(executable: relax.VMExecutable, graph: CompiledGraph) -> dict[str, str]:
    """The kernel of every op of ``graph`` that has one, by op name (each region is a VM function of its name)."""
    calls = kernel_calls(executable.as_text())
    return {name: calls[region][index] for name, (region, index) in op_calls(calls, graph).items()}
