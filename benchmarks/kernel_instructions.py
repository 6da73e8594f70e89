"""Instructions per multiply-accumulate of edgeq's int8 kernels, aarch64 (``sdot``) beside x86 (issue 34): the
aarch64 kernels are exact under qemu but cannot be timed here, so this static count gives the ARM side a number.

Each model (random-init torchvision, quantized by edgeq for the aarch64 target) is compiled at -O2 for an aarch64
CPU with the dot-product extension (targets/aarch64.toml plus ``+dotprod``) and for this x86 CPU. The script
disassembles each artifact's library (``aarch64-linux-gnu-objdump`` / ``objdump``) and, for every kernel of
graph.json with multiply-accumulates, finds its main inner loop: the innermost loop (a backward branch) holding the
most dot-product instructions. Instructions per MAC = the loop's instructions / (its dot instructions x MACs per
instruction): what the kernel retires per MAC in its steady state, packing and requantization excluded (qemu's
instruction-count plugin, which would count those too, is not in Debian's qemu-user). Prints, per model and kernel
kind (convolution, pointwise, depthwise, dense), the MAC-weighted mean over the kernels, then each kernel with
``--each``.

    .venv/bin/python benchmarks/kernel_instructions.py [--models resnet18,mobilenet_v2,mobilenet_v3_small]
        [--size 224] [--keep DIR] [--each]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from models import integer_model, torchvision_model  # noqa: E402

from edgeq.compile import compile_model  # noqa: E402
from edgeq.compile.artifact import LIBRARY  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small")
ARCHES = ("aarch64", "x86_64")
OBJDUMP = {"aarch64": "aarch64-linux-gnu-objdump", "x86_64": "objdump"}
DOT_MNEMONICS = {"sdot": "sdot", "vnni": "vpdpbusd", "avx-vnni": "vpdpbusd", "avx2-pmaddwd": "vpmaddwd"}
"""The instruction of each dot product (edgeq.compile.cpu_features) in the disassembly."""
MACS_PER_REGISTER_BYTE = {"sdot": 1, "vpdpbusd": 1, "vpmaddwd": 0.5}
"""MACs per byte of the destination register: sdot and vpdpbusd add 4 int8 products into each 4-byte lane,
vpmaddwd 2 int16 products."""
REGISTER_BYTES = {"zmm": 64, "ymm": 32, "xmm": 16, "v": 16}
BRANCH_TARGET = re.compile(r"\b([0-9a-f]+) <[^>]+>")
X86_BRANCHES = re.compile(r"^j(?!mp\s+\*)")
AARCH64_BRANCHES = re.compile(r"^(b|b\.\w+|cbn?z|tbn?z)$")


@dataclass(frozen=True)
class Instruction:
    """One disassembled instruction: address, mnemonic, operands."""

    address: int
    mnemonic: str
    operands: str


@dataclass(frozen=True)
class Loop:
    """A kernel's main inner loop: its instructions and the MACs one pass through it does."""

    instructions: int
    dots: int
    macs: int

    @property
    def per_mac(self) -> float:
        """Instructions per multiply-accumulate."""
        return self.instructions / self.macs


