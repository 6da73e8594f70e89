"""Target descriptions: hardware facts and rules read from ``targets/*.toml``.

No Python file names a target: code reads a :class:`Target`. Files are validated strictly on load (an unknown
key, a wrong type or a missing section is a :class:`~edgeq.errors.TargetError` naming the file and key path).
Units are part of the key names (``clock_hz``, ``sram_bytes``).

pydantic does the validation: it reports every problem with its key path, and the schema below doubles as
the documentation of the file format (``docs/targets.md``).
"""

from __future__ import annotations

import tomllib
from enum import Enum
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgeq.errors import TargetError
from edgeq.ops import OP_NAMES, Op, OpTable


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScaleRule(str, Enum):
    """Which scales a target accepts."""

    ANY = "any"
    """Any positive float32 scale; requantization uses a fixed-point multiplier."""
    POWER_OF_TWO = "power_of_two"
    """Scales are powers of two, rounded up (never clipping more); requantization is a pure rounding shift."""


class TargetKind(str, Enum):
    """What executes the model: a CPU alone, or an NPU beside a host CPU that runs what the NPU cannot."""

    CPU = "cpu"
    NPU = "npu"


class LLVMCodegen(_Strict):
    """How TVM's LLVM backend generates code for a CPU target."""

    mtriple: str = Field(min_length=1)
    mcpu: str | None = None
    """LLVM CPU model (``znver3``, ``sapphirerapids``, ``cortex-a76``); default: this machine's own CPU when the
    library is built for this machine, else LLVM's generic CPU of the triple."""
    mattr: tuple[str, ...] = ()

    @property
    def arch(self) -> str:
        """The triple's architecture (``x86_64``, ``aarch64``)."""
        return self.mtriple.split("-")[0]


class Hardware(_Strict):
    """An NPU's figures, read by the op-support check and the performance estimator."""

    int8_macs_per_cycle: Annotated[int, Field(gt=0)]
    clock_hz: Annotated[int, Field(gt=0)]
    sram_bytes: Annotated[int, Field(gt=0)]
    dram_bandwidth_bytes_per_s: Annotated[int, Field(gt=0)]
    vector_ops_per_cycle: Annotated[int, Field(gt=0)]
    """Elementwise / pooling unit: operations (one per element and input, one per window element) per clock."""
    layer_overhead_cycles: Annotated[int, Field(ge=0)]
    """Fixed cost of each layer: command fetch, descriptor setup, pipeline fill and drain."""
    transition_overhead_ns: Annotated[int, Field(ge=0)]
    """Fixed cost of each switch between the NPU and its host CPU: driver call, interrupt, cache maintenance."""

    @property
    def peak_int8_ops_per_s(self) -> int:
        """Peak throughput, counting a multiply-accumulate as two operations."""
        return 2 * self.int8_macs_per_cycle * self.clock_hz


class CpuFigures(_Strict):
    """A CPU's speed on edgeq's compiled kernels, read by the performance estimator (``[perf]`` of a CPU target).

    These are nominal figures for a CPU that is not the build machine; on the build machine itself the estimator
    measures them (:mod:`edgeq.perf.calibrate`) and uses the measurement instead.
    """

    conv2d_int8_macs_per_s: Annotated[float, Field(gt=0)]
    """int8 convolutions with a kernel window larger than 1x1 (groups 1, and grouped ones: the same kernel)."""
    pointwise_int8_macs_per_s: Annotated[float, Field(gt=0)]
    """1x1 int8 convolutions (groups 1, and grouped ones): shallower reductions, a schedule of their own."""
    depthwise_int8_macs_per_s: Annotated[float, Field(gt=0)]
    """Depthwise int8 convolutions (a group per channel)."""
    linear_int8_macs_per_s: Annotated[float, Field(gt=0)]
    """int8 matrix multiplications (linear layers, matmuls of two activations)."""
    requantized_outputs_per_s: Annotated[float, Field(gt=0)]
    """Output elements a convolution or linear kernel requantizes (fixed-point multiply, round, clamp) per second."""
    packed_inputs_per_s: Annotated[float, Field(gt=0)]
    """Input elements a convolution or linear kernel reads into its blocked layout (with its padding) per second."""
    float32_macs_per_s: Annotated[float, Field(gt=0)]
    """Ops that stay in float (not quantized in the model)."""
    memory_bytes_per_s: Annotated[float, Field(gt=0)]
    """Bytes read and written per second by elementwise, pooling and data-movement kernels on NCHW tensors."""
    blocked_memory_bytes_per_s: Annotated[float, Field(gt=0)]
    """Bytes read and written per second by pooling and elementwise kernels whose tensors the layout plan stores in
    blocks of channels (a block's channels on the vector lanes, :mod:`edgeq.compile.layout_plan`)."""
    kernel_overhead_ns: Annotated[float, Field(ge=0)]
    """Fixed cost of each kernel call: the VM's dispatch (the call, its output's allocation) and the kernel's own
    set-up."""
    mac_kernel_overhead_ns: Annotated[float, Field(ge=0)]
    """Added fixed cost of each call of a convolution, linear or matmul kernel (packing its input, loading its
    requantization)."""
    parallel_overhead_ns: Annotated[float, Field(ge=0)]
    """Added fixed cost of each call of a kernel that runs on all cores (waking the thread pool)."""
    invocation_overhead_ns: Annotated[float, Field(ge=0)]
    """Fixed cost of one inference besides its kernel calls: the runtime's call of the model (inputs in, result
    out)."""
    parallel_speedup: Annotated[float, Field(gt=0)]
    """How many times longer a small kernel that runs on one core (``parallel`` false in the compiled graph) takes
    than the rates above, which are for kernels on all cores, give it (measured: below 1 when small kernels run
    faster per MAC in cache than large ones stream through memory on all cores)."""


