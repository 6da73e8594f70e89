"""Reading QDQ ONNX files (edgeq's and other tools') into the form the compiler consumes.

:func:`load_onnx` validates the file (ONNX checker, full check), then recovers the quantization of every
quantized tensor from its QuantizeLinear / DequantizeLinear nodes: dtype, scale(s), zero point(s) and axis.
Structural problems (a scale that is not a positive constant, zero points that disagree with the scales'
shape, a tensor quantized one way and dequantized another) are errors naming the file and the node. What is
valid QDQ but does not fit edgeq's integer numerics (uint8 or asymmetric activations, a bias whose scale is not
``s_in * s_w``, ops outside edgeq's vocabulary) is recorded as a :class:`Finding`, never changed: the check and
compile stages decide what to do with it.

:func:`load_torchscript` reads a ``.pt`` file saved from :func:`edgeq.export.trace`, which carries the QDQ form
of the same integer model; :func:`load_model_file` accepts either.
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edgeq.errors import ModelFileError, first_line
from edgeq.export.onnx_checks import check_graph, check_interface
from edgeq.export.onnx_nodes import (
    QUANTIZE_NODES,
    gated_activation,
    graph_constants,
    is_weight_tensor,
    node_attributes,
    node_name,
    node_op,
    unquantized,
    with_tensor_constants,
)
from edgeq.export.onnx_writer import ROUNDING_METADATA_KEY, TARGET_METADATA_KEY
from edgeq.export.qoperator import is_qoperator, qdq_from_qoperator
from edgeq.numerics import bias_joins_accumulator, bias_scales, int8_zero_point
from edgeq.ops import op_of_onnx_type
from edgeq.targets import Rounding


@dataclass(frozen=True)
class QuantParams:
    """How a quantized tensor maps to real numbers: ``real = (q - zero_point) * scale``, per tensor or along
    ``axis``."""

    dtype: str
    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    axis: int | None

    @property
    def symmetric(self) -> bool:
        """Signed with all zero points 0: edgeq's NPU numerics."""
        return self.dtype in ("int8", "int32") and not any(self.zero_points)

    @property
    def int8_zero_point(self) -> int:
        """The (first) zero point in its int8 form (:func:`edgeq.numerics.int8_zero_point`)."""
        return int8_zero_point(self.dtype, self.zero_points[0])


@dataclass(frozen=True)
class Finding:
    """Something valid in QDQ terms that does not fit edgeq's integer numerics."""

    node: str
    op_type: str
    kind: str
    message: str


@dataclass
class QDQModel:
    """A validated QDQ model: the ONNX graph and the quantization of each of its quantized tensors.

    Attributes:
        source: the file it was read from.
        model: the ONNX model, unchanged (but for the QOperator form, below, and Constant nodes that give numbers
            in ``value_float(s)`` / ``value_int(s)``, written as tensors: :func:`_with_tensor_constants`).
        quant: :class:`QuantParams` by quantized tensor name (QuantizeLinear outputs, DequantizeLinear inputs).
        constants: the value of every constant tensor (initializers and Constant node outputs).
        findings: what does not fit edgeq's numerics, in graph order.
        target: the target edgeq quantized it for (``None`` for files from other tools).
        form: ``QDQ``, or ``QOperator`` for a file in ONNX's operator form, which ``model`` holds rewritten to QDQ
            (:mod:`edgeq.export.qoperator`).
        rounding: the rule its integers round ties by: the ``edgeq.rounding`` metadata, else QuantizeLinear's, half
            to even (files from other tools, and edgeq's before the key existed).
    """

    source: Path
    model: onnx.ModelProto
    quant: dict[str, QuantParams]
    constants: dict[str, np.ndarray]
    findings: list[Finding] = field(default_factory=list)
    target: str | None = None
    form: str = "QDQ"
    rounding: Rounding = Rounding.HALF_TO_EVEN

    @property
    def fits_edgeq_numerics(self) -> bool:
        """No finding: every op and tensor can be computed by docs/numerics.md."""
        return not self.findings


def load_model_file(path: str | Path) -> QDQModel:
    """Read a QDQ ONNX file or an edgeq TorchScript file, whichever ``path`` holds."""
    path = Path(path)
    if _is_zip(path):
        with zipfile.ZipFile(path) as archive:
            if "manifest.json" in archive.namelist():
                raise ModelFileError(f"{path}: an edgeq artifact (already compiled); give the .onnx or .pt model instead")
        return load_torchscript(path)
    return load_onnx(path)


def load_onnx(path: str | Path) -> QDQModel:
    """Read and validate a QDQ ONNX file.

    Raises:
        ModelFileError: missing, unreadable, not ONNX, truncated, failing the ONNX checker, or with inconsistent
            quantization; the message names the file and, where there is one, the node.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as error:  # protobuf raises DecodeError, others raise ValueError / RuntimeError
        raise ModelFileError(f"{path}: not an ONNX file, or truncated ({type(error).__name__}: {error})") from None
    return read_qdq(model, path)


def load_torchscript(path: str | Path) -> QDQModel:
    """Read the QDQ description carried by a TorchScript file saved from :func:`edgeq.export.trace`.

    Raises:
        ModelFileError: missing or unreadable file, or a TorchScript module that edgeq did not trace.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
        raise ModelFileError(f"{path}: not a TorchScript file, or truncated ({type(error).__name__})") from None
    return qdq_from_torchscript(module, path)


