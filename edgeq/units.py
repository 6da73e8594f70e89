"""Numbers as people read them, one spelling for every message, table, graph and report.

Example:
    >>> shape_text((1, 64, 56, 56)), bytes_text(200704), count_text(115_605_504)
    ('1x64x56x56', '196.0 KiB', '115.6 M')
"""

from __future__ import annotations

from collections.abc import Sequence


def shape_text(shape: Sequence[int]) -> str:
    """``1x64x56x56`` (``scalar`` for a rank-0 shape)."""
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def bytes_text(count: int) -> str:
    """Bytes in binary units: ``512 B``, ``1.5 KiB``, ``2.0 MiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def count_text(count: float) -> str:
    """A count with an SI prefix: ``950``, ``12.3 k``, ``115.6 M``, ``1.8 G``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:g}"
