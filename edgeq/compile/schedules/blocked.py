"""Default schedules of edgeq's blocked int8 kernels (:mod:`edgeq.compile.kernels`): conv2d (regular and 1x1),
depthwise conv2d and dense.

Each output tile (one channel block x up to 8 output columns) is accumulated in registers: the channel lanes
by the CPU's dot product (tensorized) or by LLVM's vectors, the columns unrolled. The requantization epilogue is
inlined into the last block and computed per tile, right after its accumulator, so no full-size int32 or int64
buffer remains. Tiles of rows and channel blocks run in parallel.
"""

from __future__ import annotations

from tvm import s_tir

from edgeq.compile import intrinsics, kernels
from edgeq.compile.cpu_features import DotProduct
from edgeq.compile.schedules.generic import inline_epilogue, parallel_outer

MAX_TILE = 8
"""Output columns accumulated together (register tile)."""


def _tile(width: int) -> int:
    return next(t for t in range(min(MAX_TILE, width), 0, -1) if width % t == 0)


def _extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int:
    return int(sch.get(loop).extent)


def _epilogue_at(sch: s_tir.Schedule, last: s_tir.schedule.SBlockRV, tile_loop: s_tir.schedule.LoopRV, parallel: bool) -> None:
    """The (inlined) epilogue computed per tile, right after its accumulator."""
    try:
        sch.reverse_compute_at(last, tile_loop)
    except s_tir.ScheduleError:
        if parallel:
            parallel_outer(sch, last)


def _parallel(sch: s_tir.Schedule, outer: list, parallel: bool) -> None:
    """The tile loops and the packing stage in parallel."""
    if parallel:
        sch.parallel(sch.fuse(*outer))
        parallel_outer(sch, sch.get_sblock(kernels.PACK), 3)


def schedule_conv2d(sch: s_tir.Schedule, dot: DotProduct, parallel: bool) -> None:
    """Regular and 1x1 convolutions: ``[b, o, y, x, lane] += source[.., depth] x weights[o, .., lane, depth]``."""
    conv = sch.get_sblock(kernels.CONV)
    last = inline_epilogue(sch, conv)
    b, o, y, x, lane, rc, ry, rx, rk = sch.get_loops(conv)
    xo, xi = sch.split(x, [None, _tile(_extent(sch, x))])
    if dot.intrinsic is None:
        sch.reorder(b, o, y, xo, rc, ry, rx, rk, xi, lane)
        sch.vectorize(lane)
    else:
        sch.reorder(b, o, y, xo, rc, ry, rx, xi, lane, rk)
    sch.unroll(xi)
    _epilogue_at(sch, last, xo, parallel)
    _parallel(sch, [b, o, y], parallel)
    init = sch.decompose_reduction(conv, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    if dot.intrinsic is not None:
        sch.tensorize(lane, intrinsics.registered(dot.intrinsic))


def schedule_depthwise(sch: s_tir.Schedule, dot: DotProduct, parallel: bool) -> None:
    """Depthwise convolutions: channels on the vector lanes, int16 products widened to int32."""
    conv = sch.get_sblock(kernels.DEPTHWISE)
    last = inline_epilogue(sch, conv)
    b, o, y, x, lane, ry, rx = sch.get_loops(conv)
    xo, xi = sch.split(x, [None, _tile(_extent(sch, x))])
    sch.reorder(b, o, y, xo, ry, rx, xi, lane)
    sch.vectorize(lane)
    sch.unroll(xi)
    _epilogue_at(sch, last, xo, parallel)
    _parallel(sch, [b, o, y], parallel)
    init = sch.decompose_reduction(conv, ry)
    sch.vectorize(sch.get_loops(init)[-1])


def schedule_dense(sch: s_tir.Schedule, dot: DotProduct, parallel: bool) -> None:
    """Dense (matmul with constant weights): one output-channel block per tile."""
    dense = sch.get_sblock(kernels.DENSE)
    last = inline_epilogue(sch, dense)
    *lead, o, lane, rc, rk = sch.get_loops(dense)
    if dot.intrinsic is None:
        sch.reorder(*lead, o, rc, rk, lane)
        sch.vectorize(lane)
    else:
        sch.reorder(*lead, o, rc, lane, rk)
    _epilogue_at(sch, last, o, parallel)
    _parallel(sch, [*lead, o], parallel)
    init = sch.decompose_reduction(dense, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    if dot.intrinsic is not None:
        sch.tensorize(lane, intrinsics.registered(dot.intrinsic))
