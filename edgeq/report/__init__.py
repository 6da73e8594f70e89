"""The HTML report (``report.html`` beside ``report.json``): the perf estimate, where the time goes, the check's
reasons and advice, per-layer accuracy against the float model, and the compiled graph, in one self-contained page.

:func:`write_report` renders a :class:`~edgeq.perf.PerfResult` (:mod:`.html`); :func:`layer_accuracy` measures
each layer's integer output against the float model's (:mod:`.accuracy`).
"""

from edgeq.report.accuracy import COSINE_FLOOR, LayerAccuracy, layer_accuracy
from edgeq.report.html import REPORT_HTML, render_report, write_report

__all__ = ["COSINE_FLOOR", "REPORT_HTML", "LayerAccuracy", "layer_accuracy", "render_report", "write_report"]
