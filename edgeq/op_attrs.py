"""Each op's settings as a typed record (:class:`Conv2dAttrs`, :class:`PoolAttrs`...), one class per op family.

The check reads an op's settings from PyTorch (``check/from_fx.py``) or ONNX (``check/from_onnx.py``) into the
class its op registers in :data:`ATTRIBUTE_CLASSES`; its rules, the compiled graph, the estimator, the report and
the visualizer read the same object. A record has none (``None``) when its op has no settings or the check could
not read them (a convolution whose weights are not constants). In ``graph.json`` an op's ``attributes`` are its
settings' :meth:`OpAttrs.to_json`, or, for an op without, its ONNX node's attributes as the file has them
(:class:`OnnxAttrs`); :func:`attributes_from_json` reads either back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Self

from edgeq.ops import LOOKUP_TABLE_OPS, Op, OpTable, op_named


@dataclass(frozen=True)
class OpAttrs:
    """An op's settings (the base of every op family's class)."""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: each field by name in declaration order, tuples as lists, optional fields left out when unset."""
        return {f.name: _json_value(value) for f in fields(self) if (value := getattr(self, f.name)) is not None}

    @classmethod
    def fits(cls, data: Mapping[str, Any]) -> bool:
        """Whether ``data`` can be a :meth:`to_json` of this class: every key a field, every field without a
        default present."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        return set(data) <= names and required <= set(data)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        """The settings of a :meth:`to_json` result (lists become tuples)."""
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})


def _json_value(value: Any) -> Any:
    return [_json_value(v) for v in value] if isinstance(value, tuple) else value


ATTRIBUTE_CLASSES: OpTable[type[OpAttrs] | None] = OpTable("attribute class in op_attrs.py")
"""Each op's settings class; ``None`` for an op without settings (a product of two activations' shapes, a copy)."""


@dataclass(frozen=True)
class WindowAttrs(OpAttrs):
    """A window sliding over height and width."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    """Per side, the larger of the two sides' padding of each dimension."""
    uneven_padding: tuple[int, int, int, int] | None = field(default=None, kw_only=True)
    """Each side's padding (top, left, bottom, right: ONNX's ``pads``) where a dimension's two sides differ (a QDQ
    file's asymmetric padding); None when both sides of each dimension have ``padding``."""

    @property
    def pads(self) -> tuple[int, int, int, int]:
        """Each side's padding: top, left, bottom, right (ONNX's ``pads``)."""
        return self.uneven_padding or (*self.padding, *self.padding)


@ATTRIBUTE_CLASSES.register(Op.MAX_POOL2D, Op.AVG_POOL2D)
@dataclass(frozen=True)
class PoolAttrs(WindowAttrs):
    """A max or average pool: its window."""


@ATTRIBUTE_CLASSES.register(Op.CONV2D)
@dataclass(frozen=True)
class Conv2dAttrs(WindowAttrs):
    """A 2-D convolution (its window, then its channels).

    Attributes:
        activation: the activation fused into it (``none``, ``relu``, ``relu6``) when read from PyTorch; a QDQ file
            keeps its activation as an op of its own (``None``).
    """

    dilation: tuple[int, int]
    groups: int
    in_channels: int
    out_channels: int
    activation: str | None = None

    @property
    def depthwise(self) -> bool:
        """A group per channel, one output channel per group (the compiler's depthwise kernel, the NPUs' depthwise
        rule)."""
        return self.groups == self.in_channels == self.out_channels

    @property
    def weight_bytes(self) -> int:
        """Bytes of its int8 weights."""
        return self.out_channels * self.in_channels // self.groups * math.prod(self.kernel)


@ATTRIBUTE_CLASSES.register(Op.LINEAR)
@dataclass(frozen=True)
class LinearAttrs(OpAttrs):
    """A linear layer (or a product with a constant matrix); ``activation`` as :class:`Conv2dAttrs`'s."""

    in_features: int
    out_channels: int
    activation: str | None = None

    @property
    def weight_bytes(self) -> int:
        """Bytes of its int8 weights."""
        return self.in_features * self.out_channels


@ATTRIBUTE_CLASSES.register(Op.MATMUL)
@dataclass(frozen=True)
class MatMulAttrs(OpAttrs):
    """A product of two activations: the products summed per output element."""

    reduction_size: int


@ATTRIBUTE_CLASSES.register(Op.ADD, Op.RELU)
@dataclass(frozen=True)
class ActivationAttrs(OpAttrs):
    """An add's fused activation (``none``, ``relu``, ``relu6``), or a clamp's spelling (``relu``, ``relu6``,
    ``hardtanh``...), as read from PyTorch."""

    activation: str


@ATTRIBUTE_CLASSES.register(Op.CONCAT)
@dataclass(frozen=True)
class ConcatAttrs(OpAttrs):
    """A concatenation's dimension, as read from PyTorch."""

    dim: int


@ATTRIBUTE_CLASSES.register(*LOOKUP_TABLE_OPS)
@dataclass(frozen=True)
class LookupTableAttrs(OpAttrs):
    """A lookup-table activation: its function (the op's name) and its constant (``OpInfo.alpha``; 0 for a
    function without)."""

    function: str
    alpha: float


@ATTRIBUTE_CLASSES.register(Op.UPSAMPLE_NEAREST2D)
@dataclass(frozen=True)
class NearestResizeAttrs(OpAttrs):
    """A nearest-neighbour upsample: its integer factor per spatial dimension."""

    factor: tuple[int, ...]


@ATTRIBUTE_CLASSES.register(Op.UPSAMPLE_BILINEAR2D)
@dataclass(frozen=True)
class BilinearResizeAttrs(OpAttrs):
    """A bilinear upsample: whether the corner pixels' centres align (PyTorch's ``align_corners``)."""

    align_corners: bool


ATTRIBUTE_CLASSES.register(Op.MUL, Op.GLOBAL_AVG_POOL2D, Op.RESHAPE, Op.TRANSPOSE, Op.SPLIT, Op.SLICE, Op.PAD)(None)


@dataclass(frozen=True)
class OnnxAttrs(OpAttrs):
    """An ONNX node's attributes as the file has them (JSON-ready values): the compiled graph's attributes of an op
    whose check record has no settings (an op edgeq does not know, one without settings, or one whose settings
    the check could not read)."""

    values: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dict(self.values)

    @classmethod
    def fits(cls, data: Mapping[str, Any]) -> bool:
        return True

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OnnxAttrs:
        return cls(dict(data))


def attributes_from_json(op: str, data: Mapping[str, Any]) -> OpAttrs:
    """The settings of the op called ``op`` from their JSON (``graph.json``'s ``attributes``): its class's when they
    fit it (:meth:`OpAttrs.fits`), the ONNX node's otherwise (:class:`OnnxAttrs`)."""
    known = op_named(op)
    of = ATTRIBUTE_CLASSES[known] if known is not None else None
    return of.from_json(data) if of is not None and of.fits(data) else OnnxAttrs.from_json(data)


def check_attributes(op: str, attrs: OpAttrs | None) -> None:
    """Refuse settings of another class than the one ``op`` registers (a programming error in a check reader).

    Raises:
        TypeError: ``attrs`` is not ``None`` and not of ``op``'s class (or ``op`` is not edgeq's).
    """
    known = op_named(op)
    of = ATTRIBUTE_CLASSES[known] if known is not None else None
    if attrs is not None and (of is None or not isinstance(attrs, of)):
        expected = of.__name__ if of is not None else "no settings"
        raise TypeError(f"{op}: settings {type(attrs).__name__}, the op has {expected} (edgeq.op_attrs.ATTRIBUTE_CLASSES)")
