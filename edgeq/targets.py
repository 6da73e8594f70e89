"""Target descriptions: hardware facts and rules read from ``targets/*.toml``.

No Python file names a target: code reads a :class:`Target`. Files are validated strictly on load (an unknown
key, a wrong type, a value out of range, a missing section, an LLVM CPU or feature LLVM does not know, a
``host`` that is not a CPU target, or a ``[vela]`` name Vela does not know is a :class:`~edgeq.errors.TargetError`
naming the file and key path). Units are part of the key names (``clock_hz``, ``sram_bytes``).

pydantic does the validation: it reports every problem with its key path, and the schema below doubles as
the documentation of the file format (``docs/targets.md``).
"""

from __future__ import annotations

import json
import tomllib
from enum import Enum
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    Field,
    PrivateAttr,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from edgeq.errors import InputFileError, TargetError
from edgeq.fileio import readable_file
from edgeq.llvm_names import BUILD_ARCHITECTURES, BUILDABLE_TRIPLE, llvm_cpu_features, llvm_cpus, llvm_knows_feature, nearest
from edgeq.npu_limits import ConvRules, Count, LinearRules, NonNegativeCount, NpuOp, PoolRules, Strict, UpsampleRules
from edgeq.ops import Op
from edgeq.vela_configs import VelaOptions

PositiveNumber = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
"""A finite number > 0 (an integer is taken as one); ``true``, ``"1e9"``, ``inf`` and ``nan`` are refused."""
NonNegativeNumber = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
"""A finite number ≥ 0, strict like :data:`PositiveNumber`."""


class ScaleRule(str, Enum):
    """Which scales a target accepts."""

    ANY = "any"
    """Any positive float32 scale; requantization uses a fixed-point multiplier."""
    POWER_OF_TWO = "power_of_two"
    """Scales are powers of two, rounded up (never clipping more); requantization is a pure rounding shift."""


class Rounding(str, Enum):
    """How a target's integer arithmetic rounds a value exactly halfway between two integers (docs/numerics.md)."""

    HALF_TO_EVEN = "half_to_even"
    """Ties to the even neighbour: edgeq's rule, ONNX QuantizeLinear's and aten's (``nearbyint``)."""
    HALF_UP = "half_up"
    """Ties towards +infinity: TOSA RESCALE's SINGLE_ROUND and the Ethos-U output scaler's NATURAL rounding."""


class TargetKind(str, Enum):
    """What executes the model: a CPU alone, or an NPU beside a host CPU that runs what the NPU cannot."""

    CPU = "cpu"
    NPU = "npu"


