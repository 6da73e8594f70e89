"""The compiled graph: one typed description of the program edgeq built, the contract between compile, the perf
estimator, the HTML report and the visualizer.

Ops are the check's ops (after fusion) with their placement, region, typed settings (:mod:`edgeq.op_attrs`), MACs,
bytes moved, requantization constants and the TVM kernel they landed in; tensors are the quantized tensors between
ops (seen through QuantizeLinear / DequantizeLinear) with shape, dtype, real byte size, quantization, producer and
consumers; regions list their border tensors. ``graph.json`` in the artifact is :meth:`CompiledGraph.to_dict`, and
``npu_program.json`` is derived from it (:mod:`.npu_program`). docs/artifact.md describes every field.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeq.check.report import CheckReport, NodeReport
from edgeq.check.work import work
from edgeq.compile.partition import Partition, TensorSpec, graph_of
from edgeq.compile.requantization import Requantization, requantization
from edgeq.errors import EdgeqError
from edgeq.export.onnx_nodes import node_attributes, node_name
from edgeq.export.onnx_reader import QDQModel, QuantParams
from edgeq.op_attrs import OnnxAttrs, OpAttrs, attributes_from_json
from edgeq.ops import Op, op_named

SCHEMA_VERSION = 4
"""Version of :meth:`CompiledGraph.to_dict`'s layout; :meth:`CompiledGraph.from_dict` refuses others."""


class CompiledGraphError(EdgeqError):
    """A compiled graph cannot be read: not an artifact, a damaged one, or another schema version."""


@dataclass(frozen=True)
class Quant:
    """How a quantized tensor maps to real numbers: ``real = (q - zero_point) * scale`` (per channel along
    ``axis`` when there are several scales)."""

    scale: list[float]
    zero_point: list[int]
    axis: int | None

    @classmethod
    def of(cls, params: QuantParams) -> Quant:
        return cls(list(params.scales), list(params.zero_points), params.axis)


@dataclass(frozen=True)
class Tensor:
    """A tensor of the program.

    Attributes:
        name: the quantized tensor's name in the QDQ model (a QuantizeLinear output, or a constant).
        shape: static shape (-1 for a dimension shape inference could not tell).
        dtype: ``int8``, ``uint8``, ``int32``, ``float32``...
        bytes: ``prod(shape) * itemsize`` (0 when the shape is not static).
        quant: quantization, None for a float tensor.
        producer: the op making it; None for model inputs and constants.
        consumers: the ops reading it.
        kind: ``input``, ``activation``, ``constant`` or ``output``.
    """

    name: str
    shape: list[int]
    dtype: str
    bytes: int
    quant: Quant | None
    producer: str | None
    consumers: list[str]
    kind: str


