"""The examples run end to end and keep their promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_digits_staged_flow(tmp_path):
    """float -> calib -> qat -> int_infer -> compile on real data: the integer model within 1.0 point of the float
    model, and the compiled artifact exactly as accurate as the integer model."""
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "digits_qat.py"), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr
    accuracy = json.loads((tmp_path / "accuracy.json").read_text())
    assert accuracy["float"] > 95.0
    assert abs(accuracy["int_infer"] - accuracy["float"]) <= 1.0
    assert accuracy["int_infer_raw_pixels"] == accuracy["int_infer"]  # pixel - 128 as int8 is the same input
    assert accuracy["compile"] == accuracy["int_infer"]
    for stage in ("float", "calib", "qat"):
        assert (tmp_path / f"{stage}-checkpoint.pt").exists()
    for artifact in ("int_model.pt", "model.onnx", "digits.edgeq", "digits-x86_64.edgeq", "perf/report.json", "perf/report.html", "model.svg"):
        assert (tmp_path / artifact).exists()
    assert "integer model vs float" in result.stdout
    assert "under qemu gives the same integers as digits-x86_64.edgeq: True" in result.stdout
    assert 'id="accuracy-table"' in (tmp_path / "perf" / "report.html").read_text()
