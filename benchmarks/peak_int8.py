"""Peak int8 multiply-accumulate rate of this CPU (issue 34): benchmarks/peak_int8.c, compiled here with the
system's C compiler (``CC``, default ``cc``), runs independent chains of the best exact int8 dot product the CPU
has (AVX-512 VNNI ``vpdpbusd`` zmm, AVX-VNNI ``vpdpbusd`` ymm, AVX2 ``vpmaddubsw`` + ``vpmaddwd``, aarch64 ``sdot``)
on registers only, on 1 and 2 cores: the rate no int8 engine can pass there.

    .venv/bin/python benchmarks/peak_int8.py [--threads 1,2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).resolve().with_suffix(".c")
TARGET_SECONDS = 0.3
"""How long each measurement lasts (its iteration count is scaled to this from a short first run)."""
REPEATS = 3
"""Measurements per thread count; the fastest counts (anything else only slows the loop down)."""


@dataclass(frozen=True)
class Peak:
    """The measured peak: the instruction, and GMAC/s by thread count."""

    instruction: str
    gmacs: dict[int, float]

    def summary(self) -> str:
        """One line: the instruction and the rate on each thread count."""
        rates = ", ".join(f"{gmacs:.0f} GMAC/s on {threads} core{'s' * (threads > 1)}" for threads, gmacs in self.gmacs.items())
        return f"int8 peak ({self.instruction} chains, benchmarks/peak_int8.c): {rates}"


def build(folder: Path) -> Path:
    """peak_int8.c compiled into ``folder``."""
    binary = folder / "peak_int8"
    compiler = os.environ.get("CC", "cc")
    done = subprocess.run([compiler, "-O2", "-pthread", str(SOURCE), "-o", str(binary)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{SOURCE.name}: {compiler} failed:\n{done.stderr}")
    return binary


def run(binary: Path, threads: int, iterations: int) -> tuple[str, float, float]:
    """One measurement: the instruction's name, the GMAC/s of ``threads`` threads and the seconds it took."""
    done = subprocess.run([str(binary), str(threads), str(iterations)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{binary.name}: {done.stderr.strip()}")
    instruction, macs_per_iteration, seconds = done.stdout.split()
    return instruction, threads * iterations * int(macs_per_iteration) / float(seconds) / 1e9, float(seconds)


def measure_peak(thread_counts: tuple[int, ...] = (1, 2)) -> Peak:
    """The peak on each of ``thread_counts``: the fastest of :data:`REPEATS` runs of about
    :data:`TARGET_SECONDS`."""
    with tempfile.TemporaryDirectory() as folder:
        binary = build(Path(folder))
        probe = 1_000_000
        instruction, _, seconds = run(binary, 1, probe)
        iterations = max(int(probe * TARGET_SECONDS / seconds), 1)
        rates = {threads: max(run(binary, threads, iterations)[1] for _ in range(REPEATS)) for threads in thread_counts}
    return Peak(instruction, rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    args = parser.parse_args()
    print(measure_peak(tuple(int(t) for t in args.threads.split(","))).summary())


if __name__ == "__main__":
    main()
