"""edgeq_runtime: load and run ``.edgeq`` artifacts with TVM's runtime alone.

    from edgeq_runtime import Model
    model = Model.load("model.edgeq")          # every core; Model.load(path, num_threads=2) for fewer
    outputs = model.run({"x": image})          # float in (quantized per the manifest) or raw int8
    logits = outputs["dequant"]                # dequantized; model.run(..., raw=True) gives the integers

Needs numpy, ``apache-tvm-ffi`` and TVM's ``libtvm_runtime.so`` (from the apache-tvm wheel, or the file named by
the environment variable ``EDGEQ_TVM_RUNTIME``); never torch, onnx or the TVM compiler.
"""

from edgeq_runtime.artifact import SCHEMA_VERSION, Artifact, ArtifactError
from edgeq_runtime.model import CommandStreamWarning, Model, TensorInfo, Timing

__version__ = "0.1.0"

__all__ = ["SCHEMA_VERSION", "Artifact", "ArtifactError", "CommandStreamWarning", "Model", "TensorInfo", "Timing", "__version__"]
