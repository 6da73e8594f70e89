"""The BatchNorm a canonical op folds: the user's BatchNorm module, or one of the rank the op's output has that
shares its parameters and running statistics.

A conv's output is 4-D, so :class:`~edgeq.quantization.qat_modules.ConvAct2d` runs a ``BatchNorm2d`` on it; a
linear layer's (N, C) output takes a ``BatchNorm1d``. A BatchNorm1d with no layer to fold into becomes a depthwise
conv of its input viewed as (N, C, L, 1), and an ``F.batch_norm`` call has no module: both get a module of the
kind the op runs, holding the same tensors, so that training updates the user's parameters and statistics
(BatchNorm1d on (N, C, L) and BatchNorm2d on (N, C, L, 1) normalise over the same values).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from edgeq.quantization.graph import getattr_path
from edgeq.quantization.patterns import argument
from edgeq.quantization.rewriter import Rewriter

_BATCH_NORM_TENSORS = ("running_mean", "running_var", "weight", "bias")
"""``F.batch_norm``'s tensor arguments after the input, in order."""


def batchnorm_as(rewriter: Rewriter, node: fx.Node, kind: type[_BatchNorm]) -> _BatchNorm:
    """The BatchNorm of a module call or an ``F.batch_norm`` call as a ``kind`` module: the module itself when it
    is one (or a SyncBatchNorm, which takes any rank), else a ``kind`` sharing its tensors.

    Raises:
        UnsupportedOpError: it keeps no running statistics (nothing to fold; the op then stays float).
    """
    if node.op == "call_module":
        source = rewriter.modules[node.target]
        name = type(source).__name__
        if isinstance(source, (kind, nn.SyncBatchNorm)):
            batchnorm = source
        else:
            tensors = (source.running_mean, source.running_var, source.weight, source.bias)
            batchnorm = _sharing(kind, tensors, source.eps, source.momentum, source.num_batches_tracked)
    else:
        name = "F.batch_norm"
        arguments = [argument(node, i, tensor_name) for i, tensor_name in enumerate(_BATCH_NORM_TENSORS, start=1)]
        tensors = tuple(getattr_path(rewriter.traced, n.target) if isinstance(n, fx.Node) and n.op == "get_attr" else n for n in arguments)
        batchnorm = _sharing(kind, tensors, argument(node, 7, "eps", 1e-5), argument(node, 6, "momentum", 0.1), None)
    if batchnorm.running_var is None:
        raise rewriter.unsupported(node, f"{name} without running statistics cannot be folded")
    return batchnorm


def _sharing(
    kind: type[_BatchNorm], tensors: tuple, eps: float, momentum: float | None, num_batches_tracked: torch.Tensor | None
) -> _BatchNorm:
    """A ``kind`` BatchNorm holding the given running mean and variance, weight and bias, and count of batches
    (which a ``momentum`` of ``None`` averages by; ``None``: a count of its own)."""
    running_mean, running_var, weight, bias = tensors
    batchnorm = kind(1 if running_var is None else running_var.numel(), eps=eps, momentum=momentum, affine=weight is not None)
    batchnorm.running_mean, batchnorm.running_var = running_mean, running_var
    if weight is not None:
        batchnorm.weight, batchnorm.bias = weight, bias
    if num_batches_tracked is not None:
        batchnorm.num_batches_tracked = num_batches_tracked
    return batchnorm
