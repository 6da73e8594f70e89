"""How an integer tensor of the integer model maps to real numbers (its scales), apart from the ops that make it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgeq.errors import QuantizationError


@dataclass(frozen=True)
class TensorQuant:
    """How an integer tensor maps to real numbers: ``real = float32(q) * scale``.

    ``scales`` has one entry (per tensor) or one per channel along ``axis`` (an int32 output of a conv/linear,
    whose scale is ``s_in * s_w[c]``). The zero point is always 0.
    """

    dtype: Literal["int8", "int32"]
    scales: tuple[float, ...]
    axis: int | None = None

    @property
    def scale(self) -> float:
        """The per-tensor scale.

        Raises:
            QuantizationError: the tensor is quantized per channel.
        """
        if len(self.scales) != 1 or self.axis is not None:
            raise QuantizationError(f"expected a per-tensor scale; got {len(self.scales)} scales along axis {self.axis}")
        return self.scales[0]