@dataclass(frozen=True)
class GraphOp:
    """An op of the program (the check's op, after fusion).

    Attributes:
        name: the ONNX node name (the MatMul's for a MatMul + bias Add).
        op: edgeq's op (an :class:`edgeq.ops.Op`, as the check record's; a name given as a string becomes the
            member) or, for an op edgeq does not know, the check's lowercase name of it.
        source_ops: the ONNX op types fused into it.
        placement: ``NPU``, ``CPU``, ``CPU (float)`` or ``unsupported``.
        region: the region it runs in.
        inputs: activation tensors it reads; outputs: tensors it makes; constants: weights and biases.
        attributes: the check record's settings (:mod:`edgeq.op_attrs`: :class:`~edgeq.op_attrs.Conv2dAttrs`...),
            or for an op whose record has none, its ONNX node's attributes (:class:`~edgeq.op_attrs.OnnxAttrs`).
        macs: multiply-accumulates per inference (conv2d, linear, matmul; 0 for other ops, :mod:`edgeq.check.work`).
        non_mac_ops: elementary operations per inference that are not MACs (an add's scaled inputs, a pool's sums
            or comparisons, a copy or activation per element); ``ops`` in ``graph.json``.
        bytes_in, bytes_out, weight_bytes: bytes of ``inputs``, ``outputs`` and ``constants``.
        requantization: integer rescaling constants, None when the op keeps its input's scale.
        kernel: the TVM PrimFunc writing its output (None when it needs no kernel of its own: a reshape is a view).
        calls: the indices of the kernel calls computing it (part of), among its region's (:mod:`.kernel_map`).
        parallel: whether that kernel runs on all cores (small kernels run on one: waking the threads costs more).
        reasons: why it is not on the NPU (empty when it is, or on a CPU target).
        advice: what would move it to the NPU or make it faster.
    """

    name: str
    op: Op | str
    source_ops: list[str]
    placement: str
    region: str
    inputs: list[str]
    outputs: list[str]
    constants: list[str]
    attributes: OpAttrs
    macs: int
    non_mac_ops: int
    bytes_in: int
    bytes_out: int
    weight_bytes: int
    requantization: Requantization | None
    kernel: str | None
    calls: list[int]
    parallel: bool
    reasons: list[str]
    advice: list[str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "op", op_named(self.op) or self.op)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the op as ``graph.json`` holds it."""
        data = {**asdict(self), "attributes": self.attributes.to_json()}
        return {_JSON_KEYS.get(key, key): value for key, value in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphOp:
        """The op of a :meth:`to_dict` result.

        Raises:
            KeyError, TypeError: a missing or unexpected field.
        """
        fields = {_FIELDS.get(key, key): value for key, value in data.items()}
        requantization = fields["requantization"]
        return cls(
            **{
                **fields,
                "attributes": attributes_from_json(fields["op"], fields["attributes"]),
                "requantization": Requantization(**requantization) if requantization is not None else None,
            }
        )


_JSON_KEYS = {"non_mac_ops": "ops"}
"""The ``graph.json`` keys of the :class:`GraphOp` fields named otherwise."""

_FIELDS = {key: name for name, key in _JSON_KEYS.items()}


@dataclass(frozen=True)
class Region:
    """A run of ops with one placement, called in order by ``main``; ``inputs`` and ``outputs`` are the tensors
    that cross its border."""

    name: str
    placement: str
    ops: list[str]
    inputs: list[str]
    outputs: list[str]


@dataclass(frozen=True)
class TargetInfo:
    """The target as the manifest names it."""

    name: str
    kind: str
    host: str | None


@dataclass(frozen=True)
class CompiledGraph:
    """The compiled program as data (see the module docstring).

    Attributes:
        target: the target compiled for.
        arch: the library's architecture (``x86_64`` or ``aarch64``).
        dot_product: the int8 dot product its CPU kernels are built with (a name of
            :data:`edgeq.compile.cpu_features.DOT_PRODUCTS`: ``vnni``, ``avx2-pmaddwd``, ``sdot``...).
        inputs, outputs: the program's tensors (quantized names; the model's names are in the manifest).
        tensors: every tensor by name.
        ops: in topological (call) order.
        regions: in call order.
        schema_version: :data:`SCHEMA_VERSION`.
    """

    target: TargetInfo
    arch: str
    dot_product: str
    inputs: list[str]
    outputs: list[str]
    tensors: dict[str, Tensor]
    ops: list[GraphOp]
    regions: list[Region]
    schema_version: int = SCHEMA_VERSION

    def op(self, name: str) -> GraphOp:
        """The op called ``name``."""
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(name)

    def with_kernels(self, kernels: dict[str, tuple[str, list[int]]], parallel: set[str]) -> CompiledGraph:
        """The same graph with the kernel and calls of each op named in ``kernels``
        (:func:`edgeq.compile.kernel_map.kernel_map`); ``parallel``: the kernels that run on all cores."""
        ops = []
        for op in self.ops:
            kernel, calls = kernels.get(op.name, (op.kernel, op.calls))
            ops.append(replace(op, kernel=kernel, calls=calls, parallel=kernel in parallel))
        return replace(self, ops=ops)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the content of ``graph.json``."""
        return {**asdict(self), "ops": [op.to_dict() for op in self.ops]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompiledGraph:
        """The graph of a ``to_dict`` result.

        Raises:
            CompiledGraphError: another schema version, or a missing or unexpected field.
        """
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise CompiledGraphError(
                f"compiled graph schema version {version!r}; this edgeq reads version {SCHEMA_VERSION} (recompile the model)"
            )
        try:
            tensors = {
                name: Tensor(**{**t, "quant": Quant(**t["quant"]) if t["quant"] is not None else None})
                for name, t in data["tensors"].items()
            }
            ops = [GraphOp.from_dict(o) for o in data["ops"]]
            return cls(
                target=TargetInfo(**data["target"]),
                arch=data["arch"],
                dot_product=data["dot_product"],
                inputs=list(data["inputs"]),
                outputs=list(data["outputs"]),
                tensors=tensors,
                ops=ops,
                regions=[Region(**r) for r in data["regions"]],
                schema_version=version,
            )
        except (KeyError, TypeError) as error:
            raise CompiledGraphError(f"compiled graph: missing or unexpected field ({error})") from None


def load_compiled_graph(artifact: str | Path) -> CompiledGraph:
    """The compiled graph of a ``.edgeq`` artifact, after verifying the artifact.

    Raises:
        CompiledGraphError: the file is missing, not an artifact, damaged, has no ``graph.json``, or a graph of
            another schema version.
    """
    from edgeq.compile.artifact import GRAPH
    from edgeq_runtime import Artifact, ArtifactError

    try:
        members = Artifact.read(artifact).members
    except ArtifactError as error:
        raise CompiledGraphError(str(error)) from None
    if GRAPH not in members:
        raise CompiledGraphError(f"{artifact}: no {GRAPH} member (compiled by an older edgeq; recompile the model)")
    try:
        data = json.loads(members[GRAPH])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CompiledGraphError(f"{artifact}: {GRAPH} is not valid JSON ({error})") from None
    try:
        return CompiledGraph.from_dict(data)
    except CompiledGraphError as error:
        raise CompiledGraphError(f"{artifact}: {GRAPH}: {error}") from None


# ---- building it in compile ---------------------------------------------------------------------------------------


def build_compiled_graph(qdq: QDQModel, report: CheckReport, partition: Partition, arch: str, dot_product: str) -> CompiledGraph:
    """The compiled graph of ``partition`` (placed by ``report``), without kernels
    (:meth:`CompiledGraph.with_kernels`)."""
    return _Builder(qdq, report, partition).build(arch, dot_product)


class _Builder:
    def __init__(self, qdq: QDQModel, report: CheckReport, partition: Partition) -> None:
        self.graph = graph_of(qdq)
        self.report = report
        self.partition = partition
        self.boundary: dict[str, TensorSpec] = {s.name: s for s in [*partition.inputs, *partition.outputs]}
        self.value_types = {
            info.name: info.type.tensor_type.elem_type
            for info in [*self.graph.model.graph.input, *self.graph.model.graph.value_info, *self.graph.model.graph.output]
        }

    def build(self, arch: str, dot_product: str) -> CompiledGraph:
        nodes = {node_name(n): n for n in self.graph.ops}
        region_of = {name: region.name for region in self.partition.regions for name in region.nodes}
        wiring = {n.record.name: self._wiring(nodes[n.record.name]) for n in self.report.nodes}
        producers = {t: op for op, (_, outs, _) in wiring.items() for t in outs}
        consumers: dict[str, list[str]] = {}
        for op, (ins, _, consts) in wiring.items():
            for t in [*ins, *consts]:
                consumers.setdefault(t, []).append(op)
        names = [*self.boundary, *producers, *consumers]
        tensors = {t: self._tensor(t, producers.get(t), consumers.get(t, [])) for t in dict.fromkeys(names)}
        ops = [self._op(node, region_of.get(node.record.name, ""), *wiring[node.record.name], tensors, nodes) for node in self.report.nodes]
        regions = [Region(r.name, r.placement.value, list(r.nodes), list(r.inputs), list(r.outputs)) for r in self.partition.regions]
        target = self.report.target
        return CompiledGraph(
            target=TargetInfo(target.name, target.kind.value, target.host),
            arch=arch,
            dot_product=dot_product,
            inputs=[s.name for s in self.partition.inputs],
            outputs=[s.name for s in self.partition.outputs],
            tensors=tensors,
            ops=ops,
            regions=regions,
        )

    def _wiring(self, node: onnx.NodeProto) -> tuple[list[str], list[str], list[str]]:
        """(activation inputs, outputs, constants) of an op, seen through Q/DQ, without a fused op's inner tensors."""
        members = self.graph.members(node)
        inner = {t for member in members[:-1] for t in member.output}
        inputs = [t for t in dict.fromkeys(self.graph.consumed(node)) if t not in inner]
        outputs = [t for t in dict.fromkeys(self.graph.produced(node)) if t not in inner]
        constants = []
        for member in members:
            for tensor in member.input:
                dequantized = self.graph.dequantized(tensor)
                name = dequantized[0] if dequantized is not None else tensor
                weight = dequantized is not None or self.graph.constants.get(name, np.empty(0, np.int64)).dtype.kind == "f"
                if name in self.graph.constants and tensor not in inner and weight and self.graph.constants[name].size > 1:
                    constants.append(name)
        return inputs, outputs, list(dict.fromkeys(constants))

    def _dtype(self, name: str) -> str:
        if name in self.boundary:
            return self.boundary[name].dtype
        if name in self.graph.qdq.quant:
            return self.graph.qdq.quant[name].dtype
        if name in self.graph.constants:
            return str(self.graph.constants[name].dtype)
        elem_type = self.value_types.get(name, onnx.TensorProto.FLOAT)
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))

    def _tensor(self, name: str, producer: str | None, consumers: list[str]) -> Tensor:
        spec = self.boundary.get(name)
        shape = list(spec.shape) if spec is not None else list(self.graph.shapes.get(name, ()))
        dtype = self._dtype(name)
        static = all(d > 0 for d in shape)
        params = spec.quant if spec is not None else self.graph.qdq.quant.get(name)
        if name in self.graph.constants:
            kind = "constant"
        elif any(s.name == name for s in self.partition.inputs):
            kind = "input"
        elif any(s.name == name for s in self.partition.outputs):
            kind = "output"
        else:
            kind = "activation"
        return Tensor(
            name=name,
            shape=shape,
            dtype=dtype,
            bytes=math.prod(shape) * np.dtype(dtype).itemsize if static else 0,
            quant=Quant.of(params) if params is not None else None,
            producer=producer,
            consumers=consumers,
            kind=kind,
        )

    def _op(
        self,
        node: NodeReport,
        region: str,
        inputs: list[str],
        outputs: list[str],
        constants: list[str],
        tensors: dict[str, Tensor],
        nodes: dict[str, onnx.NodeProto],
    ) -> GraphOp:
        record = node.record
        onnx_node = nodes[record.name]
        placement = node.where
        attributes = record.attrs if record.attrs is not None else OnnxAttrs(_plain(_onnx_attributes(onnx_node)))
        macs, non_mac_ops = work(record.op, attributes, [tensors[t].shape for t in inputs], tensors[outputs[0]].shape if outputs else None)
        return GraphOp(
            name=record.name,
            op=record.op,
            source_ops=[m.op_type for m in self.graph.members(onnx_node)],
            placement=placement,
            region=region,
            inputs=inputs,
            outputs=outputs,
            constants=constants,
            attributes=attributes,
            macs=macs,
            non_mac_ops=non_mac_ops,
            bytes_in=sum(tensors[t].bytes for t in inputs),
            bytes_out=sum(tensors[t].bytes for t in outputs),
            weight_bytes=sum(tensors[t].bytes for t in constants),
            requantization=requantization(record, self.report.target.quantization.rounding),
            kernel=None,
            calls=[],
            parallel=False,
            reasons=[r.message for r in node.reasons],
            advice=node.advice,
        )


def _plain(value: Any) -> Any:
    """JSON-ready: tuples become lists and bytes strings, recursively."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _onnx_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """An ONNX node's attributes, without tensors."""
    return {k: v for k, v in node_attributes(node).items() if not isinstance(v, onnx.TensorProto)}

