"""edgeq's int8 dot-product tensor intrinsics, all exact (no saturating intermediate).

Each computes ``C[i] += sum_k A[k] * B[i, k]`` for ``i < lanes``, ``k < depth`` in int32: one activation group ``A``
broadcast against a ``lanes x depth`` block of weights ``B``. The depthwise ones compute
``C[i] += sum_k A[k, i] * B[i, k]``: every lane its own activations (``A``: 4 neighbouring columns of ``lanes``
channels, contiguous as a blocked input stores them; the taps are moved next to each other in registers).

- ``edgeq_vnni_16x4`` / ``edgeq_avxvnni_8x4``: ``vpdpbusd`` (AVX-512 VNNI / AVX-VNNI), uint8 activations. TVM's
  own ``dot_16x4_vnni`` passes ``int32`` operands that LLVM 22's verifier rejects; these pass bytes.
- ``edgeq_pmaddwd_8x2``: AVX2 ``vpmaddwd`` on int8 values widened to int16 (int16 pairs -> int32, exact); the
  activations come widened (packed as int16), the weights are widened here.
  Never ``vpmaddubsw``: its int16 sum saturates.
- ``edgeq_sdot_4x4``: aarch64 ``sdot`` (``+dotprod``), int8 x int8.
- ``edgeq_vnni_depthwise_16x4`` / ``edgeq_avxvnni_depthwise_8x4``: ``vpdpbusd`` on 4 taps per channel.
- ``edgeq_sdot_depthwise_4x4``: ``sdot`` on 4 taps of 4 channels (the 16 bytes of 4 columns of a ``NCHW4c`` block,
  transposed in a register).

They are registered on first use (:func:`registered`), not at import: parsing TVMScript is slow once torch is
loaded (TVM inspects the caller's stack), and importing ``tvm.s_tir.tensor_intrin`` for TVM's own intrinsics
parses hundreds of them, which costs minutes on a busy 2-core machine.
"""

from __future__ import annotations

from collections.abc import Callable

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

VNNI_16x4 = "edgeq_vnni_16x4"
AVX_VNNI_8x4 = "edgeq_avxvnni_8x4"
PMADDWD_8x2 = "edgeq_pmaddwd_8x2"
SDOT_4x4 = "edgeq_sdot_4x4"
VNNI_DEPTHWISE_16x4 = "edgeq_vnni_depthwise_16x4"
AVX_VNNI_DEPTHWISE_8x4 = "edgeq_avxvnni_depthwise_8x4"
SDOT_DEPTHWISE_4x4 = "edgeq_sdot_depthwise_4x4"


def _description(lanes: int, depth: int, a_dtype: str):
    @T.prim_func(s_tir=True)
    def description(
        A: T.Buffer((depth,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, depth), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:depth], B[0:lanes, 0:depth])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, depth):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return description


def _dot4(lanes: int, llvm_name: str, a_dtype: str):
    """An instruction adding dot products of 4 bytes into each int32 lane: ``vpdpbusd`` or ``sdot``."""
    bytes_ = lanes * 4

    @T.prim_func(s_tir=True)
    def implementation(
        A: T.Buffer((4,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], f"{a_dtype}x4"), dtype="int32"), lanes), dtype=f"{a_dtype}x{bytes_}")
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                C.vload([0], dtype=f"int32x{lanes}"),
                a,
                B.vload([0, 0], dtype=f"int8x{bytes_}"),
                dtype=f"int32x{lanes}",
            )

    return implementation


def _pmaddwd():
    """``vpmaddwd``: activations already widened to int16 (one pair broadcast from memory), weights widened here."""

    @T.prim_func(s_tir=True)
    def implementation(
        A: T.Buffer((2,), "int16", offset_factor=1),
        B: T.Buffer((8, 2), "int8", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:2], B[0:8, 0:2])
            T.writes(C[0:8])
            pair = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")
            a = T.reinterpret(T.broadcast(pair, 8), dtype="int16x16")
            b = T.Cast("int16x16", B.vload([0, 0], dtype="int8x16"))
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a, b, dtype="int32x8"
            )

    return implementation


def _depthwise(lanes: int, llvm_name: str, a_dtype: str, implementation: bool, one_load: bool = False):
    """The description (``implementation`` False) or the implementation of a depthwise dot product: ``vpdpbusd``
    or ``sdot`` over 4 taps of ``lanes`` channels, the taps, loaded as ``lanes`` channels each, interleaved so that
    each int32 lane holds its channel's 4 taps. ``one_load``: the 4 taps (contiguous: neighbouring columns of a
    block) are loaded as one vector, which ``sdot``'s 16 bytes are: loaded as four 4-byte vectors, which aarch64 has
    no register type for, LLVM assembled them byte by byte."""
    bytes_ = lanes * 4
    interleave = [tap * lanes + lane for lane in range(lanes) for tap in range(4)]
    loads = [(0, bytes_)] if one_load else [(tap, lanes) for tap in range(4)]  # (first tap, lanes of a vector load)

    @T.prim_func(s_tir=True)
    def intrinsic(
        A: T.Buffer((4, lanes), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4, 0:lanes], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            if implementation:
                taps = T.Shuffle([A.vload([row, 0], f"{a_dtype}x{width}") for row, width in loads], interleave)
                C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm_name),
                    C.vload([0], dtype=f"int32x{lanes}"),
                    taps,
                    B.vload([0, 0], dtype=f"int8x{bytes_}"),
                    dtype=f"int32x{lanes}",
                )
            else:
                for i in T.serial(0, lanes):
                    for k in T.serial(0, 4):
                        with T.sblock("update"):
                            vi, vk = T.axis.remap("SR", [i, k])
                            C[vi] = C[vi] + T.cast(A[vk, vi], "int32") * T.cast(B[vi, vk], "int32")

    return intrinsic


_BUILDERS: dict[str, Callable[[], tuple]] = {
    VNNI_16x4: lambda: (_description(16, 4, "uint8"), _dot4(16, "llvm.x86.avx512.vpdpbusd.512", "uint8")),
    AVX_VNNI_8x4: lambda: (_description(8, 4, "uint8"), _dot4(8, "llvm.x86.avx512.vpdpbusd.256", "uint8")),
    PMADDWD_8x2: lambda: (_description(8, 2, "int16"), _pmaddwd()),
    SDOT_4x4: lambda: (_description(4, 4, "int8"), _dot4(4, "llvm.aarch64.neon.sdot.v4i32.v16i8", "int8")),
    VNNI_DEPTHWISE_16x4: lambda: tuple(_depthwise(16, "llvm.x86.avx512.vpdpbusd.512", "uint8", impl) for impl in (False, True)),
    AVX_VNNI_DEPTHWISE_8x4: lambda: tuple(_depthwise(8, "llvm.x86.avx512.vpdpbusd.256", "uint8", impl) for impl in (False, True)),
    SDOT_DEPTHWISE_4x4: lambda: tuple(_depthwise(4, "llvm.aarch64.neon.sdot.v4i32.v16i8", "int8", impl, one_load=True) for impl in (False, True)),
}
_registered: set[str] = set()


def registered(name: str) -> str:
    """``name``, after registering its tensor intrinsic with TVM (once per process)."""
    if name not in _registered:
        TensorIntrin.register(name, *_BUILDERS[name]())
        _registered.add(name)
    return name


def register_all() -> None:
    """Register every intrinsic of edgeq's: reading schedule traces (tuning records) needs the ones they name."""
    for name in _BUILDERS:
        registered(name)
