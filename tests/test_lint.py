"""The repository passes ruff, configured in pyproject.toml (pyflakes, pycodestyle, import order; line lengths)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    """``ruff check`` on the whole repository: any finding fails the test, listed as ruff prints it."""
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", str(REPO)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO, timeout=300)
    if completed.returncode != 0:
        pytest.fail(f"ruff check found problems:\n{completed.stdout}{completed.stderr}", pytrace=False)
