"""An independent int64 numpy reference of docs/numerics.md section 9: third-party QDQ files (ONNX Runtime's
``quantize_static``) with zero points, evaluated in integers in the file's own types (uint8 stays uint8).

Written from the spec, not from edgeq: multipliers come from the spec's frexp rule here, sums are explicit over
``q - z``, padding is the real 0 (``q = z``), and only the float32 quantize of the input and the tables run in
floating point, as the spec defines them. Every op's output is the QuantizeLinear that follows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper
from reference import conv2d_accumulate, matmul_accumulate, round_shift, window_view

_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


@dataclass
class Quantized:
    """An activation: integers (int64) and ``real = (q - zero_point) * scale``."""

    q: np.ndarray
    scale: float
    zero_point: int
    dtype: np.dtype

    @property
    def centred(self) -> np.ndarray:
        return self.q - self.zero_point


@dataclass
class Constant:
    """A dequantized constant: integers and per-tensor or per-axis scales (zero points 0)."""

    q: np.ndarray
    scales: np.ndarray


def fixed_point(real: float) -> tuple[int, int]:
    """The spec's section 4: ``real ≈ M * 2**-n`` with ``2**30 <= M < 2**31``."""
    _, exponent = math.frexp(real)
    shift = 31 - exponent
    multiplier = round(real * 2.0**shift)
    if multiplier == 2**31:
        multiplier, shift = 2**30, shift - 1
    return multiplier, shift


def shared_shift(reals: list[float]) -> tuple[list[int], int]:
    """Factors summed before rounding share the shift of the largest (section 4)."""
    _, shift = fixed_point(max(reals))
    return [round(r * 2.0**shift) for r in reals], shift


