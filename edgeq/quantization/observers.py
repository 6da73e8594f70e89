"""Observers: they watch an activation over batches and choose the range it is quantized to.

Every observer keeps the chosen range in two persistent buffers, ``running_min`` and ``running_max``, whatever
its method. A checkpoint of a calibrated model therefore loads into a QAT model prepared with another observer
(the seed flow: calibrate with a histogram, then train with an EMA), which continues from the calibrated range.

Under torch.distributed each rank observes its own batches; :meth:`Observer.reduce_across_ranks` combines the
ranks' states (docs/training.md "Distributed training" says what is exact).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from torch import nn

from edgeq.numerics import SCALE_FLOOR

ObserverFactory = Callable[[], "Observer"]


class Observer(nn.Module):
    """Base class: records ``running_min`` / ``running_max`` and returns the clipping range."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_min", torch.tensor(float("inf")))
        self.register_buffer("running_max", torch.tensor(float("-inf")))

    @classmethod
    def with_args(cls, **kwargs: Any) -> ObserverFactory:
        """A factory that builds this observer with ``kwargs`` (what a :class:`QConfig` holds)."""
        return functools.partial(cls, **kwargs)

    @property
    def has_data(self) -> bool:
        """Whether any batch has been observed (or a range loaded from a checkpoint)."""
        return bool(self.running_min <= self.running_max)

    def observe(self, value: torch.Tensor) -> None:
        """Record one batch."""
        raise NotImplementedError

    def clipping_range(self) -> tuple[float, float]:
        """The range ``(low, high)`` to quantize to."""
        self._update_range()
        return float(self.running_min), float(self.running_max)

    def clipping_amax(self) -> torch.Tensor:
        """``max(-low, high, 0)`` of :meth:`clipping_range`: the magnitude a symmetric scale must represent, a
        float32 0-d tensor on the observer's device (0 before any data), computed without reading it on the host."""
        self._update_range()
        return torch.clamp(torch.maximum(-self.running_min, self.running_max), min=0.0)

    def _update_range(self) -> None:
        """Bring ``running_min`` / ``running_max`` up to date with what was observed (they are, unless a subclass
        chooses its range lazily)."""

    def reduce_across_ranks(self) -> None:
        """Combine the state of every rank of torch.distributed's default group, in place: the range becomes the
        smallest ``running_min`` and the largest ``running_max`` of any rank (a rank with no data is neutral).
        A collective: every rank calls it. Repeating it changes nothing."""
        dist.all_reduce(self.running_min, op=dist.ReduceOp.MIN)
        dist.all_reduce(self.running_max, op=dist.ReduceOp.MAX)

    def extra_repr(self) -> str:
        if not self.has_data:
            return "no data"
        low, high = self.clipping_range()
        return f"range=[{low:.6g}, {high:.6g}]"


class MinMaxObserver(Observer):
    """The smallest and largest value seen over all batches."""

    def observe(self, value: torch.Tensor) -> None:
        low, high = torch.aminmax(value.detach().to(torch.float32))
        self.running_min = torch.minimum(self.running_min, low)
        self.running_max = torch.maximum(self.running_max, high)


class EMAMinMaxObserver(Observer):
    """Exponential moving average of each batch's min and max: the QAT default, as in torch.ao.

    Args:
        averaging_constant: weight of the newest batch, in (0, 1].
    """

    def __init__(self, averaging_constant: float = 0.01) -> None:
        super().__init__()
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1]; got {averaging_constant}")
        self.averaging_constant = averaging_constant

    def observe(self, value: torch.Tensor) -> None:
        low, high = torch.aminmax(value.detach().to(torch.float32))
        first = ~(self.running_min <= self.running_max)  # no data yet: start from this batch (a tensor: no host read)
        c = self.averaging_constant
        self.running_min = torch.where(first, low, self.running_min + c * (low - self.running_min))
        self.running_max = torch.where(first, high, self.running_max + c * (high - self.running_max))


