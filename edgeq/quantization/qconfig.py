"""Quantization configurations: what the user chooses per layer (the target adds its own constraints).

A :class:`QConfig` says how activations are observed and whether a final conv/linear keeps its int32 result.
Weights are always int8, symmetric, per output channel, from their absolute maximum (docs/numerics.md); the
target's scale rule (e.g. power-of-two) applies on top of any qconfig.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Union

from torch import nn

from edgeq.errors import QuantizationError
from edgeq.quantization.observers import EMAMinMaxObserver, HistogramObserver, ObserverFactory


@dataclass(frozen=True)
class QConfig:
    """How one layer is quantized.

    Args:
        activation_observer: factory of the observer that chooses activation ranges.
        output_dtype: ``"int8"`` (requantized output, the default) or ``"int32"`` (a conv/linear keeps its
            int32 accumulator at scale ``s_in * s_w[c]``: the high-precision output for a model's last layer).
    """

    activation_observer: ObserverFactory
    output_dtype: Literal["int8", "int32"] = "int8"

    def __post_init__(self) -> None:
        if not callable(self.activation_observer):
            raise QuantizationError(f"QConfig.activation_observer must be callable; got {self.activation_observer!r}")
        if self.output_dtype not in ("int8", "int32"):
            raise QuantizationError(f"QConfig.output_dtype must be 'int8' or 'int32'; got {self.output_dtype!r}")


default_calib_qconfig = QConfig(HistogramObserver.with_args(method="mse"))
"""Calibration: histogram of each activation, clipping threshold by minimum squared error."""
default_qat_qconfig = QConfig(EMAMinMaxObserver.with_args(averaging_constant=0.01))
"""QAT: moving-average min/max (continues from the calibrated range when a calibration checkpoint is loaded)."""
default_calib_int32_output_qconfig = QConfig(HistogramObserver.with_args(method="mse"), output_dtype="int32")
"""Calibration preset for a final conv/linear whose output stays int32."""
default_qat_int32_output_qconfig = QConfig(EMAMinMaxObserver.with_args(averaging_constant=0.01), output_dtype="int32")
"""QAT preset for a final conv/linear whose output stays int32."""

QConfigSpec = Union[QConfig, Mapping[str, Union[QConfig, Mapping[str, Union[QConfig, None]]]], None]
"""A :class:`QConfig` for the whole model; or the dict form of torch.ao and Horizon,
``{"": global_qconfig, "module_name": {"classifier": qconfig}}``; or ``None``: each module's ``qconfig``
attribute where set (nearest ancestor wins), else :data:`default_qat_qconfig`. A module-name entry or a
``qconfig`` attribute that is ``None`` leaves that module float (torch.ao's and Horizon's convention): it runs
in float on the CPU between a dequantize and a quantize (docs/numerics.md "Float fallback")."""


def qconfig_resolver(spec: QConfigSpec, model: nn.Module) -> Callable[[str], QConfig | None]:
    """Turn a :data:`QConfigSpec` into a function from module path (``"layer1.0.conv1"``) to :class:`QConfig`
    (``None``: the module stays float).

    A module-name entry applies to that module and everything inside it; the longest matching name wins.

    Raises:
        QuantizationError: unknown keys, values that are not QConfigs, or module names the model lacks.
    """
    if isinstance(spec, QConfig):
        return lambda path: spec
    if spec is None:
        return _attribute_resolver(model)
    if not isinstance(spec, Mapping):
        raise QuantizationError(f"qconfig must be a QConfig, a dict or None; got {type(spec).__name__}")
    unknown = set(spec) - {"", "module_name"}
    if unknown:
        raise QuantizationError(
            f"qconfig dict: unknown keys {sorted(unknown)} (allowed: '' for the global qconfig, 'module_name')"
        )
    global_qconfig = spec.get("", default_qat_qconfig)
    by_name = dict(spec.get("module_name", {}))
    known = dict(model.named_modules())
    for name, qconfig in [("", global_qconfig), *by_name.items()]:
        if not isinstance(qconfig, QConfig) and not (name and qconfig is None):
            raise QuantizationError(f"qconfig dict: '{name}' must map to a QConfig; got {type(qconfig).__name__}")
        if name and name not in known:
            raise QuantizationError(f"qconfig dict: module_name '{name}' is not a module of the model")

    def resolve(path: str) -> QConfig | None:
        matches = [name for name in by_name if path == name or path.startswith(name + ".")]
        return by_name[max(matches, key=len)] if matches else global_qconfig

    return resolve


def _attribute_resolver(model: nn.Module) -> Callable[[str], QConfig | None]:
    def resolve(path: str) -> QConfig | None:
        parts = path.split(".") if path else []
        for depth in range(len(parts), -1, -1):
            try:
                module = model.get_submodule(".".join(parts[:depth]))
            except AttributeError:
                continue
            if not hasattr(module, "qconfig"):
                continue
            qconfig = module.qconfig
            if qconfig is not None or depth > 0:
                if qconfig is not None and not isinstance(qconfig, QConfig):
                    raise QuantizationError(
                        f"module '{'.'.join(parts[:depth]) or '(root)'}': its qconfig attribute must be an edgeq "
                        f"QConfig; got {type(qconfig).__name__}"
                    )
                return qconfig
        return default_qat_qconfig

    return resolve
