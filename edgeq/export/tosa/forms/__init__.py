"""Each op's TOSA form, registered against the op in :data:`TOSA_FORMS` (one module per family)."""

from edgeq.export.tosa.forms import arithmetic, movement, weighted  # noqa: F401  (each registers its forms)
from edgeq.export.tosa.forms.unit import TOSA_FORMS, OpUnit

__all__ = ["TOSA_FORMS", "OpUnit"]