def qdq_from_torchscript(module: object, source: str | Path) -> QDQModel:
    """The QDQ description carried by an edgeq TorchScript module (loaded, or straight from ``trace``).

    Raises:
        ModelFileError: the module carries no description, or a corrupt one.
    """
    from edgeq.export.torchscript import DESCRIPTION_BUFFER

    description = getattr(module, DESCRIPTION_BUFFER, None)
    if description is None:
        raise ModelFileError(
            f"{source}: TorchScript module without edgeq's graph description; trace the integer model with "
            "edgeq.export.trace (not torch.jit.trace) and save that"
        )
    try:
        model = onnx.load_from_string(description.numpy().tobytes())
    except Exception:
        raise ModelFileError(f"{source}: edgeq's graph description inside the TorchScript module is corrupt") from None
    return read_qdq(model, Path(str(source)))


def _is_zip(path: Path) -> bool:
    return path.is_file() and zipfile.is_zipfile(path)


def read_qdq(model: onnx.ModelProto, path: str | Path) -> QDQModel:
    """Validate an in-memory QDQ model as :func:`load_onnx` validates a file (``path`` names it in messages).

    Raises:
        ModelFileError: the model fails :func:`check_interface`, the ONNX checker or :func:`check_graph`, or its
            quantization is inconsistent or out of range.
    """
    path = Path(path)
    form = "QOperator" if is_qoperator(model) else "QDQ"
    if form == "QOperator":
        model = qdq_from_qoperator(model, str(path))
    check_interface(model.graph, path)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:
        raise ModelFileError(f"{path}: fails the ONNX checker: {first_line(error)}") from None
    model = with_tensor_constants(model)
    check_graph(model.graph, path)
    reader = _QuantReader(model, path)
    reader.run()
    metadata = {p.key: p.value for p in model.metadata_props}
    return QDQModel(
        path, model, reader.quant, reader.constants, reader.findings, metadata.get(TARGET_METADATA_KEY), form, _rounding(metadata, path)
    )


def _rounding(metadata: dict[str, str], path: Path) -> Rounding:
    """The file's rounding rule from its ``edgeq.rounding`` metadata (half to even without one).

    Raises:
        ModelFileError: the metadata names no rule edgeq knows.
    """
    value = metadata.get(ROUNDING_METADATA_KEY, Rounding.HALF_TO_EVEN.value)
    try:
        return Rounding(value)
    except ValueError:
        known = ", ".join(r.value for r in Rounding)
        raise ModelFileError(f"{path}: metadata '{ROUNDING_METADATA_KEY}' is {value!r}; known rules: {known}") from None


SCALE_RANGE = (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max) / 2**31)
"""The scales a quantized tensor may have: normal float32 numbers (not subnormal: 2**-126 and up) up to the one at
which the largest int32, 2**31, still dequantizes to a finite float32 (about 1.58e29). Whether the scales around
an op give it a requantization multiplier is the op's own check (:func:`edgeq.numerics.quantize_multipliers`)."""


def float32_text(value: float) -> str:
    """A scale as float32 prints it: the shortest text that reads back as the same float32 (``1e-40``, not the
    ``9.99995e-41`` of its float64 value)."""
    return str(np.float32(value))


