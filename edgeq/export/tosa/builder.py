"""Writing a TOSA 1.0 graph: tensors in their layout, constants, and the few operators every form is built from.

edgeq's graphs are NCHW; TOSA's and the Ethos-U's are NHWC. A :class:`TosaValue` keeps its *logical* shape (the
QDQ graph's, NCHW for images) and the *physical* order in which TOSA holds it (``perm``: physical axis ``j`` is
logical axis ``perm[j]``): a form asks for the layout its operator needs (:meth:`TosaBuilder.in_layout`), and a
TRANSPOSE is written only when the order of the values in memory really changes (moving axes of size 1 is a
RESHAPE). A transpose of the model itself changes ``perm`` and writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tosa_serializer as ts

from edgeq.errors import ExportError
from edgeq.numerics import ACTIVATION_QMAX, ACTIVATION_QMIN, HALF_UP_MIN_SHIFT, MAX_SHIFT

TOSA_VERSION = (1, 0, 0)
"""The TOSA specification the files follow: v1.0, profile PRO-INT, as Vela reads it."""

NHWC = (0, 2, 3, 1)
"""The physical order of a 4-D image tensor: TOSA's and the Ethos-U's."""

RESCALE_SHIFTS = (HALF_UP_MIN_SHIFT, MAX_SHIFT)
"""TOSA RESCALE (scale32) takes shifts in [2, 62]: the half_up rule's range (docs/numerics.md 6.1)."""

INT8_RANGE = (ACTIVATION_QMIN, ACTIVATION_QMAX)
"""The values an int8 tensor takes (the input range of a RESCALE of int8 values)."""

_NUMPY_TYPES = {ts.DType.INT8: np.int8, ts.DType.INT32: np.int32}


def identity(rank: int) -> tuple[int, ...]:
    """The physical order equal to the logical one."""
    return tuple(range(rank))


def image_layout(rank: int) -> tuple[int, ...]:
    """The layout TOSA's image operators and the graph's inputs and outputs use: NHWC for 4-D tensors, the logical
    order otherwise."""
    return NHWC if rank == 4 else identity(rank)


def same_order(value: TosaValue, perm: Sequence[int]) -> bool:
    """Whether ``value`` held in ``perm`` has its values in the same order in memory as it has now: only axes of
    size 1 move."""
    moved = [value.perm.index(axis) for axis in perm if value.shape[axis] != 1]
    return moved == sorted(moved)


@dataclass(frozen=True)
class TosaOperator:
    """An operator written into the graph: its TOSA kind (``CONV2D``...), the tensor it writes, the QDQ graph's op
    whose form wrote it (the names compilers such as Vela report a layer by), the tensors it reads and its
    output's TOSA type (``INT8``...)."""

    kind: str
    output: str
    source: str
    inputs: tuple[str, ...] = ()
    dtype: str = ""


@dataclass(frozen=True)
class TosaValue:
    """A tensor of the TOSA graph: its name, logical shape, type and physical order (``perm``)."""

    name: str
    shape: tuple[int, ...]
    dtype: ts.DType
    perm: tuple[int, ...]

    @property
    def physical_shape(self) -> list[int]:
        """The shape TOSA holds the tensor in."""
        return [self.shape[axis] for axis in self.perm]

    def physical_axis(self, axis: int) -> int:
        """Where logical ``axis`` lies in the physical order."""
        return self.perm.index(axis % len(self.shape))