def disassembly(library: Path, arch: str) -> dict[str, list[Instruction]]:
    """The library's functions by name, each a list of its instructions."""
    text = subprocess.run([OBJDUMP[arch], "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True).stdout
    functions: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in text.splitlines():
        if header := re.match(r"^[0-9a-f]+ <(.+)>:$", line):
            current = functions.setdefault(header.group(1), [])
        elif current is not None and (row := re.match(r"^\s+([0-9a-f]+):\s+(\S+)\s*(.*)$", line)):
            current.append(Instruction(int(row.group(1), 16), row.group(2), row.group(3)))
    return functions


def is_branch(instruction: Instruction, arch: str) -> bool:
    """A direct branch (conditional or not)."""
    pattern = AARCH64_BRANCHES if arch == "aarch64" else X86_BRANCHES
    return bool(pattern.match(instruction.mnemonic)) and BRANCH_TARGET.search(instruction.operands) is not None


def macs_per_dot(instruction: Instruction, arch: str) -> int:
    """MACs of one dot-product instruction, from its destination register's width (the first operand on aarch64,
    the last in x86's AT&T syntax)."""
    destination = instruction.operands.split(",")[0 if arch == "aarch64" else -1]
    register = re.search(r"%?(zmm|ymm|xmm|v)\d+", destination)
    return int(REGISTER_BYTES[register.group(1)] * MACS_PER_REGISTER_BYTE[instruction.mnemonic])


def main_loop(code: list[Instruction], arch: str, dot: str) -> Loop | None:
    """The innermost loop holding the most ``dot`` instructions of one function, or None if it has none."""
    index = {instruction.address: i for i, instruction in enumerate(code)}
    loops = []
    for end, instruction in enumerate(code):
        if is_branch(instruction, arch):
            start = index.get(int(BRANCH_TARGET.search(instruction.operands).group(1), 16))
            if start is not None and start <= end:
                loops.append((start, end))
    found: dict[tuple[int, int], list[Instruction]] = defaultdict(list)
    for i, instruction in enumerate(code):
        if instruction.mnemonic == dot:
            holding = [loop for loop in loops if loop[0] <= i <= loop[1]]
            if holding:
                found[min(holding, key=lambda loop: loop[1] - loop[0])].append(instruction)
    if not found:
        return None
    (start, end), dots = max(found.items(), key=lambda item: len(item[1]))
    return Loop(end - start + 1, len(dots), sum(macs_per_dot(d, arch) for d in dots))


def kernel_kind(op: dict) -> str:
    """convolution, pointwise (1x1), depthwise or dense, from a graph.json op."""
    attributes = op.get("attributes", {})
    if op["op"] != "conv2d":
        return "dense"
    if attributes.get("groups", 1) > 1 and attributes["groups"] == attributes.get("in_channels"):
        return "depthwise"
    return "pointwise" if list(attributes.get("kernel", [])) == [1, 1] else "convolution"


def kernel_loops(artifact: Path, folder: Path) -> list[tuple[dict, Loop | None]]:
    """Every op of the artifact's graph with MACs, and its kernel's main loop (None: no dot instruction in it)."""
    with zipfile.ZipFile(artifact) as archive:
        graph = json.loads(archive.read("graph.json"))
        library = folder / f"{artifact.stem}.so"
        library.write_bytes(archive.read(LIBRARY))
    arch, dot = graph["arch"], DOT_MNEMONICS.get(graph["dot_product"])
    functions = disassembly(library, arch)
    rows = []
    for op in graph["ops"]:
        if not op.get("macs") or not op.get("kernel"):
            continue
        bodies = [code for name, code in functions.items() if name.startswith(op["kernel"]) or name == f"__tvm_ffi_{op['kernel']}"]
        loops = [loop for code in bodies if dot and (loop := main_loop(code, arch, dot))]
        rows.append((op, max(loops, key=lambda loop: loop.dots) if loops else None))
    return rows


def dotprod_target(folder: Path) -> Path:
    """targets/aarch64.toml with the dot-product extension, as a user's target file."""
    text = (REPO / "targets" / "aarch64.toml").read_text()
    path = folder / "aarch64-dotprod.toml"
    path.write_text(text.replace('name = "aarch64"', 'name = "aarch64-dotprod"').replace('mattr = ["+neon"]', 'mattr = ["+neon", "+dotprod"]'))
    return path


def artifacts(name: str, size: int, folder: Path) -> dict[str, Path]:
    """``name`` compiled for each of :data:`ARCHES` into ``folder`` (artifacts already there are reused)."""
    paths = {arch: folder / f"{name}-{size}-{arch}.edgeq" for arch in ARCHES}
    if all(path.is_file() for path in paths.values()):
        return paths
    torch.manual_seed(0)
    example = torch.randn(1, 3, size, size)
    int_model = integer_model(torchvision_model(name), example, "aarch64")
    compile_model(int_model, (example,), target=dotprod_target(folder), out=paths["aarch64"], opt_level=2)
    compile_model(int_model, (example,), out=paths["x86_64"], opt_level=2, simulate=True)
    return paths


def weighted(rows: list[tuple[dict, Loop | None]]) -> dict[str, tuple[float, int]]:
    """MAC-weighted instructions per MAC by kernel kind (and ``all``), with the number of kernels counted."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for op, loop in rows:
        if loop is None:
            continue
        for kind in (kernel_kind(op), "all"):
            sums[kind][0] += op["macs"] * loop.per_mac
            sums[kind][1] += op["macs"]
            sums[kind][2] += 1
    return {kind: (total / macs, int(count)) for kind, (total, macs, count) in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated torchvision classifiers (default: {','.join(MODELS)})")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--keep", type=Path, help="compile into this folder and reuse the artifacts found there")
    parser.add_argument("--each", action="store_true", help="also print every kernel's loop")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        print("Instructions per MAC in each kernel's main inner loop (static count), MAC-weighted mean over the kernels:\n")
        print("| model | kind | aarch64 sdot | x86_64 (this CPU) | kernels |")
        print("|---|---|---|---|---|")
        details = []
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            per_arch = {arch: kernel_loops(path, folder) for arch, path in artifacts(name, args.size, folder).items()}
            means = {arch: weighted(rows) for arch, rows in per_arch.items()}
            for kind in ("convolution", "pointwise", "depthwise", "dense", "all"):
                if kind in means["aarch64"] or kind in means["x86_64"]:
                    cells = [f"{means[a][kind][0]:.3f}" if kind in means[a] else "n/a" for a in ARCHES]
                    print(f"| {name} | {kind} | " + " | ".join(cells) + f" | {means['aarch64'].get(kind, (0, 0))[1]} |")
            for arch, rows in per_arch.items():
                details += [(name, arch, op, loop) for op, loop in rows]
        floors = {arch: min(loop.dots / loop.macs for _, a, _, loop in details if a == arch and loop) for arch in ARCHES}
        print("\nFloor (nothing but dot instructions): " + ", ".join(f"{arch} {floor:.4f}" for arch, floor in floors.items()))
        if args.each:
            print("\n| model | arch | op | kind | MACs | loop instructions | dot instructions | instructions / MAC |")
            print("|---|---|---|---|---|---|---|---|")
            for name, arch, op, loop in details:
                counts = f"{loop.instructions} | {loop.dots} | {loop.per_mac:.3f}" if loop else "n/a | 0 | n/a"
                print(f"| {name} | {arch} | {op['name']} | {kernel_kind(op)} | {op['macs']} | {counts} |")


if __name__ == "__main__":
    main()