class _QuantReader:
    """Collects quantization per tensor and findings (one instance per file)."""

    def __init__(self, model: onnx.ModelProto, path: Path) -> None:
        self.model = model
        self.path = path
        self.constants = graph_constants(model.graph)
        self.quant: dict[str, QuantParams] = {}
        self.quant_source: dict[str, str] = {}
        self.findings: list[Finding] = []
        self.producer = {out: node for node in model.graph.node for out in node.output}

    def run(self) -> None:
        for node in self.model.graph.node:
            if node.op_type in QUANTIZE_NODES:
                self._check_not_quantizing_a_constant(node)
                quantized = node.output[0] if node.op_type == "QuantizeLinear" else node.input[0]
                self._record(quantized, self._params(node, quantized), node)
            elif node_op(node, self._is_weight) is None and node.op_type != "Constant" and gated_activation(node, self.producer) is None:
                variant = " with a bias input" if op_of_onnx_type(node.op_type) is not None else ""
                self._find(node, "unsupported_op", f"{node.op_type}{variant} has no integer implementation in edgeq")
        for node in self.model.graph.node:
            if node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
                self._check_bias(node)

    def _check_not_quantizing_a_constant(self, node: onnx.NodeProto) -> None:
        """A QuantizeLinear reads a computed tensor: edgeq takes quantized constants (weights, biases) as stored
        integers, and quantizes no constant when the model runs."""
        if node.op_type != "QuantizeLinear":
            return
        tensor = unquantized(node.input[0], self.producer)
        if tensor in self.constants:
            raise self._error(
                node,
                f"quantizes the constant '{tensor}' when the model runs; store it quantized instead (integers behind a "
                "DequantizeLinear, as onnxruntime.quantization.quantize_static writes weights)",
            )

    def _is_weight(self, tensor: str) -> bool:
        return is_weight_tensor(tensor, self.constants, self.producer)

    def _error(self, node: onnx.NodeProto, problem: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {node.op_type} '{node_name(node)}': {problem}")

    def _find(self, node: onnx.NodeProto, kind: str, message: str) -> None:
        self.findings.append(Finding(node_name(node), node.op_type, kind, message))

    def _constant(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | None:
        if len(node.input) <= index or not node.input[index]:
            return None
        name = node.input[index]
        if name not in self.constants:
            raise self._error(node, f"{what} '{name}' must be a constant (initializer or Constant node)")
        return self.constants[name]

    def _params(self, node: onnx.NodeProto, quantized: str) -> QuantParams:
        scale = self._constant(node, 1, "scale")
        zero_point = self._constant(node, 2, "zero point")
        if scale is None:
            raise self._error(node, "has no scale")
        self._check_scales(node, scale)
        if zero_point is None:
            zero_point = np.zeros(scale.shape, dtype=np.uint8)
        if scale.ndim > 1 or zero_point.ndim > 1:
            raise self._error(node, f"scale and zero point must be scalars or 1-D; got shapes {list(scale.shape)}, {list(zero_point.shape)}")
        if zero_point.size != scale.size:
            raise self._error(node, f"{zero_point.size} zero points for {scale.size} scales")
        per_axis = scale.ndim == 1 and scale.size > 1
        axis = int(node_attributes(node).get("axis", 1)) if per_axis else None
        if axis is not None:
            length = self._axis_length(quantized, axis)
            if length is not None and length != scale.size:
                raise self._error(node, f"{scale.size} scales for axis {axis} of length {length}")
        return QuantParams(
            str(zero_point.dtype), tuple(float(s) for s in scale.ravel()), tuple(int(z) for z in zero_point.ravel()), axis
        )

    def _check_scales(self, node: onnx.NodeProto, scale: np.ndarray) -> None:
        """Every scale is in :data:`SCALE_RANGE` (NaN, infinities, zero and negative numbers are not)."""
        values = scale.astype(np.float64).ravel()
        lowest, highest = SCALE_RANGE
        outside = np.flatnonzero(~((values >= lowest) & (values <= highest)))
        if not outside.size:
            return
        where = f" for channel {outside[0]}" if values.size > 1 else ""
        raise self._error(
            node,
            f"scale '{node.input[1]}' is out of range; got {float32_text(values[outside[0]])}{where} (allowed: normal "
            f"float32 numbers from {float32_text(lowest)} to {float32_text(highest)}); quantize the model again",
        )

    def _axis_length(self, tensor: str, axis: int) -> int | None:
        if tensor in self.constants:
            shape = self.constants[tensor].shape
            return shape[axis] if -len(shape) <= axis < len(shape) else None
        return None

    def _record(self, tensor: str, params: QuantParams, node: onnx.NodeProto) -> None:
        label = node_name(node)
        if tensor in self.quant and self.quant[tensor] != params:
            raise self._error(
                node,
                f"quantizes '{tensor}' with scale {list(params.scales)[:4]} and zero point {list(params.zero_points)[:4]}, "
                f"but '{self.quant_source[tensor]}' uses scale {list(self.quant[tensor].scales)[:4]} and zero point "
                f"{list(self.quant[tensor].zero_points)[:4]}: inconsistent scales",
            )
        if tensor in self.quant:
            return
        self.quant[tensor] = params
        self.quant_source[tensor] = label
        if params.dtype != "int32" and tensor not in self.constants and not params.symmetric:
            self._find(
                node, "asymmetric_activation",
                f"'{tensor}' is {params.dtype} with zero point {params.zero_points[0]}; edgeq's NPU numerics need "
                "int8 activations with zero point 0",
            )
        elif tensor in self.constants and not params.symmetric:
            self._find(node, "asymmetric_weight", f"constant '{tensor}' is {params.dtype} with non-zero zero points")

    def _dequantized_params(self, tensor: str) -> QuantParams | None:
        node = self.producer.get(tensor)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        return self.quant.get(node.input[0])

    def _check_bias(self, node: onnx.NodeProto) -> None:
        source, weight, bias = (self._dequantized_params(name) for name in node.input[:3])
        if source is None or weight is None or bias is None:
            return
        if len(weight.scales) != len(bias.scales) and len(weight.scales) != 1 and len(bias.scales) != 1:
            return
        values = self.constants.get(self.producer[node.input[2]].input[0])
        if values is not None and not bias_joins_accumulator(values, bias.scales, source.scales[0], weight.scales):
            expected = bias_scales(source.scales[0], weight.scales)
            self._find(
                node, "bias_scale",
                f"bias scale {list(bias.scales)[:3]} is not input scale x weight scale "
                f"{expected[:3]}: the bias cannot join the int32 accumulator exactly",
            )
