"""Default schedules of edgeq's blocked int8 kernels (:mod:`edgeq.compile.kernels`): conv2d (regular and 1x1),
depthwise conv2d and dense.

Each output tile (channel blocks x output columns; by default :func:`default_blocks` x up to 8 columns) is
accumulated in registers: the channel lanes by the CPU's dot product (tensorized) or by LLVM's vectors, blocks and
columns unrolled. The requantization epilogue is inlined into the last block and computed per tile, right after its
accumulator, so no full-size int32 or int64 buffer remains (a table activation's lookup follows it per tile, apart:
:func:`_apart_from_lookup`). Tiles of rows and channel blocks run in parallel.

The tile's size, the order of the tile loops and where the input is packed are decisions (:mod:`.choices`):
fixed in the default schedules, sampled in the tuner's search space (``edgeq tune``).
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx

from edgeq.compile import intrinsics, kernels
from edgeq.compile.cpu_features import DotProduct
from edgeq.compile.schedules.choices import DEFAULT, Choices, LoopRV
from edgeq.compile.schedules.generic import inline_epilogue, parallel_outer, rows_columns

MAX_TILE = 8
"""Output columns accumulated together by the default schedules (register tile): enough independent accumulators
to hide the latency of the multiply-add."""

REDUCTION_UNROLL = 4
"""Input-channel steps (``depth`` channels each) of a 1x1 convolution unrolled together, where they divide the
steps: the loop's overhead and the blocked input's address arithmetic are paid once per 4 steps. Measured here
(AVX2, paired A/B): mobilenet_v2 and its ONNX Runtime file 0.92x the time; 8 steps no better; 3x3 convolutions
(steps inside the kernel window) 1.07x slower, so they keep one."""

MAX_SAMPLED_COLUMNS = 16
"""Output columns of a register tile the tuner may try."""

MAX_SAMPLED_BLOCKS = 4
"""Channel blocks of a register tile the tuner may try (the default computes one)."""

CHANNELS_OUTER, ROWS_OUTER = 0, 1
"""Orders of the parallel tile loops: channel blocks outside the rows (each core streams the input past one block
of weights) or rows outside the channel blocks (each input row is reused by every block). The default: rows
outside for 1x1 convolutions whose input outweighs their weights, channels outside for the others. Measured here
(AVX2, whole models, paired A/B): rows outside made mobilenet_v2 0.92-0.94x the time (its 1x1 projections over
144-576 channels 0.73-0.84x) and resnet18, whose time is in 3x3 convolutions, 1.10x. Where the weights outweigh
the input (mobilenet_v2's last 1x1 convolution, 320 -> 1280 channels at 7x7: 410 kB of weights), rows outside
make every core read all of them for each of its rows: channels outside, measured here (AVX-512 VNNI, paired
A/B), mobilenet_v3_small 0.95x, mobilenet_v2's ONNX Runtime file 0.98x, resnet18's file 1.0x."""


WHOLE_REDUCTION, REDUCTION_IN_CHUNKS = 0, 1
"""How a convolution's tiles meet its reduction: each tile sums over all its input channels (all its channel
blocks' weights pass through the cache for each tile), or the input channels go in chunks, outside the rows: a
chunk's weights (:data:`CHUNK_WEIGHT_BYTES`) stay in the L1 cache while every row of the channel blocks takes its
part of the sum, the accumulators kept in a buffer of the blocks' rows (the epilogue then runs after them). The
default: chunks where the weights outweigh the input, the channel blocks are outside the rows and make at least
:data:`CHUNKED_TILES` tiles. Measured here (AVX-512 VNNI, paired A/B, bit-identical): resnet18's ONNX Runtime file
0.96-0.98x the time, its 3x3 convolutions over 256 and 512 channels 0.86-0.95x (weights of 590 kB and 2.4 MB for
inputs of 50 and 25 kB)."""

CHUNKED_TILES = 8
"""Tiles of channel blocks a convolution needs for its default schedule to sum in chunks: those are then its only
parallel iterations (the rows are inside them)."""

CHUNK_WEIGHT_BYTES = 24 * 1024
"""Bytes of weights a tile's chunk of input channels may take (:data:`REDUCTION_IN_CHUNKS`): half a 48 kB L1 data
cache. Measured here (resnet18's ONNX Runtime file, AVX-512 VNNI: a chunk of 64 channels is 18 kB for two blocks
of 16), chunks of 32 and 128 channels were slower (0.98x and 1.0x the time of whole sums; 64: 0.96x)."""


def _chunk_steps(sch: s_tir.Schedule, conv: s_tir.schedule.SBlockRV, rc: LoopRV, blocks: int) -> int | None:
    """Reduction steps (of ``depth`` input channels) of the largest chunk whose weights for a tile of ``blocks``
    channel blocks fit :data:`CHUNK_WEIGHT_BYTES` and that divides the steps; None where all of them fit."""
    weights = sch.get(conv).reads[1].source  # [O/lanes, C/depth, KH, KW, lanes, depth]
    per_step = blocks * _bytes(weights) // (int(weights.shape[0]) * int(weights.shape[1]))
    steps = _extent(sch, rc)
    if steps * per_step <= CHUNK_WEIGHT_BYTES:
        return None
    return max((c for c in range(1, steps) if steps % c == 0 and c * per_step <= CHUNK_WEIGHT_BYTES), default=None)


def default_blocks(dot: DotProduct) -> int:
    """Output-channel blocks of a convolution's default register tile: 2 where the CPU has 32 vector registers
    (AVX-512, aarch64), so that each broadcast input feeds two dot products; 1 with 16 (AVX2, where a 2-block tile
    ran slower). Measured here (AVX-512 VNNI, paired A/B): resnet18 and its ONNX Runtime file 0.83x the time,
    mobilenet_v2's file 0.97x; 4 blocks spilled (1.11x); depthwise tiles, already 2-4 vectors wide, kept 1 (no
    difference)."""
    return 2 if dot.registers >= 32 else 1


def default_tile(width: int, avoid: int | None = None) -> int:
    """Output columns of the default schedules' register tile for an output ``width``: the largest divisor of the
    width up to :data:`MAX_TILE`, other than ``avoid`` (unless it is the only one)."""
    divisors = [t for t in range(min(MAX_TILE, width), 0, -1) if width % t == 0]
    return next((t for t in divisors if t != avoid), divisors[0])


def _extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int:
    return int(sch.get(loop).extent)


def _epilogue_at(sch: s_tir.Schedule, last: s_tir.schedule.SBlockRV, tile_loop: s_tir.schedule.LoopRV, parallel: bool) -> bool:
    """The (inlined) epilogue computed per tile, right after its accumulator; False when it cannot be.

    Its loops over the tile are kept when their extent is 1 (a tile of one column or one channel block), so that
    they are as many whatever the tile: the tuner replays a schedule's trace with other tile sizes, and a trace
    that names the epilogue's loops needs the same number of them (TVM stops the whole search otherwise).
    """
    if _broadcasts(sch, last):
        _vectorize_broadcast(sch, last, parallel)
        return False
    try:
        sch.reverse_compute_at(last, tile_loop, preserve_unit_loops=True)
    except s_tir.ScheduleError:
        if parallel:
            parallel_outer(sch, last)
        return False
    return True


def _vectorize_broadcast(sch: s_tir.Schedule, last: s_tir.schedule.SBlockRV, parallel: bool) -> None:
    """An epilogue broadcasting a per-channel result (:func:`_broadcasts`) vectorized along its output's innermost
    axis: a blocked output's channels (the block iterating over a block's channels innermost, where they fill whole
    blocks), an NCHW output's columns; its outer loops in parallel. Left in its NCHW loop order, it stored a blocked
    output byte by byte, 16 bytes apart, with scalar arithmetic. Measured here (AVX-512 VNNI, paired A/B,
    bit-identical): mobilenet_v3_small 0.98x the CPU time on 1 thread, within the noise on 2."""
    block = _output_block(sch, last)
    loops = sch.get_loops(last)
    if block is not None and len(loops) == 4 and int(sch.get(loops[1]).extent) % block == 0:
        index = tirx.IndexMap.from_func(lambda n, c, h, w: [n, c // block, h, w, c % block], ndim=4)
        sch.transform_block_layout(last, index)
        loops = sch.get_loops(last)
    sch.vectorize(loops[-1])
    if parallel:
        parallel_outer(sch, last, len(loops) - 2)


def _broadcasts(sch: s_tir.Schedule, last: s_tir.schedule.SBlockRV) -> bool:
    """Whether the kernel's output has more rows and columns than its accumulator: an epilogue that broadcasts a
    per-channel result over another tensor (squeeze-and-excitation's scaling, fused after its last convolution and
    its lookup-table activation) runs after the accumulation, not per tile."""
    accumulators = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint in (kernels.CONV, kernels.DEPTHWISE)]
    return bool(accumulators) and rows_columns(sch, last) != rows_columns(sch, accumulators[0])


COLUMNS_ON_LANES, CHANNELS_ON_LANES = 0, 1
"""What a convolution's epilogue computes on the vector lanes (its two loops over the tile): a channel's output
columns (the default for an NCHW output: contiguous int8 stores, the int32 accumulators gathered per channel), or a
column's channels (the accumulators read as they lie; the default for a blocked output, where the stores are
contiguous too; for an NCHW output they are scattered over the channels' planes). On NCHW outputs, measured here
on whole models, neither wins everywhere (channels: resnet18 and mobilenet_v2 about 5-8 % faster,
mobilenet_v3_small a few % slower), so the tuner decides per kernel."""


def _output_block(sch: s_tir.Schedule, last: s_tir.schedule.SBlockRV) -> int | None:
    """Channels per block of the kernel's output where the layout plan stores it in blocks
    (:mod:`edgeq.compile.layout_plan`); None for NCHW."""
    write = sch.get(last).writes[0]
    return int(write.source.shape[-1]) if len(write.region) == 5 else None


def _blocked_output(sch: s_tir.Schedule, last: s_tir.schedule.SBlockRV) -> bool:
    return _output_block(sch, last) is not None


def _epilogue_lanes(sch: s_tir.Schedule, last: s_tir.schedule.SBlockRV, tile_loop: LoopRV, choose: Choices, channels_last: bool = False) -> None:
    """The epilogue's channels on the vector lanes, where ``choose`` says so (see :data:`CHANNELS_ON_LANES`). Its
    loops over the tile are one per output axis (:func:`_epilogue_at` keeps the unit ones): batch, channels, row,
    columns. A blocked output takes vectors of one block's channels (a depthwise tile spans two blocks of AVX2's:
    as one vector, its stores were scattered byte by byte). ``channels_last``: the epilogue writes an NHWC buffer
    (a lookup table's indices, :func:`_apart_from_lookup`), channels on the lanes by default too."""
    block = _output_block(sch, last)
    lanes = choose.pick(sch, 2, COLUMNS_ON_LANES if block is None and not channels_last else CHANNELS_ON_LANES)
    if lanes == CHANNELS_ON_LANES:
        loops = sch.get_loops(last)
        tile = loops[[sch.get(loop).same_as(sch.get(tile_loop)) for loop in loops].index(True) + 1 :]
        if len(tile) == 5:  # a blocked output with padded channels iterates over its blocks (layout_plan)
            *_, channels = tile
        else:
            _, channels, _, columns = tile
            sch.reorder(columns, channels)
        if block is not None and _extent(sch, channels) > block:
            channels = sch.split(channels, [None, block])[1]
        sch.vectorize(channels)


def _epilogue_blocks(sch: s_tir.Schedule, reduction: s_tir.schedule.SBlockRV) -> tuple[s_tir.schedule.SBlockRV, s_tir.schedule.SBlockRV | None]:
    """The epilogue inlined into the block computing the kernel's output, and None; for a kernel ending in a lookup
    table (a table activation, :func:`edgeq.compile.kernels.lookup`), inlined into the block computing the table's
    int8 indices instead, and the lookup (see :func:`_apart_from_lookup`)."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    last = sch.get(blocks[-1])
    if last.name_hint != kernels.LOOKUP or len(blocks) < 2:
        return inline_epilogue(sch, reduction), None
    indices = sch.get(blocks[-2]).writes[0].source
    reads_indices = any(region.source.same_as(indices) for region in last.reads)
    if not reads_indices or len(indices.shape) != 4 or len(last.iter_vars) != 4:  # 5: padded blocks (as inlined)
        return inline_epilogue(sch, reduction), None
    return inline_epilogue(sch, reduction, keep=2), sch.get_child_blocks(sch.get_sblock("root"))[-1]


def _apart_from_lookup(
    sch: s_tir.Schedule, indices: s_tir.schedule.SBlockRV, lookup: s_tir.schedule.SBlockRV, tile_loop: LoopRV | None, parallel: bool
) -> None:
    """A lookup table read per tile after the epilogue that computes its indices into an NHWC buffer, its channels
    unrolled; ``tile_loop`` None: the epilogue is not computed per tile, nor is the lookup.

    Inlined into a vectorized epilogue, the table read took the vector of indices apart lane by lane (an extract and
    an insert per value, both on the one port that shuffles vectors); apart, the epilogue stores its int8 indices as
    one vector per column and the lookup reads them and the table with scalar loads, which other ports serve.
    Measured here (AVX-512 VNNI, Intel Xeon, paired A/B in one process, bit-identical): mobilenet_v3_small, whose
    Hardswish and Hardsigmoid are tables, 0.90x the CPU time on 1 and 2 threads; 200,704 lookups alone 0.43x (a
    scalar loop not unrolled: 1.03x)."""
    sch.transform_layout(indices, ("write", 0), lambda n, c, h, w: [n, h, w, c])
    if tile_loop is None:
        if parallel:
            parallel_outer(sch, lookup)
        return
    sch.reverse_compute_at(lookup, tile_loop, preserve_unit_loops=True)
    loops = sch.get_loops(lookup)
    tile = loops[[sch.get(loop).same_as(sch.get(tile_loop)) for loop in loops].index(True) + 1 :]
    if len(tile) == 4:  # (batch, channels, row, columns); a blocked output with padded channels iterates over its blocks
        _, channels, _, columns = tile
        sch.reorder(columns, channels)
    sch.unroll(sch.get_loops(lookup)[-1])


def _place_epilogue(
    sch: s_tir.Schedule, last: s_tir.schedule.SBlockRV, lookup: s_tir.schedule.SBlockRV | None, tile_loop: LoopRV, parallel: bool, choose: Choices
) -> None:
    """The epilogue per tile where it can be (:func:`_epilogue_at`), its lanes as ``choose`` says, and a lookup
    table's read after it (:func:`_epilogue_blocks`)."""
    placed = _epilogue_at(sch, last, tile_loop, parallel)
    if lookup is not None:
        _apart_from_lookup(sch, last, lookup, tile_loop if placed else None, parallel)
    if placed:
        _epilogue_lanes(sch, last, tile_loop, choose, channels_last=lookup is not None)


PACK_FIRST, PACK_PER_TILE = 0, 1
"""Where the input is packed: all of it before the convolution, or the rows each tile loop iteration reads,
inside it (the packed rows stay in cache; rows shared by neighbouring tiles are packed again). With rows outside
the channel blocks, an iteration is a row and all its blocks, which share the packed row. Packing first is a
parallel region of its own: a loop of empty parallel regions took about 3.6 us a region here (2 cores, TVM's pool
waking its worker and waiting for it), and packing was 20 of mobilenet_v2's 106 regions per inference. So 1x1
convolutions with rows outside pack per row by default (no row is packed twice): measured here (AVX-512 VNNI, paired
A/B), mobilenet_v2 0.95x and its ONNX Runtime file 0.96x the time, mobilenet_v3_small 0.99x. Depthwise convolutions
pack per tile too, their rows cut in :data:`ROW_CHUNKS` parts (only the window's overlap, 2 rows of 56 for a 3x3, is
packed twice; row by row, each row three times, ran slower): mobilenet_v2 and its ONNX Runtime file 0.92x the time,
mobilenet_v3_small 0.99x. Other convolutions pack first (a tile of channel blocks over a chunk of rows reads all
input channels: every block would pack them)."""


def _parallel(sch: s_tir.Schedule, outer: list, parallel: bool, choose: Choices, rows_outer: bool = False, default_pack: int = PACK_FIRST) -> None:
    """The tile loops (fused) in parallel, and the packing stage where ``choose`` puts it (see :data:`PACK_FIRST`);
    ``rows_outer``: ``outer`` ends with the channel blocks, inside the rows."""
    per_tile = choose.pick(sch, 2, default_pack) == PACK_PER_TILE
    tiles = sch.fuse(*(outer[:-1] if per_tile and rows_outer else outer))
    if parallel:
        sch.parallel(tiles)
    pack = sch.get_sblock(kernels.PACK)
    if per_tile:
        sch.compute_at(pack, tiles, preserve_unit_loops=True)  # as many loops whatever the tile (see _epilogue_at)
    elif parallel:
        parallel_outer(sch, pack, 3)
    _vectorize_blocked_pack(sch, pack)


def _vectorize_blocked_pack(sch: s_tir.Schedule, pack: s_tir.schedule.SBlockRV) -> None:
    """A packing stage that reads a blocked input (:mod:`edgeq.compile.layout_plan`) copies a block's channels as
    one vector: its channel loop is split into runs of the input's blocks, each vectorized. Left alone, LLVM
    gathered them byte by byte wherever the packed blocks are wider than the input's (a depthwise kernel's 32
    lanes over 16-channel blocks with VNNI: the packing took most of the kernel's time)."""
    source = sch.get(pack).reads[0].source
    if len(source.shape) != 5:
        return
    block = int(source.shape[-1])
    channels = sch.get_loops(pack)[-1]
    if _extent(sch, channels) > block:
        channels = sch.split(channels, [None, block])[1]
    sch.vectorize(channels)


def _register_tile(
    sch: s_tir.Schedule, o: LoopRV, x: LoopRV, lane: LoopRV, blocked: bool, choose: Choices, blocks: int = 1
) -> tuple[list[LoopRV], list[LoopRV]]:
    """Channel blocks ``o`` and columns ``x`` split into (outer, inner) loops; the inner ones form the tile (by
    default ``blocks`` channel blocks, or one where they do not divide ``o``).

    A kernel with a ``blocked`` output avoids square default tiles (as many columns as ``lane`` has channels): LLVM's
    SLP vectorizer transposes a square tile of accumulators around the epilogue, and back for the stores (76
    shuffles per 8 x 8 tile on AVX2); measured here, mobilenet_v2's 1x1 convolutions over 112 and 56 columns ran
    about 15 % faster with 7 columns than with 8, the whole model 2-3 %."""
    outer_inner_blocks = choose.split(sch, o, MAX_SAMPLED_BLOCKS, blocks if _extent(sch, o) % blocks == 0 else 1)
    avoid = _extent(sch, lane) if blocked else None
    columns = choose.split(sch, x, MAX_SAMPLED_COLUMNS, default_tile(_extent(sch, x), avoid))
    return outer_inner_blocks, columns


def _bytes(buffer: tirx.Buffer) -> int:
    return math.prod(int(d) for d in buffer.shape) * tvm.DataType(buffer.dtype).bits // 8


def _weights_outweigh_input(sch: s_tir.Schedule, conv: s_tir.schedule.SBlockRV) -> bool:
    """Whether a convolution's packed weights take more bytes than its packed input."""
    packed_input, weights = (region.source for region in sch.get(conv).reads)
    return _bytes(weights) > _bytes(packed_input)


def _tile_loops(sch: s_tir.Schedule, b: LoopRV, oo: LoopRV, y: LoopRV, choose: Choices, default: int = CHANNELS_OUTER) -> tuple[list[LoopRV], bool]:
    """The loops over tiles, in the chosen order (see :data:`CHANNELS_OUTER`), and whether the rows are outside."""
    rows_outer = choose.pick(sch, 2, default) == ROWS_OUTER
    return ([b, y, oo] if rows_outer else [b, oo, y]), rows_outer


def schedule_conv2d(sch: s_tir.Schedule, dot: DotProduct, parallel: bool, choose: Choices = DEFAULT) -> None:
    """Regular and 1x1 convolutions: ``[b, o, y, x, lane] += source[.., depth] x weights[o, .., lane, depth]``."""
    conv = sch.get_sblock(kernels.CONV)
    last, lookup = _epilogue_blocks(sch, conv)
    b, o, y, x, lane, rc, ry, rx, rk = sch.get_loops(conv)
    (oo, oi), (xo, xi) = _register_tile(sch, o, x, lane, _blocked_output(sch, last if lookup is None else lookup), choose, default_blocks(dot))
    pointwise = _extent(sch, ry) == _extent(sch, rx) == 1
    outer, rows_outer = _tile_loops(sch, b, oo, y, choose, ROWS_OUTER if pointwise and not _weights_outweigh_input(sch, conv) else CHANNELS_OUTER)
    chunked = not rows_outer and _extent(sch, oo) >= CHUNKED_TILES and _weights_outweigh_input(sch, conv)
    in_chunks = choose.pick(sch, 2, REDUCTION_IN_CHUNKS if chunked else WHOLE_REDUCTION) == REDUCTION_IN_CHUNKS
    chunk = _chunk_steps(sch, conv, rc, _extent(sch, oi)) if in_chunks and not rows_outer else None
    if chunk is not None:  # the rows go inside the chunks (see REDUCTION_IN_CHUNKS)
        chunks, rc = sch.split(rc, [None, chunk])
        *outer, y = outer
    steps = REDUCTION_UNROLL if pointwise and _extent(sch, rc) % REDUCTION_UNROLL == 0 else 1
    rc, rci = sch.split(rc, [None, steps])
    reduction_start, tile_loops = (chunks, [chunks, y, xo, rc]) if chunk is not None else (rc, [xo, rc])
    if dot.intrinsic is None:
        sch.reorder(*outer, *tile_loops, ry, rx, rci, rk, oi, xi, lane)
        sch.vectorize(lane)
    else:
        sch.reorder(*outer, *tile_loops, ry, rx, rci, oi, xi, lane, rk)
    sch.unroll(rci)
    sch.unroll(oi)
    sch.unroll(xi)
    epilogue_loop = outer[-1] if chunk is not None else xo
    _place_epilogue(sch, last, lookup, epilogue_loop, parallel, choose)
    _parallel(sch, outer, parallel, choose, rows_outer, PACK_PER_TILE if pointwise and rows_outer else PACK_FIRST)
    init = sch.decompose_reduction(conv, reduction_start)
    sch.vectorize(sch.get_loops(init)[-1])
    if dot.intrinsic is not None:
        sch.tensorize(lane, intrinsics.registered(dot.intrinsic))


ROW_CHUNKS = 2
"""Parts a depthwise convolution's rows are cut into (where they divide them) for its parallel tile loops, each
packing its rows (see :data:`PACK_FIRST`): with the channel blocks, an even number of parallel iterations."""


def schedule_depthwise(sch: s_tir.Schedule, dot: DotProduct, parallel: bool, choose: Choices = DEFAULT) -> None:
    """Depthwise convolutions: channels on the vector lanes, each row's taps by the CPU's depthwise dot product
    (4 at once, tensorized) or by int16 products widened to int32 (one at a time, vectorized by LLVM)."""
    conv = sch.get_sblock(kernels.DEPTHWISE)
    last, lookup = _epilogue_blocks(sch, conv)
    b, o, y, x, lane, ry, *taps = sch.get_loops(conv)
    (oo, oi), (xo, xi) = _register_tile(sch, o, x, lane, _blocked_output(sch, last if lookup is None else lookup), choose)
    chunks = ROW_CHUNKS if _extent(sch, y) % ROW_CHUNKS == 0 else 1
    y_chunk, y = sch.split(y, [chunks, None])
    outer, rows_outer = _tile_loops(sch, b, oo, y_chunk, choose)
    tensorized = len(taps) == 2  # tap groups, taps of a group (kernels.depthwise_conv2d)
    if tensorized:
        sch.reorder(*outer, y, xo, ry, taps[0], oi, xi, lane, taps[1])
    else:
        sch.reorder(*outer, y, xo, ry, *taps, oi, xi, lane)
        sch.vectorize(lane)
    sch.unroll(oi)
    sch.unroll(xi)
    _place_epilogue(sch, last, lookup, xo, parallel, choose)
    _parallel(sch, outer, parallel, choose, rows_outer, PACK_PER_TILE)
    init = sch.decompose_reduction(conv, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    if tensorized:
        sch.tensorize(lane, intrinsics.registered(dot.depthwise_intrinsic))


def schedule_dense(sch: s_tir.Schedule, dot: DotProduct, parallel: bool, choose: Choices = DEFAULT) -> None:
    """Dense (matmul with constant weights): a tile of output-channel blocks per input load."""
    dense = sch.get_sblock(kernels.DENSE)
    last = inline_epilogue(sch, dense)
    *lead, o, lane, rc, rk = sch.get_loops(dense)
    oo, oi = choose.split(sch, o, MAX_SAMPLED_BLOCKS, 1)
    if dot.intrinsic is None:
        sch.reorder(*lead, oo, rc, rk, oi, lane)
        sch.vectorize(lane)
    else:
        sch.reorder(*lead, oo, rc, oi, lane, rk)
    sch.unroll(oi)
    _epilogue_at(sch, last, oo, parallel)
    _parallel(sch, [*lead, oo], parallel, choose)
    init = sch.decompose_reduction(dense, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    if dot.intrinsic is not None:
        sch.tensorize(lane, intrinsics.registered(dot.intrinsic))
