"""``EdgeqQuantizer``: edgeq's quantization as a torchao PT2E ``Quantizer`` (PyTorch 2's flow)::

    exported = torch.export.export(float_model.eval(), (x,)).module()
    prepared = prepare_pt2e(exported, EdgeqQuantizer("npu-m"))
    for batch in batches:
        prepared(batch)                       # calibration: edgeq's observers watch every quantized tensor
    converted = convert_pt2e(prepared)        # quantize / dequantize ops at edgeq's scales
    int_model = from_pt2e(converted)          # edgeq's IntegerModel: export, check, compile as usual

The quantizer places quantizers where edgeq's ``prepare_qat_fx`` does (:mod:`.pt2e_annotate`) and observes with
the qconfig's edgeq observers under the target's scale rule (:mod:`.pt2e_observers`), so every scale of the
converted graph is the one edgeq's own flow chooses from the same ranges.

torchao is optional (``pip install edgeq[pt2e]``); this module imports it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.fx as fx
from torchao.quantization.pt2e.observer import ObserverBase
from torchao.quantization.pt2e.quantizer import EdgeOrNode, Quantizer

from edgeq.errors import QuantizationError
from edgeq.quantization.pt2e_annotate import ANNOTATION_KEY, FOLLOWS_KEY, Specs, annotate_graph
from edgeq.quantization.pt2e_observers import SharedScaleObserver
from edgeq.quantization.pt2e_rebuild import TARGET_META, from_pt2e
from edgeq.quantization.qconfig import QConfig, default_calib_qconfig
from edgeq.quantization.target_constraints import check_fixed_scale
from edgeq.targets import TargetLike, load_target

__all__ = ["EdgeqQuantizer", "from_pt2e"]


class EdgeqQuantizer(Quantizer):
    """A torchao PT2E quantizer applying edgeq's quantization for ``target``.

    Args:
        target: target name (``"npu-s"``), path to a target file, or :class:`~edgeq.targets.Target`.
        qconfig: an edgeq :class:`QConfig` preset (its activation observer watches every activation). Only the
            int8 output is taken here; an int32 output (``output_dtype="int32"``) is edgeq's flow only.
        input_scales: fixed scales of model inputs by placeholder name (``QuantStub(scale=...)``).
        is_qat: for ``prepare_qat_pt2e``: edgeq's fake quantizers (``set_fake_quantize`` sets their state) instead
            of observers.

    Raises:
        QuantizationError: a qconfig that is not an edgeq QConfig or asks for an int32 output, or a fixed input
            scale that the target's scale rule refuses.
    """

    def __init__(
        self,
        target: TargetLike,
        qconfig: QConfig = default_calib_qconfig,
        *,
        input_scales: Mapping[str, float] | None = None,
        is_qat: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(qconfig, QConfig):
            raise QuantizationError(f"EdgeqQuantizer: qconfig must be an edgeq QConfig preset; got {type(qconfig).__name__}")
        if qconfig.output_dtype != "int8":
            raise QuantizationError(
                "EdgeqQuantizer: int32 outputs (output_dtype='int32') are not annotated in the PT2E flow; use an int8 "
                "qconfig, or edgeq's prepare_qat_fx for a model whose last layer keeps its int32 result"
            )
        self.target = load_target(target)
        self.qconfig = qconfig
        self.input_scales = dict(input_scales or {})
        for name, scale in self.input_scales.items():
            check_fixed_scale(self.target, name, scale)
        self.specs = Specs.of(self.target, qconfig, self.input_scales, is_qat)

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        """Mark every tensor edgeq quantizes (:func:`~edgeq.quantization.pt2e_annotate.annotate_graph`)."""
        annotate_graph(model.graph, self.specs, self.target.quantization.concat_shares_input_scale)
        model.meta[TARGET_META] = self.target
        return model

    def prepare_obs_or_fq_callback(self, model: fx.GraphModule, edge_or_node_to_obs_or_fq: dict[EdgeOrNode, ObserverBase]) -> None:
        """A tensor that shares a quantizer without being observed (:data:`FOLLOWS_KEY`), and the edges reading it in
        the same group, get a :class:`SharedScaleObserver` of the group's observer: the range is the leader
        tensor's alone."""
        followers: dict[int, SharedScaleObserver] = {}
        groups = dict(edge_or_node_to_obs_or_fq)
        for key, observer in groups.items():
            source = key[0] if isinstance(key, tuple) else key
            shared = source is key or groups.get(source) is observer
            if source.meta.get(FOLLOWS_KEY) and shared:
                edge_or_node_to_obs_or_fq[key] = followers.setdefault(id(observer), SharedScaleObserver(observer))

    def validate(self, model: fx.GraphModule) -> None:
        """Refuse a fixed input scale naming no input of the graph, and a graph with nothing to quantize.

        Raises:
            QuantizationError: naming the input or the graph.
        """
        inputs = {node.name for node in model.graph.nodes if node.op == "placeholder"}
        unknown = sorted(set(self.input_scales) - inputs)
        if unknown:
            raise QuantizationError(
                f"EdgeqQuantizer: input_scales names {unknown}, not inputs of the exported graph (its inputs: {sorted(inputs)})"
            )
        if not any(ANNOTATION_KEY in node.meta for node in model.graph.nodes):
            raise QuantizationError(
                f"EdgeqQuantizer: {type(model).__name__}'s exported graph has no op edgeq quantizes "
                "(conv2d, linear, add, concat, pools, activations...)"
            )
