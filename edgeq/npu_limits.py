"""The ``[npu.<op>]`` limits sections of a target file (each op whose :class:`~edgeq.ops.OpInfo` says
``npu_limits``), and the strict value types every section of a target file is made of (:mod:`edgeq.targets`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt

from edgeq.ops import OP_NAMES, Op, OpTable


class Strict(BaseModel):
    """A section of a target file: unknown keys refused, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Count = Annotated[StrictInt, Field(gt=0)]
"""An integer > 0. Strict: TOML's ``true``, ``"8"`` and ``8.0`` are refused, not converted."""
NonNegativeCount = Annotated[StrictInt, Field(ge=0)]
"""An integer ≥ 0 (a fixed cost that may be nothing), strict like :data:`Count`."""


def _listed(values: tuple[int, ...]) -> tuple[int, ...]:
    """``values`` when it names at least one: an empty list of what an NPU supports would refuse every op."""
    if not values:
        raise ValueError("must list at least one value (leave the op out of [npu] ops for an NPU without it)")
    return values


NPU_OPS = OP_NAMES
"""The integer ops an NPU target can list in ``[npu] ops`` (edgeq's vocabulary after fusion, :mod:`edgeq.ops`)."""
NpuOp = Literal[NPU_OPS]  # type: ignore[valid-type]

NPU_LIMITS: OpTable[type[BaseModel]] = OpTable("[npu.<op>] limits section in npu_limits.py", lambda info: info.npu_limits)
"""The section that describes an op's limits in a target file, for the ops whose :class:`~edgeq.ops.OpInfo` says
``npu_limits``; ``NpuRules`` has a field of that type named after the op."""


@NPU_LIMITS.register(Op.CONV2D)
class ConvRules(Strict):
    """Limits of the NPU's convolution engine."""

    max_kernel: Count
    max_stride: Count
    max_unpadded_stride: Count | None = None
    """A larger stride allowed for a convolution without padding that is not depthwise (none: ``max_stride`` for
    every convolution)."""
    dilations: Annotated[tuple[Count, ...], AfterValidator(_listed)]
    """At least one (1: undilated)."""
    max_padding: NonNegativeCount
    groups: Literal["any", "depthwise", "none"]
    channel_alignment: Count
    """Channel counts that are multiples of this use every MAC (advice only)."""

    def describe(self) -> str:
        """The limits in words (docs/supported-ops.md)."""
        unpadded = f" (≤ {self.max_unpadded_stride} without padding, not depthwise)" if self.max_unpadded_stride else ""
        return (
            f"kernel ≤ {self.max_kernel}x{self.max_kernel}, stride ≤ {self.max_stride}{unpadded}, padding ≤ {self.max_padding}, "
            f"dilation {', '.join(map(str, self.dilations))}, groups: {self.groups}; full MAC use at multiples of "
            f"{self.channel_alignment} channels"
        )


@NPU_LIMITS.register(Op.LINEAR)
class LinearRules(Strict):
    """Limits of fully connected layers."""

    max_in_features: Count
    channel_alignment: Count

    def describe(self) -> str:
        """The limits in words (docs/supported-ops.md)."""
        return f"in_features ≤ {self.max_in_features}; full MAC use at multiples of {self.channel_alignment}"


@NPU_LIMITS.register(Op.MAX_POOL2D, Op.AVG_POOL2D)
class PoolRules(Strict):
    """Limits of a pooling unit."""

    max_kernel: Count
    max_stride: Count
    max_unpadded_stride: Count | None = None
    """A larger stride allowed for a window without padding (none: ``max_stride`` for every window)."""
    max_padded_kernel: Count | None = None
    """The largest kernel of a padded window (none: ``max_kernel`` with or without padding)."""

    def describe(self) -> str:
        """The limits in words (docs/supported-ops.md)."""
        padded = f" ({self.max_padded_kernel}x{self.max_padded_kernel} with padding)" if self.max_padded_kernel else ""
        unpadded = f" (≤ {self.max_unpadded_stride} without padding)" if self.max_unpadded_stride else ""
        return f"kernel ≤ {self.max_kernel}x{self.max_kernel}{padded}, stride ≤ {self.max_stride}{unpadded}"


@NPU_LIMITS.register(Op.UPSAMPLE_NEAREST2D)
class UpsampleRules(Strict):
    """Nearest-neighbour upsampling factors the NPU supports."""

    factors: Annotated[tuple[Annotated[StrictInt, Field(gt=1)], ...], AfterValidator(_listed)]

    def describe(self) -> str:
        """The limits in words (docs/supported-ops.md)."""
        return "factors " + ", ".join(f"x{f}" for f in self.factors)