NPU_OPS = OP_NAMES
"""The integer ops an NPU target can list in ``[npu] ops`` (edgeq's vocabulary after fusion, :mod:`edgeq.ops`)."""
NpuOp = Literal[NPU_OPS]  # type: ignore[valid-type]

NPU_LIMITS: OpTable[type[BaseModel]] = OpTable("[npu.<op>] limits section in targets.py", lambda info: info.npu_limits)
"""The section that describes an op's limits in a target file, for the ops whose :class:`~edgeq.ops.OpInfo` says
``npu_limits``; ``NpuRules`` has a field of that type named after the op."""


@NPU_LIMITS.register(Op.CONV2D)
class ConvRules(_Strict):
    """Limits of the NPU's convolution engine."""

    max_kernel: Annotated[int, Field(gt=0)]
    max_stride: Annotated[int, Field(gt=0)]
    dilations: tuple[Annotated[int, Field(gt=0)], ...]
    max_padding: Annotated[int, Field(ge=0)]
    groups: Literal["any", "depthwise", "none"]
    channel_alignment: Annotated[int, Field(gt=0)]
    """Channel counts that are multiples of this use every MAC (advice only)."""

    def describe(self) -> str:
        """The limits in words (docs/supported-ops.md)."""
        return (
            f"kernel ≤ {self.max_kernel}x{self.max_kernel}, stride ≤ {self.max_stride}, padding ≤ {self.max_padding}, "
            f"dilation {', '.join(map(str, self.dilations))}, groups: {self.groups}; full MAC use at multiples of "
            f"{self.channel_alignment} channels"
        )


@NPU_LIMITS.register(Op.LINEAR)
class LinearRules(_Strict):
    """Limits of fully connected layers."""

    max_in_features: Annotated[int, Field(gt=0)]
    channel_alignment: Annotated[int, Field(gt=0)]

    def describe(self) -> str:
        """The limits in words (docs/supported-ops.md)."""
        return f"in_features ≤ {self.max_in_features}; full MAC use at multiples of {self.channel_alignment}"


@NPU_LIMITS.register(Op.MAX_POOL2D, Op.AVG_POOL2D)
class PoolRules(_Strict):
    """Limits of a pooling unit."""

    max_kernel: Annotated[int, Field(gt=0)]
    max_stride: Annotated[int, Field(gt=0)]

    def describe(self) -> str:
        """The limits in words (docs/supported-ops.md)."""
        return f"kernel ≤ {self.max_kernel}x{self.max_kernel}, stride ≤ {self.max_stride}"


@NPU_LIMITS.register(Op.UPSAMPLE_NEAREST2D)
class UpsampleRules(_Strict):
    """Nearest-neighbour upsampling factors the NPU supports."""

    factors: tuple[Annotated[int, Field(gt=1)], ...]

    def describe(self) -> str:
        """The limits in words (docs/supported-ops.md)."""
        return "factors " + ", ".join(f"x{f}" for f in self.factors)


class NpuRules(_Strict):
    """Which ops run on the NPU, and the limits that decide it (everything else falls back to the host CPU)."""

    ops: tuple[NpuOp, ...]
    max_tensor_bytes: Annotated[int, Field(gt=0)]
    """Largest activation tensor the NPU addresses."""
    max_spatial: Annotated[int, Field(gt=0)]
    """Largest height or width of a tensor."""
    conv2d: ConvRules | None = None
    linear: LinearRules | None = None
    max_pool2d: PoolRules | None = None
    avg_pool2d: PoolRules | None = None
    upsample_nearest2d: UpsampleRules | None = None
    substitutes: dict[str, str] = {}
    """An op the NPU lacks -> one it has that often replaces it (advice)."""

    def limits(self, op: str) -> ConvRules | LinearRules | PoolRules | UpsampleRules | None:
        """The ``[npu.<op>]`` section of ``op`` (``None`` when the NPU lacks the op or the op has no limits)."""
        return getattr(self, op) if op in self.ops and Op(op).info.npu_limits else None

    @model_validator(mode="after")
    def _rules_for_listed_ops(self) -> NpuRules:
        for op in (op.value for op in Op if op.info.npu_limits):
            listed, section = op in self.ops, getattr(self, op) is not None
            if listed and not section:
                raise ValueError(f"op '{op}' is listed in npu.ops but has no [npu.{op}] section")
            if section and not listed:
                raise ValueError(f"[npu.{op}] describes an op that npu.ops does not list")
        return self


