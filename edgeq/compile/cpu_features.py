"""Which int8 dot product a CPU has, read from the LLVM target's features (never from a CPU's name).

| features | dot product | lanes x depth |
|---|---|---|
| x86 ``avx512vnni`` (+ ``avx512bw``) | ``vpdpbusd`` zmm, uint8 activations (``x + 128``, ``128·Σw`` folded out) | 16 x 4 |
| x86 ``avxvnni`` | ``vpdpbusd`` ymm, the same | 8 x 4 |
| x86 ``avx2`` | ``vpmaddwd`` on int8 widened to int16 (activations widened once, when packed) | 8 x 2 |
| aarch64 ``dotprod`` | ``sdot`` (depthwise: 4 taps of 4 channels) | 4 x 4 |
| anything else (NEON, SSE) | int32 multiply-add, vectorized by LLVM | 8 x 1 |

All of them are exact: int8 products summed in int32, no saturating intermediate.
"""  # noqa: W505 (a table's rows)

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.target.codegen import llvm_get_cpu_features, llvm_get_system_cpu, llvm_get_system_triple, target_has_features

from edgeq.compile import intrinsics


@dataclass(frozen=True)
class DotProduct:
    """How the int8 kernels multiply and accumulate on one CPU.

    Attributes:
        name: short name, shown in the kernel list (``vnni``, ``avx-vnni``, ``avx2-pmaddwd``, ``sdot``, ``plain``).
        lanes: output channels computed per instruction (the channel block of packed weights and accumulators).
        depth: input channels summed per lane and instruction (the inner block of packed inputs and weights).
        intrinsic: the tensor intrinsic the schedules tensorize with, or None to let LLVM vectorize.
        activations: the type the kernels pack int8 activations as for the instruction: ``int8``; ``uint8``
            (``x + 128``; the kernels subtract ``128·Σw`` per output channel, exact); ``int16`` (widened once when
            packed, so that the inner loop broadcasts pairs straight from memory).
        depthwise_lanes: channels per vector in depthwise kernels.
        depthwise_intrinsic: the tensor intrinsic of depthwise kernels (4 neighbouring taps per channel and
            instruction, activations as ``activations``), or None for int16 products vectorized by LLVM.
        registers: vector registers the kernels can use (32 with AVX-512 and on aarch64, 16 with AVX2).
    """

    name: str
    lanes: int
    depth: int
    intrinsic: str | None
    activations: str
    depthwise_lanes: int
    registers: int
    depthwise_intrinsic: str | None = None

    @property
    def unsigned_activations(self) -> bool:
        """The instruction takes ``x + 128`` as uint8 (see ``activations``)."""
        return self.activations == "uint8"


VNNI = DotProduct("vnni", 16, 4, intrinsics.VNNI_16x4, "uint8", 16, 32, intrinsics.VNNI_DEPTHWISE_16x4)
AVX_VNNI = DotProduct("avx-vnni", 8, 4, intrinsics.AVX_VNNI_8x4, "uint8", 8, 16, intrinsics.AVX_VNNI_DEPTHWISE_8x4)
AVX2 = DotProduct("avx2-pmaddwd", 8, 2, intrinsics.PMADDWD_8x2, "int16", 16, 16)
SDOT = DotProduct("sdot", 4, 4, intrinsics.SDOT_4x4, "int8", 4, 32, intrinsics.SDOT_DEPTHWISE_4x4)
PLAIN = DotProduct("plain", 8, 1, None, "int8", 8, 16)
DOT_PRODUCTS = {dot.name: dot for dot in (VNNI, AVX_VNNI, AVX2, SDOT, PLAIN)}
"""Every dot product by name (the compiled graph records the one a build used)."""

DOT_PRODUCT_FEATURES = ("avx512vnni", "avx512bw", "avxvnni", "avx2", "dotprod")
"""The LLVM features :func:`dot_product` chooses by."""


def host_target() -> tvm.target.Target:
    """This machine's CPU as LLVM sees it (triple and CPU name): the CPU a simulated build runs on."""
    return tvm.target.Target({"kind": "llvm", "mtriple": llvm_get_system_triple(), "mcpu": llvm_get_system_cpu()})


def dot_product_features(target: tvm.target.Target) -> list[str]:
    """Which of :data:`DOT_PRODUCT_FEATURES` the LLVM ``target`` has."""
    return [feature for feature in DOT_PRODUCT_FEATURES if target_has_features(feature, target)]


def dot_product(target: tvm.target.Target) -> DotProduct:
    """The exact int8 dot product the LLVM ``target`` has (see the module's table)."""
    arch = str(target.attrs.get("mtriple", "")).split("-")[0]

    def has(*features: str) -> bool:
        return all(target_has_features(f, target) for f in features)

    if arch == "x86_64":
        if has("avx512vnni", "avx512bw"):
            return VNNI
        if has("avxvnni"):
            return AVX_VNNI
        if has("avx2"):
            return AVX2
    if arch == "aarch64" and has("dotprod"):
        return SDOT
    return PLAIN


LIBRARY_FEATURES = {
    "x86_64": {
        "sse4.1": "sse4_1", "sse4.2": "sse4_2", "ssse3": "ssse3", "popcnt": "popcnt", "avx": "avx", "avx2": "avx2",
        "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "lzcnt": "abm", "movbe": "movbe",
        "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512cd": "avx512cd", "avx512dq": "avx512dq",
        "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avx512vbmi": "avx512vbmi", "avxvnni": "avx_vnni",
        "avx512ifma": "avx512ifma", "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg",
        "avx512vpopcntdq": "avx512_vpopcntdq", "avx512fp16": "avx512_fp16", "avx512bf16": "avx512_bf16",
        "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq",
        "sse4a": "sse4a", "fma4": "fma4", "xop": "xop", "tbm": "tbm",  # AMD only (Zen: sse4a; Bulldozer: all four)
    },
    "aarch64": {
        "neon": "asimd", "dotprod": "asimddp", "i8mm": "i8mm",
        "fullfp16": "fphp",  # scalar and, with NEON, vector half floats (a CPU with asimd and fphp has asimdhp)
        "sve": "sve", "sve2": "sve2", "bf16": "bf16",
    },
}
"""Per architecture, the LLVM features an artifact's manifest records (``library.cpu_features``), each in Linux's
``/proc/cpuinfo`` spelling, which both runtimes check at load (docs/artifact.md, "CPU features"): every feature whose
instructions LLVM may emit in generated code for the CPUs of a target (its ``mcpu`` and ``mattr``), so that a library
built for another CPU is refused by name instead of dying of SIGILL. Left out: features LLVM emits only for intrinsics
or atomics edgeq's kernels do not use (AES, SHA, AMX, RDRAND, CMPXCHG16B, LSE, ...), those every CPU of the
architecture has (SSE2, CMOV) and those every CPU with a listed one has (SSE3 with SSSE3)."""


def library_features(target: tvm.target.Target) -> list[str]:
    """The CPU features (``/proc/cpuinfo`` names, sorted) a library built for the LLVM ``target`` may use: those of
    :data:`LIBRARY_FEATURES` its CPU and ``mattr`` enable."""
    arch = str(target.attrs.get("mtriple", "")).split("-")[0]
    names = LIBRARY_FEATURES.get(arch, {})
    return sorted(names[feature] for feature in llvm_get_cpu_features(target) if feature in names)
