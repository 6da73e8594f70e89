"""The padding of a sliding-window operator (convolutions, pools) as TOSA takes it.

TOSA requires each spatial size to give exactly the output size: ``in + pad_before + pad_after - extent`` divisible
by the stride, where ONNX and PyTorch drop the rows a last, incomplete window would read (or, with ``ceil_mode``,
pad them). The padding after is therefore recomputed from the output size; rows no window reads are sliced off.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgeq.export.tosa.builder import NHWC, TosaBuilder, TosaValue


def window_input(
    builder: TosaBuilder,
    value: TosaValue,
    output_hw: Sequence[int],
    extents: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[int],
    name: str,
) -> tuple[TosaValue, list[int]]:
    """``value`` in NHWC, cropped where no window reads it, and TOSA's ``[top, bottom, left, right]`` padding.

    Args:
        output_hw: the output's height and width.
        extents: the window's height and width with dilation (``(k - 1) * d + 1``).
        strides: the strides.
        pads: ONNX's ``[top, left, bottom, right]``.
    """
    value = builder.in_layout(value, NHWC)
    padding, crop = [], []
    for axis in (0, 1):
        size, before = value.shape[2 + axis], pads[axis]
        after = (output_hw[axis] - 1) * strides[axis] + extents[axis] - size - before
        padding += [before, max(after, 0)]
        crop.append(max(-after, 0))
    if any(crop):
        sizes = [*value.shape[:2], value.shape[2] - crop[0], value.shape[3] - crop[1]]
        value = builder.slice(value, [0, 0, 0, 0], sizes, f"{name}.cropped")
    return value, padding
