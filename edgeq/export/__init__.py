"""Export: the integer model as TorchScript or as a standard QDQ ONNX file, and reading QDQ files back.

- :func:`trace` / :func:`save_torchscript`: TorchScript, as the seed flow saves ``int_model.pt``.
- :func:`to_onnx`: a QDQ ONNX file (opset 13) that ONNX Runtime, TensorRT, OpenVINO and TVM read.
- :func:`load_onnx`, :func:`load_torchscript`, :func:`load_model_file`: a :class:`QDQModel` with every tensor's
  quantization and what does not fit edgeq's numerics; the compiler's input.
"""

from edgeq.export.onnx_reader import (
    Finding,
    QDQModel,
    QuantParams,
    load_model_file,
    load_onnx,
    load_torchscript,
)
from edgeq.export.onnx_writer import OPSET, build_onnx, to_onnx
from edgeq.export.torchscript import save_torchscript, trace

__all__ = [
    "OPSET",
    "Finding",
    "QDQModel",
    "QuantParams",
    "build_onnx",
    "load_model_file",
    "load_onnx",
    "load_torchscript",
    "save_torchscript",
    "to_onnx",
    "trace",
]
