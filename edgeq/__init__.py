"""edgeq: an open deployment compiler toolchain for edge NPUs.

Stages, one module each, data flowing one way: :mod:`edgeq.quantization` (float model -> integer model),
then export, check, compile and the on-device runtime.
"""

from edgeq.errors import EdgeqError
from edgeq.targets import Target, list_targets, load_target

__version__ = "0.1.0"

__all__ = ["EdgeqError", "Target", "__version__", "list_targets", "load_target", "perf_model", "visualize_model"]


def __getattr__(name: str) -> object:
    """``perf_model`` and ``visualize_model`` on first use: ``import edgeq`` stays light (no torch or TVM)."""
    if name == "perf_model":
        from edgeq.perf import perf_model

        return perf_model
    if name == "visualize_model":
        from edgeq.visualize import visualize_model

        return visualize_model
    raise AttributeError(f"module 'edgeq' has no attribute '{name}'")