class LLVMCodegen(Strict):
    """How TVM's LLVM backend generates code for a CPU target."""

    mtriple: str
    """``<architecture>[-<vendor>]-linux-gnu`` for an architecture of :data:`edgeq.llvm_names.BUILD_ARCHITECTURES`."""
    mcpu: str | None = None
    """LLVM CPU model (``x86-64-v3``, ``znver3``, ``sapphirerapids``, ``cortex-a76``); default: this machine's own CPU
    when the library is built for this machine, else LLVM's generic CPU of the triple."""
    mattr: tuple[str, ...] = ()
    """LLVM features to turn on (``+dotprod``) or off (``-sse4a``) beside the CPU's own."""

    @property
    def arch(self) -> str:
        """The triple's architecture (``x86_64``, ``aarch64``)."""
        return self.mtriple.split("-")[0]

    @field_validator("mtriple")
    @classmethod
    def _buildable_triple(cls, triple: str) -> str:
        if not BUILDABLE_TRIPLE.match(triple):
            raise ValueError(
                f"'{triple}' is not a triple edgeq builds for: it builds Linux libraries for "
                f"{' and '.join(BUILD_ARCHITECTURES)} only ({', '.join(f'{a}-linux-gnu' for a in BUILD_ARCHITECTURES)})"
            )
        return triple

    @field_validator("mcpu")
    @classmethod
    def _known_cpu(cls, cpu: str | None, info: ValidationInfo) -> str | None:
        triple = info.data.get("mtriple")
        if cpu is not None and triple is not None and cpu not in llvm_cpus(triple):
            hint = "; leave mcpu out to build for the compiling machine's own CPU" if cpu == "native" else ""
            raise ValueError(f"'{cpu}' is not a CPU LLVM knows for {triple} {nearest(cpu, llvm_cpus(triple))}{hint}")
        return cpu

    @field_validator("mattr")
    @classmethod
    def _known_features(cls, mattr: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        triple = info.data.get("mtriple")
        for entry in mattr:
            if entry[:1] not in ("+", "-"):
                raise ValueError(f"'{entry}' needs a sign: +{entry} turns the feature on, -{entry} off")
            feature = entry[1:]
            if triple is not None and not llvm_knows_feature(triple, feature):
                known = llvm_cpu_features(triple)
                raise ValueError(f"'{entry}': '{feature}' is not a feature LLVM knows for {triple} {nearest(feature, known)}")
        return mattr


class Hardware(Strict):
    """An NPU's figures, read by the op-support check and the performance estimator."""

    int8_macs_per_cycle: Count
    clock_hz: Count
    sram_bytes: Count
    dram_bandwidth_bytes_per_s: Count
    vector_ops_per_cycle: Count
    """Elementwise / pooling unit: operations (one per element and input, one per window element) per clock."""
    layer_overhead_cycles: NonNegativeCount
    """Fixed cost of each layer: command fetch, descriptor setup, pipeline fill and drain."""
    transition_overhead_ns: NonNegativeCount
    """Fixed cost of each switch between the NPU and its host CPU: driver call, interrupt, cache maintenance."""
    micro_block: tuple[Count, Count, Count] | None = None
    """Output micro-block (height, width, channels) the MAC array computes per step, each output summing
    ``int8_macs_per_cycle / (height x width x channels)`` input channels (Ethos-U: Vela's ``ofm_ublock``). With it
    the estimator costs NPU layers by blocks (docs/perf.md, "NPU layers by blocks"); without it by alignment."""
    output_cycles_per_element: NonNegativeNumber = 0.0
    """Cycles the output stage takes to scale, round and write one output of a MAC layer or pool (Ethos-U: Vela's
    output cycles per element): block model only."""
    lookup_table_cycles_per_element: NonNegativeNumber = 0.0
    """Cycles per output of a layer whose output stage applies a lookup table (Vela's activation cycles per
    element of a table): block model only."""
    elementwise_cycles: dict[str, NonNegativeNumber] = {}
    """Cycles per output element of each op kind the elementwise units run (an op missing:
    ``output_cycles_per_element``): block model only."""
    shram_bytes: Count | None = None
    """The NPU's internal buffer of input blocks and accumulators (Vela's SHRAM): an output block's double-buffered
    32-bit accumulators fit it, which bounds a layer's blocks from below (block model only; without it, one)."""
    pooled_copies: tuple[str, ...] = ()
    """Op kinds the NPU runs as a copy of each output element through its pooling path (a 1x1 pool: Vela's concat
    and nearest resize on the Ethos-U55 / U65): block model only."""
    sliced_views: tuple[str, ...] = ()
    """Op kinds the NPU runs as no command of their own, its readers reading slices of the input (Vela's split):
    block model only."""
    chains_elementwise: bool = False
    """The NPU runs an add or a product in the output stage of the layer making one of its inputs, at no cost of
    its own (the Ethos-U85's chaining): block model only."""
    input_reads_per_channels: Count | None = None
    """A convolution reads its whole input once per block of this many output channels (block model only; without
    it, once)."""
    sram_bandwidth_bytes_per_s: Count | None = None
    """Feature maps that fit ``sram_bytes`` move at this rate (block model only; else at the DRAM bandwidth)."""
    sram_burst_bytes: Count | None = None
    """Bytes the SRAM moves per burst: an access shorter than a burst costs a whole one (block model only)."""
    dram_burst_bytes: Count | None = None
    """Bytes the DRAM (or off-chip flash) moves per burst (block model only)."""
    ifm_run_bytes: Count | None = None
    """Most contiguous bytes of an input feature map the NPU reads per access (its input block's depth; block
    model only: without it, or without burst lengths, every byte costs one)."""
    ofm_run_bytes: Count | None = None
    """Most contiguous bytes of an output feature map the NPU writes per access (block model only)."""
    region_io_in_dram: bool = False
    """An NPU region's inputs and outputs live in the DRAM (Vela's arena in a dedicated-SRAM memory mode; block
    model only): the NPU reads and writes them there."""
    dram_read_buffer_bytes: Count | None = None
    """Bytes of DRAM reads the NPU keeps in flight (its read buffer; block model only): with
    ``dram_read_latency_cycles`` it bounds the DRAM read rate at ``buffer / latency`` per cycle."""
    dram_read_latency_cycles: Count | None = None
    """Cycles from a DRAM read request to its data (block model only)."""
    dram_write_latency_cycles: NonNegativeCount = 0
    """Cycles from a DRAM write request to its completion (block model only)."""
    sram_latency_cycles: NonNegativeCount = 0
    """Cycles from an SRAM read or write request to its completion (block model only)."""

    @field_validator("elementwise_cycles", "pooled_copies", "sliced_views")
    @classmethod
    def _known_ops(cls, value: dict[str, float] | tuple[str, ...], info: ValidationInfo) -> dict[str, float] | tuple[str, ...]:
        unknown = sorted(set(value) - {op.value for op in Op})
        if unknown:
            raise ValueError(f"{info.field_name} names no op {unknown}; ops: {', '.join(sorted(op.value for op in Op))}")
        return value

    @property
    def peak_int8_ops_per_s(self) -> int:
        """Peak throughput, counting a multiply-accumulate as two operations."""
        return 2 * self.int8_macs_per_cycle * self.clock_hz


class CpuFigures(Strict):
    """A CPU's speed on edgeq's compiled kernels, read by the performance estimator (``[perf]`` of a CPU target).

    These are nominal figures for a CPU that is not the build machine; on the build machine itself the estimator
    measures them (:mod:`edgeq.perf.calibrate`) and uses the measurement instead.
    """

    conv2d_int8_macs_per_s: PositiveNumber
    """int8 convolutions with a kernel window larger than 1x1 (groups 1, and grouped ones: the same kernel)."""
    pointwise_int8_macs_per_s: PositiveNumber
    """1x1 int8 convolutions (groups 1, and grouped ones): shallower reductions, a schedule of their own."""
    depthwise_int8_macs_per_s: PositiveNumber
    """Depthwise int8 convolutions (a group per channel)."""
    linear_int8_macs_per_s: PositiveNumber
    """int8 matrix multiplications (linear layers, matmuls of two activations)."""
    requantized_outputs_per_s: PositiveNumber
    """Output elements a convolution or linear kernel requantizes (fixed-point multiply, round, clamp) per second."""
    packed_inputs_per_s: PositiveNumber
    """Input elements a convolution or linear kernel reads into its blocked layout (with its padding) per second."""
    float32_macs_per_s: PositiveNumber
    """Ops that stay in float (not quantized in the model)."""
    memory_bytes_per_s: PositiveNumber
    """Bytes read and written per second by elementwise, pooling and data-movement kernels on NCHW tensors."""
    blocked_memory_bytes_per_s: PositiveNumber
    """Bytes read and written per second by pooling and elementwise kernels whose tensors the layout plan stores in
    blocks of channels (a block's channels on the vector lanes, :mod:`edgeq.compile.layout_plan`)."""
    kernel_overhead_ns: NonNegativeNumber
    """Fixed cost of each kernel call: the VM's dispatch (the call, its output's allocation) and the kernel's own
    set-up."""
    mac_kernel_overhead_ns: NonNegativeNumber
    """Added fixed cost of each call of a convolution, linear or matmul kernel (packing its input, loading its
    requantization)."""
    parallel_overhead_ns: NonNegativeNumber
    """Added fixed cost of each call of a kernel that runs on all cores (waking the thread pool)."""
    invocation_overhead_ns: NonNegativeNumber
    """Fixed cost of one inference besides its kernel calls: the runtime's call of the model (inputs in, result
    out)."""
    parallel_speedup: PositiveNumber
    """How many times longer a small kernel that runs on one core (``parallel`` false in the compiled graph) takes
    than the rates above, which are for kernels on all cores, give it (measured: below 1 when small kernels run
    faster per MAC in cache than large ones stream through memory on all cores)."""


class NpuRules(Strict):
    """Which ops run on the NPU, and the limits that decide it (everything else falls back to the host CPU)."""

    ops: tuple[NpuOp, ...]
    max_tensor_bytes: Count
    """Largest activation tensor the NPU addresses."""
    max_spatial: Count
    """Largest height or width of a tensor."""
    max_channels: Count | None = None
    """Largest channel count of a 4-D tensor (none: no limit but ``max_tensor_bytes``)."""
    max_matmul_reduction: Count | None = None
    """Most products a matmul of two activations sums per output (none: any)."""
    conv2d: ConvRules | None = None
    linear: LinearRules | None = None
    max_pool2d: PoolRules | None = None
    avg_pool2d: PoolRules | None = None
    upsample_nearest2d: UpsampleRules | None = None
    substitutes: dict[str, str] = {}
    """An op the NPU lacks -> one it has that often replaces it (advice)."""
    why_not: dict[NpuOp, Annotated[str, Field(min_length=1)]] = {}
    """An op the NPU does not run -> why, in one sentence check adds to ``op_not_on_npu``'s reason."""

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
        for op in self.why_not:
            if op in self.ops:
                raise ValueError(f"[npu.why_not] says why the NPU lacks '{op}', which npu.ops lists")
        return self


class QuantizationRules(Strict):
    """Constraints that ``prepare_qat_fx`` applies to every scale it chooses."""

    scale_rule: ScaleRule
    concat_shares_input_scale: StrictBool
    rounding: Rounding = Rounding.HALF_TO_EVEN
    """The rounding rule of every requantization, quantization and activation fake quantization."""


class Target(Strict):
    """One deployment target."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    kind: TargetKind
    description: str = Field(min_length=1)
    host: str | None = None
    firmware_host: str | None = Field(default=None, min_length=1)
    """NPU targets only, instead of ``host``: the CPU beside the NPU that runs the user's own firmware and that edgeq
    builds no code for (``Cortex-M55``): every op must run on the NPU, none falls back to a CPU."""
    vela: VelaOptions | None = None
    """An Arm Ethos-U NPU target's Vela options (its NPU regions are compiled by Vela)."""
    llvm: LLVMCodegen | None = None
    hardware: Hardware | None = None
    perf: CpuFigures | None = None
    npu: NpuRules | None = None
    quantization: QuantizationRules
    source: Path | None = Field(default=None, exclude=True)
    """The file the target was read from; a ``host`` file is relative to its folder."""
    _host: Target | None = PrivateAttr(default=None)
    """An NPU target's host CPU target, resolved on load (:func:`host_cpu`)."""

    @model_validator(mode="after")
    def _sections_match_kind(self) -> Target:
        if self.kind is TargetKind.CPU:
            if self.llvm is None:
                raise ValueError("a cpu target needs an [llvm] section")
            if any(x is not None for x in (self.host, self.firmware_host, self.npu, self.hardware, self.vela)):
                raise ValueError("a cpu target has no host, firmware_host, [npu], [hardware] or [vela] section (it is the host)")
            if self.perf is None:
                raise ValueError("a cpu target needs a [perf] section (the performance estimator's figures)")
        else:
            if self.hardware is None or self.npu is None:
                raise ValueError("an npu target needs [hardware] and [npu] sections")
            if (self.host is None) == (self.firmware_host is None):
                raise ValueError(
                    "an npu target needs host = '<cpu target name>' for what falls back to the CPU, or instead "
                    "firmware_host = '<cpu>' for a host edgeq builds no code for (not both)"
                )
            if self.perf is not None:
                raise ValueError("an npu target has no [perf] section (its host CPU's figures cost what falls back)")
        return self

    @model_validator(mode="after")
    def _named_after_file(self) -> Target:
        if self.source is not None and self.name != self.source.stem:
            raise ValueError(f"name: '{self.name}' differs from the file name '{self.source.stem}'")
        return self

    @model_validator(mode="after")
    def _resolve_host(self, info: ValidationInfo) -> Target:
        if self.host is not None and not (info.context or {}).get(_AS_HOST):
            self._host = _host_target(self.host, self.source)
        return self

    def summary(self) -> str:
        """One line for listings: name (padded to the longest built-in one), kind and description."""
        return f"{self.name:<{max(map(len, target_names()))}} {self.kind.value:<4} {self.description}"


_SOURCE_TARGETS = Path(__file__).resolve().parent.parent / "targets"
"""``targets/`` of a source checkout (and of an editable install)."""
_INSTALLED_TARGETS_PACKAGE = "edgeq._targets"
"""Where a wheel install puts ``targets/`` (pyproject.toml maps it into the package)."""


def _builtin_target_files() -> dict[str, Path]:
    folder = _SOURCE_TARGETS if _SOURCE_TARGETS.is_dir() else Path(str(resources.files(_INSTALLED_TARGETS_PACKAGE)))
    return {path.stem: path for path in sorted(folder.glob("*.toml"))}


_AS_HOST = "as_host"
"""Validation context key: the file is read as another target's host, whose own ``host`` is not followed (a host
is a CPU target, and two NPU files naming each other must not recurse)."""


def _host_target(reference: str, named_in: Path | None) -> Target:
    """The CPU target ``host = reference`` names: a built-in target, or a ``.toml`` file (relative to the folder of
    the file ``named_in``).

    Raises:
        ValueError: ``host: <problem>``: an unknown name, a malformed file, or an NPU target.
    """
    try:
        if reference.endswith(".toml"):
            host = _load_file((named_in.parent if named_in else Path()) / reference, as_host=True)
        else:
            host = load_target(reference)
    except TargetError as error:
        raise ValueError(f"host: {error}") from None
    if host.kind is not TargetKind.CPU:
        raise ValueError(f"host: '{reference}' is an {host.kind.value} target; the host is a cpu target (built-in or a .toml file)")
    return host


def _toml_value(value: Any) -> str:
    """``value`` spelt as in a TOML file (``true``, ``"8"``, ``8.0``, ``inf``)."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)


def _problem(error: ErrorDetails) -> str:
    """One validation problem as ``<key path>: <problem>``, with the value found when it is a single one."""
    if error["type"] == "value_error":  # a validator's own sentence, which names its key path when it has one
        message = str(error["ctx"]["error"])
    elif error["type"] in ("missing", "extra_forbidden") or isinstance(error["input"], (dict, list, tuple)):
        message = error["msg"]
    else:
        message = f"{error['msg']}, got {_toml_value(error['input'])}"
    location = ".".join(str(part) for part in error["loc"])
    return f"{location}: {message}" if location else message


def _read_toml(path: Path) -> dict[str, Any]:
    """The table of the TOML file ``path``.

    Raises:
        TargetError: ``<file>: <why>``: missing, a folder, unreadable, not UTF-8 or not TOML.
    """
    try:
        return tomllib.loads(readable_file(path).read_bytes().decode("utf-8"))
    except InputFileError as error:  # missing, a folder, a device, no permission
        raise TargetError(str(error)) from None
    except OSError as error:  # it went away or failed after the check
        problem = f"cannot read: {error.strerror}"
    except UnicodeDecodeError as error:
        problem = f"not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); save it as UTF-8"
    except tomllib.TOMLDecodeError as error:
        problem = f"not valid TOML: {error}"
    raise TargetError(f"{path}: {problem}")


def _load_file(path: Path, as_host: bool) -> Target:
    """Read and validate the target file ``path`` (``as_host``: as another target's host, :data:`_AS_HOST`)."""
    data = _read_toml(path)
    try:
        return Target.model_validate({**data, "source": path}, context={_AS_HOST: as_host})
    except ValidationError as error:
        raise TargetError(f"{path}: {'; '.join(_problem(e) for e in error.errors())}") from None


def load_target_file(path: str | Path) -> Target:
    """Read and validate one target file.

    Raises:
        TargetError: ``<file>: <key path>: <problem>`` for a file that cannot be read or is not UTF-8 TOML,
            unknown keys, wrong types, values out of range, a ``name`` that differs from the file name, an LLVM
            CPU or feature LLVM does not know, a ``host`` that is not a CPU target, or a ``[vela]`` name Vela does
            not know.
    """
    return _load_file(Path(path), as_host=False)


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
    """The CPU target that runs ``target``'s CPU layers: itself, or an NPU target's host (resolved on load).

    Raises:
        TargetError: ``target``'s host is a firmware host, which edgeq builds no code for.
    """
    if target.firmware_host is not None:
        raise TargetError(f"{target.name}'s host is a {target.firmware_host}, which edgeq builds no code for (it runs your firmware)")
    return target._host if target._host is not None else target


HOST_CODE_ADVICE = "keep the op out of the quantized region or run it in your firmware"
"""What to do with an op that would run on a firmware host (:attr:`Target.firmware_host`)."""


def resolve_target(target: TargetLike | None, recorded: str | None, source: str) -> Target:
    """The target given, else the one the model ``source`` records (edgeq stores it when it quantizes).

    Raises:
        TargetError: no target given and none recorded, a recorded target that is not built in (a file must be
            given), an unknown name, or a malformed file.
    """
    if target is not None:
        return load_target(target)
    if recorded is None:
        raise TargetError(
            f"{source}: the model records no target; name one (target='npu-s' in Python, --target npu-s on the command line)"
        )
    if recorded not in target_names():  # a file named inside a model is not loaded: the user names files
        raise TargetError(
            f"{source}: the model records target '{recorded}', which is not a built-in target "
            f"({', '.join(target_names())}); pass --target FILE to use a target file"
        )
    return load_target(recorded)
