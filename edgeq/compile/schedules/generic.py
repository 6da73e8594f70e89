"""Schedules for kernels without a dot product: fused elementwise chains, pooling (windows outside the output
rows), TVM's convolutions (float ones) and anything else the default legalization made.

The fused requantization chain (FuseTIR leaves one block and one full-size int64 buffer per op) is inlined into
its last block; the outer spatial loops of what remains run in parallel. Inlining and loop order change where
values are computed, never how: results are identical.
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx


def inline_epilogue(sch: s_tir.Schedule, after: s_tir.schedule.SBlockRV | None = None, keep: int = 1) -> s_tir.schedule.SBlockRV:
    """Inline every block after ``after`` (every injective block if None) but the last ``keep`` into the blocks after
    them, except a per-channel result that a block broadcasts over rows and columns (:func:`feeds_a_broadcast`).

    Returns:
        The first block kept (by default the last block: the kernel's output).
    """
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    start = 0 if after is None else [sch.get(b).same_as(sch.get(after)) for b in blocks].index(True) + 1
    for block in blocks[start:-keep]:
        if not _is_reduction(sch, block) and not feeds_a_broadcast(sch, block):
            try:
                sch.compute_inline(block)
            except s_tir.ScheduleError:
                continue
    return sch.get_child_blocks(sch.get_sblock("root"))[-keep]


def rows_columns(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> list[int] | None:
    """The rows and columns of the NCHW (or ``NCHW{B}c``) tensor ``block`` writes; None for other ranks."""
    shape = sch.get(block).writes[0].source.shape
    return [int(d) for d in shape[2:4]] if len(shape) in (4, 5) else None


def feeds_a_broadcast(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    """Whether a block reading ``block``'s result writes more rows or columns than it (squeeze-and-excitation's
    scaling reads a per-channel result for every pixel). Inlined there, the chain that computes the per-channel
    result (a convolution's requantization, a table activation) is written for every pixel, and only LLVM's hoisting
    out of the pixel loops saves its cost; kept apart, it runs once per channel whatever the loops around it."""
    own = rows_columns(sch, block)
    if own is None:
        return False
    wider = [rows_columns(sch, consumer) for consumer in sch.get_consumers(block)]
    return any(other is not None and (other[0] > own[0] or other[1] > own[1]) for other in wider)


def _is_reduction(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    return any(var.iter_type == var.CommReduce for var in sch.get(block).iter_vars)


def parallel_outer(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, count: int = 2) -> None:
    """Run the outer ``count`` loops of ``block`` in parallel (fused); a block that refuses (a reduction loop among
    them) stays serial."""
    loops = sch.get_loops(block)[:count]
    if not loops:
        return
    try:
        sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])
    except s_tir.ScheduleError:
        return


PARALLEL_CHUNKS = 16
"""Parallel iterations the fused outer loops of a generic kernel make at least, where its loops allow: more than
the cores, so that chunks balance (a 3-channel input's outer two loops make 3: 2 to 1 on 2 cores)."""


def balanced_outer_loops(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> int:
    """How many outer loops of ``block`` :func:`parallel_outer` fuses: two, or more (never the innermost, which
    the CPU vectorizes) until they make :data:`PARALLEL_CHUNKS` iterations."""
    extents = [sch.get(loop).extent for loop in sch.get_loops(block)]
    count = min(2, len(extents))
    while count < len(extents) - 1 and all(isinstance(e, tirx.IntImm) for e in extents[:count]):
        if math.prod(int(e) for e in extents[:count]) >= PARALLEL_CHUNKS:
            break
        count += 1
    return count


POOL_BLOCKS = ("pool_max", "pool_sum", "pool_avg")
"""The reduction blocks of TVM's pooling kernels (their windows slide along the output's last axis)."""


def windows_outside_rows(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> None:
    """A pooling block with its window loops moved outside the output's last axis, and its initial value written
    by a block of its own: each window position updates a row of outputs, with no test for the first position
    (6x faster for resnet18's max pool here). A block that refuses keeps its loop order."""
    loops = sch.get_loops(block)
    kinds = [var.iter_type == var.CommReduce for var in sch.get(block).iter_vars]
    if len(loops) != len(kinds) or not any(kinds) or kinds[-1] is False:
        return
    spatial = [loop for loop, reduce in zip(loops, kinds) if not reduce]
    window = [loop for loop, reduce in zip(loops, kinds) if reduce]
    try:
        sch.reorder(*spatial[:-1], *window, spatial[-1])
        sch.decompose_reduction(block, window[0])
    except s_tir.ScheduleError:
        return


def schedule_generic(sch: s_tir.Schedule, parallel: bool) -> None:
    """Inline the injective chain into the last block, move pooling windows outside the output rows, then run every
    block's outer loops in parallel."""
    inline_epilogue(sch)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).name_hint in POOL_BLOCKS:
            windows_outside_rows(sch, block)
    if parallel:
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            parallel_outer(sch, block, balanced_outer_loops(sch, block))
