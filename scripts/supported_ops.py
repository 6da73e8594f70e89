"""Write docs/supported-ops.md from edgeq's op vocabulary, op settings, target files and check rules.

Usage: python scripts/supported_ops.py   (tests/test_check.py fails when the page is stale)
"""

from __future__ import annotations

from pathlib import Path

from edgeq.check.supported_ops import PAGE, supported_ops_markdown


def main() -> None:
    page = Path(__file__).resolve().parent.parent / PAGE
    page.write_text(supported_ops_markdown() + "\n")
    print(f"wrote {page}")


if __name__ == "__main__":
    main()