class HistogramObserver(Observer):
    """A histogram of |x| over all batches, then a clipping threshold chosen by MSE or percentile.

    With ``method="mse"`` (the calibration default) the threshold t minimises the expected squared error of
    symmetric int8 quantization over the histogram: values above t cost ``(|x| - t)**2`` (clipping), values
    below cost ``(t / 127)**2 / 12`` (rounding). With ``method="percentile"`` t is the given percentile of |x|.
    Outliers therefore do not stretch the scale as they do with min/max.

    The histogram has a fixed number of bins over [0, R]; when a batch exceeds R, R doubles as often as needed
    and adjacent bins merge, so no count is ever re-interpolated. The histogram itself is not saved in a
    checkpoint; the chosen range is (``running_min`` / ``running_max``).

    Args:
        method: ``"mse"`` or ``"percentile"``.
        bins: number of histogram bins, a power of two.
        percentile: for ``method="percentile"``, in (0, 100].
    """

    def __init__(self, method: Literal["mse", "percentile"] = "mse", bins: int = 2048, percentile: float = 99.99):
        super().__init__()
        if method not in ("mse", "percentile"):
            raise ValueError(f"method must be 'mse' or 'percentile'; got {method!r}")
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2; got {bins}")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100]; got {percentile}")
        self.method = method
        self.bins = bins
        self.percentile = percentile
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64), persistent=False)
        self.register_buffer("histogram_max", torch.tensor(0.0, dtype=torch.float64), persistent=False)
        self.register_buffer("data_min", torch.tensor(float("inf")), persistent=False)
        self.register_buffer("data_max", torch.tensor(float("-inf")), persistent=False)
        self._stale = False
        self.register_state_dict_pre_hook(_choose_range_before_saving)

    def observe(self, value: torch.Tensor) -> None:
        value = value.detach().to(torch.float32)
        low, high = torch.aminmax(value)
        self.data_min = torch.minimum(self.data_min, low)
        self.data_max = torch.maximum(self.data_max, high)
        magnitude = value.abs().flatten().to(torch.float64)
        largest = float(magnitude.max())
        if float(self.histogram_max) == 0.0:
            if is_distributed():  # every rank starts from the same grid, so reduce_across_ranks can add the counts
                largest = _max_over_ranks(largest, magnitude.device)
            self.histogram_max.fill_(max(largest, SCALE_FLOOR))
        elif largest > float(self.histogram_max):
            self._grow(largest)
        self.histogram += torch.histc(magnitude, bins=self.bins, min=0.0, max=float(self.histogram_max))
        self._stale = True

    def _grow(self, largest: float) -> None:
        factor = 1
        while float(self.histogram_max) * factor < largest:
            factor *= 2
        merged = torch.zeros_like(self.histogram)
        if factor >= self.bins:
            merged[0] = self.histogram.sum()
        else:
            merged[: self.bins // factor] = self.histogram.reshape(-1, factor).sum(dim=1)
        self.histogram = merged
        self.histogram_max.mul_(factor)

    def _threshold(self, counts: torch.Tensor) -> float:
        width = float(self.histogram_max) / self.bins
        upper_edges = torch.arange(1, self.bins + 1, dtype=torch.float64, device=counts.device) * width
        if self.method == "percentile":
            cumulative = torch.cumsum(counts, 0) / counts.sum()
            index = int(torch.searchsorted(cumulative, self.percentile / 100.0 * (1 - 1e-12)))
            return float(upper_edges[min(index, self.bins - 1)])
        centers = upper_edges - width / 2
        # clipping error of every bin above a threshold, via suffix sums of h, h*c and h*c^2
        def suffix(x: torch.Tensor) -> torch.Tensor:
            return torch.flip(torch.cumsum(torch.flip(x, [0]), 0), [0]) - x

        above_count = suffix(counts)
        above_sum = suffix(counts * centers)
        above_square = suffix(counts * centers**2)
        thresholds = upper_edges
        clipping = above_square - 2 * thresholds * above_sum + thresholds**2 * above_count
        rounding = (thresholds / 127.0) ** 2 / 12.0 * (counts.sum() - above_count)
        return float(thresholds[int(torch.argmin(clipping + rounding))])

    def _update_range(self) -> None:
        if self._stale:
            self._choose_range(self.histogram, self.data_min, self.data_max)

    def _choose_range(self, counts: torch.Tensor, data_min: torch.Tensor, data_max: torch.Tensor) -> None:
        threshold = self._threshold(counts)
        self.running_min = torch.clamp(data_min, min=-threshold)
        self.running_max = torch.clamp(data_max, max=threshold)
        self._stale = False

    def reduce_across_ranks(self) -> None:
        """Choose the range from the sum of every rank's histogram (the ranks' own histograms are kept, so
        repeating it changes nothing). The ranks started from one grid (the largest first batch of any rank)
        and each doubled it as its data needed; each doubles its copy to the largest, then the counts add up:
        the histogram a single process would have built from each step's batches of all ranks together."""
        histogram_max = self.histogram_max.clone()
        dist.all_reduce(histogram_max, op=dist.ReduceOp.MAX)
        if float(histogram_max) == 0.0:  # no rank has a histogram: a range loaded from a checkpoint, or none
            super().reduce_across_ranks()
            return
        if float(self.histogram_max) == 0.0:
            self.histogram_max.copy_(histogram_max)
        elif float(histogram_max) > float(self.histogram_max):
            self._grow(float(histogram_max))
        counts, data_min, data_max = self.histogram.clone(), self.data_min.clone(), self.data_max.clone()
        dist.all_reduce(counts)
        dist.all_reduce(data_min, op=dist.ReduceOp.MIN)
        dist.all_reduce(data_max, op=dist.ReduceOp.MAX)
        self._choose_range(counts, data_min, data_max)

    @property
    def has_data(self) -> bool:
        return self._stale or super().has_data


def is_distributed() -> bool:
    """Whether torch.distributed's default process group is initialized (observers then combine over ranks)."""
    return dist.is_available() and dist.is_initialized()


def _max_over_ranks(value: float, device: torch.device) -> float:
    largest = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return float(largest)


def _choose_range_before_saving(module: HistogramObserver, prefix: str, keep_vars: bool) -> None:
    """state_dict pre-hook: a checkpoint holds the range chosen from every batch observed so far."""
    module.clipping_range()
