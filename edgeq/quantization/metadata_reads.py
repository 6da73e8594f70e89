"""Ops that read a tensor only for its dtype, rewritten to read no tensor, so that their results are constants.

``x.new_full(size, v)`` is ``torch.full(size, v)`` in ``x``'s dtype whatever ``x`` holds, and ``a.type_as(x)`` is
``a`` in ``x``'s dtype: YOLO's Detect head makes its anchors and strides so (``torch.arange(w).type_as(feature)``,
``feature.new_full((h * w, 1), stride)``). Read as written, the feature makes them part of the integer region, ops
left in float; rewritten on the dtype recorded from the example inputs, they are computed from constants alone
(:func:`~edgeq.quantization.graph.constant_tensors`), and the integer region reads them as quantized constants.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from edgeq.quantization.graph import VALUE_KEY, TensorInfo, constant_tensors, produces_tensor

_ATEN = torch.ops.aten
_FILLS = {
    "new_full": torch.full, "new_zeros": torch.zeros, "new_ones": torch.ones, "new_empty": torch.empty,
    _ATEN.new_full.default: torch.full, _ATEN.new_zeros.default: torch.zeros,
    _ATEN.new_ones.default: torch.ones, _ATEN.new_empty.default: torch.empty,
}
"""``x.new_*(size, ...)`` (fx method names, aten overloads) and the factory computing the same from ``size``."""

_TYPE_AS = ("type_as", _ATEN.type_as.default)


def drop_metadata_reads(module: fx.GraphModule) -> None:
    """Rewrite each ``x.new_*(size, ...)`` and each ``a.type_as(x)`` of a constant ``a`` (in place) to the same
    computation without ``x``, in the dtype recorded in ``node.meta`` (``record_example_values`` ran before)."""
    for node in list(module.graph.nodes):
        key = node.target if node.op in ("call_method", "call_function") else None
        info = node.meta.get(VALUE_KEY)
        if key is None or not isinstance(info, TensorInfo) or not (key in _FILLS or key in _TYPE_AS):
            continue
        with module.graph.inserting_before(node):
            if key in _FILLS:
                replacement = module.graph.call_function(_FILLS[key], tuple(node.args[1:]), {"dtype": info.dtype})
            elif _reads_constants_only(module, node.args[0]):
                replacement = module.graph.call_method("to", (node.args[0], info.dtype))
            else:
                continue
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        module.graph.erase_node(node)
    module.graph.lint()
    module.recompile()


def _reads_constants_only(module: fx.GraphModule, value: object) -> bool:
    """Whether ``value`` is a constant tensor node (no model input's values flow into it)."""
    return isinstance(value, fx.Node) and produces_tensor(value) and value in constant_tensors(module)