class Evaluator:
    """Evaluates a QDQ model's graph, node by node, in integers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.constants = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.values: dict[str, Quantized | Constant | np.ndarray] = {}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw integer outputs (each graph output is a DequantizeLinear's input) for float inputs."""
        self.values.update(inputs)
        for node in self.graph.node:
            if node.op_type != "Constant":
                self._node(node)
        outputs = {}
        for output in self.graph.output:
            producer = next(n for n in self.graph.node if output.name in n.output)
            outputs[output.name] = self.values[producer.input[0]].q
        return outputs

    def _quantize_params(self, node: onnx.NodeProto) -> tuple[float, int, np.dtype]:
        zero = self.constants[node.input[2]]
        return float(self.constants[node.input[1]]), int(zero), zero.dtype

    def _output(self, node: onnx.NodeProto) -> tuple[float, int, np.dtype]:
        (quantize,) = [n for n in self.consumers[node.output[0]] if n.op_type == "QuantizeLinear"]
        return self._quantize_params(quantize)

    def _store(self, node: onnx.NodeProto, integers: np.ndarray, output: tuple[float, int, np.dtype], low: int | None = None, high: int | None = None) -> None:
        scale, zero, dtype = output
        qmin, qmax = _RANGES[np.dtype(dtype)]
        low, high = max(qmin, low if low is not None else qmin), min(qmax, high if high is not None else qmax)
        self.values[node.output[0]] = Quantized(np.clip(integers, low, high), scale, zero, dtype)

    def _requantize(self, node: onnx.NodeProto, total: np.ndarray, real: float | np.ndarray, axis: int = 1) -> None:
        scale, zero, dtype = output = self._output(node)
        reals = np.atleast_1d(np.asarray(real, dtype=np.float64) / scale)
        pairs = [fixed_point(float(r)) for r in reals]
        shape = [1] * total.ndim
        if len(pairs) > 1:
            shape[axis] = -1
        multiplier = np.array([p[0] for p in pairs]).reshape(shape)
        shift = np.array([p[1] for p in pairs]).reshape(shape)
        self._store(node, round_shift(total, multiplier, shift) + zero, output)

    def _node(self, node: onnx.NodeProto) -> None:
        op, ins = node.op_type, [self.values.get(i, self.constants.get(i)) for i in node.input]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op == "QuantizeLinear":
            if isinstance(ins[0], Quantized):  # the op before it wrote its output at these parameters
                self.values[node.output[0]] = ins[0]
                return
            scale, zero, dtype = self._quantize_params(node)
            q = np.rint(np.asarray(ins[0], dtype=np.float32) / np.float32(scale)).astype(np.int64) + zero
            self._store(node, q, (scale, zero, dtype))
        elif op == "DequantizeLinear":
            if node.input[0] in self.constants:
                self.values[node.output[0]] = Constant(self.constants[node.input[0]].astype(np.int64), self.constants[node.input[1]].reshape(-1))
            else:
                self.values[node.output[0]] = ins[0]
        elif op == "Identity":
            self.values[node.output[0]] = ins[0]
        elif op == "Conv":
            x, w = ins[0], ins[1]
            pads = attrs.get("pads", [0, 0, 0, 0])
            assert pads[:2] == pads[2:], "symmetric padding only"
            acc = conv2d_accumulate(x.centred, w.q, tuple(attrs.get("strides", (1, 1))), tuple(pads[:2]), tuple(attrs.get("dilations", (1, 1))),
                                    attrs.get("group", 1))
            if len(ins) > 2:
                acc = acc + ins[2].q.reshape(1, -1, 1, 1)
            self._requantize(node, acc, x.scale * w.scales.astype(np.float64))
        elif op == "Gemm":
            x, w = ins[0], ins[1]
            weights = w.q.T if attrs.get("transB", 0) else w.q
            acc = x.centred @ weights + (ins[2].q.reshape(1, -1) if len(ins) > 2 else 0)
            self._requantize(node, acc, x.scale * w.scales.astype(np.float64))
        elif op == "Add":
            a, b = ins
            scale, zero, _ = output = self._output(node)
            (ma, mb), shift = shared_shift([a.scale / scale, b.scale / scale])
            self._store(node, round_shift(a.centred * ma + b.centred * mb, 1, shift) + zero, output)
        elif op == "Mul":
            a, b = ins
            self._requantize(node, a.centred * b.centred, a.scale * b.scale)
        elif op == "MatMul" and isinstance(ins[1], Quantized):  # two activations: Σ_k (a - z_a)(b - z_b)
            a, b = ins
            self._requantize(node, matmul_accumulate(a.centred, b.centred), a.scale * b.scale)
        elif op == "GlobalAveragePool":
            x = ins[0]
            count = x.q.shape[2] * x.q.shape[3]
            self._requantize(node, x.centred.sum(axis=(2, 3), keepdims=True), x.scale / count)
        elif op == "AveragePool":
            x, kernel = ins[0], tuple(attrs["kernel_shape"])
            pads = attrs.get("pads", [0, 0, 0, 0])
            windows = window_view(x.centred, kernel, tuple(attrs.get("strides", kernel)), tuple(pads[:2]), (1, 1), 0)
            self._requantize(node, windows.sum(axis=-1), x.scale / math.prod(kernel))
        elif op == "MaxPool":
            x, kernel = ins[0], tuple(attrs["kernel_shape"])
            pads = attrs.get("pads", [0, 0, 0, 0])
            windows = window_view(x.q, kernel, tuple(attrs.get("strides", kernel)), tuple(pads[:2]), (1, 1), -(2**40))
            self._same(node, x, windows.max(axis=-1))
        elif op == "Transpose":
            self._same(node, ins[0], np.transpose(ins[0].q, attrs["perm"]))
        elif op in ("Flatten", "Reshape"):
            x = ins[0]
            shape = (x.q.shape[0], -1) if op == "Flatten" else tuple(int(d) for d in ins[1])
            self._same(node, x, x.q.reshape(shape))
        elif op == "Relu":
            self._same(node, ins[0], np.maximum(ins[0].q, ins[0].zero_point))
        elif op == "Clip":
            x = ins[0]
            low, high = (int(np.rint(np.float32(float(v)) / np.float32(x.scale))) + x.zero_point for v in ins[1:3])
            self._same(node, x, np.clip(x.q, low, high))
        elif op == "Concat":
            scale, zero, dtype = output = self._output(node)
            parts = []
            for x in ins:
                multiplier, shift = fixed_point(x.scale / scale)
                parts.append(x.q if (x.scale, x.zero_point) == (scale, zero) else round_shift(x.centred, multiplier, shift) + zero)
            self._store(node, np.concatenate(parts, axis=attrs["axis"]), output)
        elif op in ("HardSigmoid", "Sigmoid"):
            x = ins[0]
            scale, zero, dtype = output = self._output(node)
            real = ((x.q - x.zero_point).astype(np.float32) * np.float32(x.scale)).astype(np.float64)
            if op == "HardSigmoid":
                y = np.clip(real + 3, 0, 6) / 6  # the spec's function (the file says alpha = 1/6, beta = 1/2)
            else:
                y = 1 / (1 + np.exp(-real))
            self._store(node, np.rint(y / np.float64(np.float32(scale))).astype(np.int64) + zero, output)
        else:
            raise NotImplementedError(f"reference: {op}")

    def _same(self, node: onnx.NodeProto, x: Quantized, q: np.ndarray) -> None:
        """A data-movement op: its output quantization must be its input's."""
        scale, zero, dtype = self._output(node)
        assert (scale, zero) == (x.scale, x.zero_point), f"{node.name}: requantizing data movement"
        self.values[node.output[0]] = Quantized(q, scale, zero, x.dtype)


def run_qdq_reference(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The raw integer outputs of ``model`` for float ``inputs`` (docs/numerics.md section 9)."""
    return Evaluator(model).run(inputs)