class QuantizationRules(_Strict):
    """Constraints that ``prepare_qat_fx`` applies to every scale it chooses."""

    scale_rule: ScaleRule
    concat_shares_input_scale: bool


class Target(_Strict):
    """One deployment target."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    kind: TargetKind
    description: str = Field(min_length=1)
    host: str | None = None
    llvm: LLVMCodegen | None = None
    hardware: Hardware | None = None
    perf: CpuFigures | None = None
    npu: NpuRules | None = None
    quantization: QuantizationRules
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _sections_match_kind(self) -> Target:
        if self.kind is TargetKind.CPU:
            if self.llvm is None:
                raise ValueError("a cpu target needs an [llvm] section")
            if self.host is not None or self.npu is not None or self.hardware is not None:
                raise ValueError("a cpu target has no host, [npu] or [hardware] section (it is the host)")
            if self.perf is None:
                raise ValueError("a cpu target needs a [perf] section (the performance estimator's figures)")
        else:
            if self.hardware is None or self.npu is None:
                raise ValueError("an npu target needs [hardware] and [npu] sections")
            if self.host is None:
                raise ValueError("an npu target needs host = '<cpu target name>' for what falls back to the CPU")
            if self.perf is not None:
                raise ValueError("an npu target has no [perf] section (its host CPU's figures cost what falls back)")
        return self

    def summary(self) -> str:
        """One line for listings: name, kind and description."""
        return f"{self.name:<8} {self.kind.value:<4} {self.description}"


_SOURCE_TARGETS = Path(__file__).resolve().parent.parent / "targets"
"""``targets/`` of a source checkout (and of an editable install)."""
_INSTALLED_TARGETS_PACKAGE = "edgeq._targets"
"""Where a wheel install puts ``targets/`` (pyproject.toml maps it into the package)."""


def _builtin_target_files() -> dict[str, Path]:
    folder = _SOURCE_TARGETS if _SOURCE_TARGETS.is_dir() else Path(str(resources.files(_INSTALLED_TARGETS_PACKAGE)))
    return {path.stem: path for path in sorted(folder.glob("*.toml"))}


def _format_location(location: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in location) or "(top level)"


def load_target_file(path: str | Path) -> Target:
    """Read and validate one target file.

    Raises:
        TargetError: ``<file>: <key path>: <problem>`` for unreadable TOML, unknown keys, wrong types or a
            ``name`` that differs from the file name.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TargetError(f"{path}: no such target file") from None
    except tomllib.TOMLDecodeError as error:
        raise TargetError(f"{path}: not valid TOML: {error}") from None
    try:
        target = Target.model_validate({**data, "source": path})
    except ValidationError as error:
        problems = "; ".join(f"{_format_location(e['loc'])}: {e['msg']}" for e in error.errors())
        raise TargetError(f"{path}: {problems}") from None
    if target.name != path.stem:
        raise TargetError(f"{path}: name: '{target.name}' differs from the file name '{path.stem}'")
    return target


@cache
def _load_builtin(name: str) -> Target:
    return load_target_file(_builtin_target_files()[name])


def target_names() -> list[str]:
    """Names of the built-in targets, sorted."""
    return sorted(_builtin_target_files())


def list_targets() -> list[Target]:
    """Every built-in target, loaded and validated."""
    return [_load_builtin(name) for name in target_names()]


def load_target(target: str | Path | Target) -> Target:
    """Resolve a target given by built-in name, by path to a ``.toml`` file, or as a :class:`Target`.

    Raises:
        TargetError: unknown name (listing the known ones) or malformed file.
    """
    if isinstance(target, Target):
        return target
    if isinstance(target, Path) or str(target).endswith(".toml"):
        return load_target_file(target)
    if target not in _builtin_target_files():
        raise TargetError(f"unknown target '{target}'; known targets: {', '.join(target_names())}")
    return _load_builtin(target)


TargetLike = str | Path | Target


def host_cpu(target: Target) -> Target:
    """The CPU target that runs ``target``'s CPU layers: itself, or an NPU target's host."""
    return load_target(target.host) if target.kind is TargetKind.NPU else target


def resolve_target(target: TargetLike | None, recorded: str | None, source: str) -> Target:
    """The target given, else the one the model ``source`` records (edgeq stores it when it quantizes).

    Raises:
        TargetError: no target given and none recorded, an unknown name, or a malformed file.
    """
    if target is not None:
        return load_target(target)
    if recorded is None:
        raise TargetError(
            f"{source}: the model records no target; name one (target='npu-s' in Python, --target npu-s on the command line)"
        )
    return load_target(recorded)
