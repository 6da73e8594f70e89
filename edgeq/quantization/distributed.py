"""torch.distributed and a prepared model: one set of ranges and one BatchNorm state on every rank.

Each rank of a DistributedDataParallel job observes its own batches. When calibration ends
(:func:`~edgeq.quantization.set_fake_quantize` leaving ``CALIBRATION``) and at
:func:`~edgeq.quantization.convert_fx`, :func:`synchronize_ranks` combines every observer over the ranks
(:meth:`~edgeq.quantization.Observer.reduce_across_ranks`) and copies every other buffer (BatchNorm's running
statistics) from rank 0, DistributedDataParallel's authoritative rank; parameters are already equal under
DistributedDataParallel. Every rank then converts the same integer model, and rank 0's checkpoint is every rank's.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from edgeq.quantization.observers import Observer, is_distributed

__all__ = ["DDP_IGNORE_ATTRIBUTE", "is_distributed", "observer_buffer_names", "synchronize_ranks"]

DDP_IGNORE_ATTRIBUTE = "_ddp_params_and_buffers_to_ignore"
"""The attribute DistributedDataParallel reads (``_set_params_and_buffers_to_ignore_for_model``): names of the
buffers it must not broadcast from rank 0 before each forward. ``prepare_qat_fx`` lists every observer's buffers
there, so each rank's observers keep seeing that rank's batches until :func:`synchronize_ranks` combines them."""


def synchronize_ranks(model: nn.Module) -> None:
    """Combine every observer of ``model`` over the ranks and copy its other buffers from rank 0; nothing
    without torch.distributed. A collective: every rank calls it with the same model."""
    if not is_distributed():
        return
    observers = [module for module in model.modules() if isinstance(module, Observer)]
    for observer in observers:
        observer.reduce_across_ranks()
    observed = {id(buffer) for observer in observers for buffer in observer.buffers()}
    for buffer in model.buffers():
        if id(buffer) not in observed:
            dist.broadcast(buffer, src=0)


def observer_buffer_names(model: nn.Module) -> list[str]:
    """The qualified names of every observer buffer in ``model`` (what DistributedDataParallel must not broadcast)."""
    return [
        f"{path}.{name}" if path else name
        for path, module in model.named_modules()
        if isinstance(module, Observer)
        for name, _ in module.named_buffers(recurse=False)
    ]