class TosaBuilder:
    """One TOSA graph (one region, one basic block) being written."""

    def __init__(self) -> None:
        major, minor, patch = TOSA_VERSION
        self.serializer = ts.TosaSerializer("", targetMajor=major, targetMinor=minor, targetPatch=patch, targetDraft=False)
        self._names: set[str] = set()
        self.source = ""
        """The QDQ graph's op being written: the :attr:`TosaOperator.source` of the operators written now."""
        self.operators: list[TosaOperator] = []

    # ---- tensors ---------------------------------------------------------------------------------------------------
    def unique(self, name: str) -> str:
        """``name``, or ``name`` with a number when the graph already has a tensor of that name."""
        candidate, count = name, 1
        while candidate in self._names:
            candidate, count = f"{name}.{count}", count + 1
        self._names.add(candidate)
        return candidate

    def input(self, name: str, shape: Sequence[int]) -> TosaValue:
        """A graph input of int8 values in :func:`image_layout`."""
        value = TosaValue(self.unique(name), tuple(shape), ts.DType.INT8, image_layout(len(shape)))
        self.serializer.addInputTensor(ts.TosaSerializerTensor(value.name, value.physical_shape, value.dtype, data=None))
        return value

    def output(self, value: TosaValue) -> TosaValue:
        """Make ``value`` a graph output, in :func:`image_layout` (transposed first if it is held otherwise)."""
        value = self.in_layout(value, image_layout(len(value.shape)))
        tensor = self.serializer.currRegion.currBasicBlock.getTensorByName(value.name)
        self.serializer.addOutputTensor(tensor)
        return value

    def const(self, name: str, values: np.ndarray, dtype: ts.DType) -> str:
        """A constant tensor holding ``values`` (already in TOSA's order)."""
        values = np.ascontiguousarray(values, dtype=_NUMPY_TYPES[dtype])
        return self.serializer.addConst(list(values.shape), dtype, values, name=self.unique(name)).name

    def shape(self, name: str, values: Sequence[int]) -> str:
        """A constant of TOSA's shape type (the sizes, starts and scales operators read as inputs)."""
        return self.serializer.addConst([len(values)], ts.DType.SHAPE, [int(v) for v in values], name=self.unique(name)).name

    def zero_point(self, name: str, dtype: ts.DType) -> str:
        """A zero point of 0: every edgeq tensor is symmetric."""
        return self.const(f"{name}.zp", np.zeros(1), dtype)

    def operator(
        self, op: ts.Op, inputs: Sequence[str], name: str, shape: Sequence[int], dtype: ts.DType, perm: Sequence[int],
        made: ts.TosaSerializerAttribute | None = None,
    ) -> TosaValue:
        """Write ``op`` with one output of logical ``shape`` held in ``perm`` (``made``: its attribute)."""
        value = TosaValue(self.unique(name), tuple(shape), dtype, tuple(perm))
        self.serializer.currRegion.currBasicBlock.addTensor(value.name, value.physical_shape, dtype)
        self.serializer.addOperator(op, list(inputs), [value.name], made if made is not None else attribute("NoneAttribute"))
        self.operators.append(TosaOperator(op.name, value.name, self.source, tuple(inputs), dtype.name))
        return value

    def serialize(self) -> bytes:
        """The TOSA flatbuffer."""
        return bytes(self.serializer.serialize())

    # ---- layout ----------------------------------------------------------------------------------------------------
    def in_layout(self, value: TosaValue, perm: Sequence[int]) -> TosaValue:
        """``value`` held in ``perm``: itself, a RESHAPE when only axes of size 1 move, else a TRANSPOSE."""
        perm = tuple(perm)
        if value.perm == perm:
            return value
        relaid = TosaValue(f"{value.name}.relaid", value.shape, value.dtype, perm)
        if same_order(value, perm):
            shape = self.shape(f"{relaid.name}.shape", relaid.physical_shape)
            return self.operator(ts.Op.RESHAPE, [value.name, shape], relaid.name, value.shape, value.dtype, perm, attribute("ReshapeAttribute"))
        moved = [value.perm.index(axis) for axis in perm]
        return self.operator(ts.Op.TRANSPOSE, [value.name], relaid.name, value.shape, value.dtype, perm, attribute("TransposeAttribute", moved))

    def reshape(self, value: TosaValue, shape: Sequence[int], name: str) -> TosaValue:
        """``value`` with logical ``shape`` (its values in logical order, as ONNX Reshape reads them), held in the
        logical order."""
        shape, rank = tuple(shape), len(value.shape)
        if not same_order(value, identity(rank)):
            value = self.in_layout(value, identity(rank))
        if value.shape == shape and value.perm == identity(rank):
            return value
        return self.operator(
            ts.Op.RESHAPE, [value.name, self.shape(f"{name}.shape", list(shape))], name, shape, value.dtype,
            identity(len(shape)), attribute("ReshapeAttribute"),
        )

    def broadcastable(self, value: TosaValue, rank: int, name: str) -> TosaValue:
        """``value`` as an operand of an elementwise operator of rank ``rank``: leading axes of size 1 added (as ONNX
        broadcasting reads a lower rank), in :func:`image_layout`."""
        if len(value.shape) < rank:
            value = self.reshape(value, (1,) * (rank - len(value.shape)) + value.shape, f"{name}.ranked")
        return self.in_layout(value, image_layout(rank))

    def slice(self, value: TosaValue, starts: Sequence[int], sizes: Sequence[int], name: str) -> TosaValue:
        """The block of ``value`` at logical ``starts`` of logical ``sizes``, in ``value``'s own layout."""
        physical_starts = [starts[axis] for axis in value.perm]
        physical_sizes = [sizes[axis] for axis in value.perm]
        return self.operator(
            ts.Op.SLICE, [value.name, self.shape(f"{name}.start", physical_starts), self.shape(f"{name}.size", physical_sizes)],
            name, sizes, value.dtype, value.perm, attribute("SliceAttribute"),
        )

    # ---- arithmetic ------------------------------------------------------------------------------------------------
    def rescale(
        self, value: TosaValue, multipliers: Sequence[int], shifts: Sequence[int], dtype: ts.DType, name: str, *,
        what: str, value_range: tuple[int, int] = INT8_RANGE,
    ) -> TosaValue:
        """TOSA RESCALE (scale32, SINGLE_ROUND: ``(x * M + 2**(n-1)) >> n``, then saturation to ``dtype``), one
        multiplier per tensor or per channel (the physical last axis), zero points 0.

        TOSA 1.0 requires ``2 <= n <= 62`` and every input within ``[-2**(n-1), 2**(n-1))``; ``value_range`` is the
        range the input can take (int8's by default).

        Raises:
            ExportError: a shift outside those bounds, naming ``what``.
        """
        low, high = RESCALE_SHIFTS
        for shift in shifts:
            if not low <= shift <= high or value_range[0] < -(2 ** (shift - 1)) or value_range[1] >= 2 ** (shift - 1):
                raise ExportError(
                    f"{what}: requantization shift {shift} has no TOSA RESCALE for values in {list(value_range)} (allowed: "
                    f"{low}..{high}, values within [-2**(shift-1), 2**(shift-1))); the scales around this op are "
                    "inconsistent: check its calibration"
                )
        inputs = [
            value.name,
            self.const(f"{name}.multiplier", np.asarray(multipliers), ts.DType.INT32),
            self.const(f"{name}.shift", np.asarray(shifts, dtype=np.int8), ts.DType.INT8),
            self.zero_point(f"{name}.input", value.dtype),
            self.zero_point(f"{name}.output", dtype),
        ]
        made = attribute("RescaleAttribute", True, ts.RoundingMode.SINGLE_ROUND, len(multipliers) > 1, False, False)
        return self.operator(ts.Op.RESCALE, inputs, name, value.shape, dtype, value.perm, made)

    def clamp(self, value: TosaValue, low: int, high: int, name: str) -> TosaValue:
        """TOSA CLAMP of int8 values to ``[low, high]`` (the bounds given as the bytes of int8 values)."""
        bounds = [[int(np.array(b, dtype=np.int8).view(np.uint8))] for b in (low, high)]
        made = attribute("ClampAttribute", *bounds, ts.NanPropagationMode.PROPAGATE)
        return self.operator(ts.Op.CLAMP, [value.name], name, value.shape, value.dtype, value.perm, made)


def attribute(kind: str, *args: object) -> ts.TosaSerializerAttribute:
    """A serializer attribute of ``kind`` (``"RescaleAttribute"``...) made with ``args``."""
    made = ts.TosaSerializerAttribute()
    getattr(made, kind)(*args)
    return made


