"""Issue 29, targets: a bad target file is one line naming the file and the key; nothing is converted silently,
an NPU's host is a CPU target resolved on load, LLVM names are checked against LLVM's own lists, and the x86 targets
build for the x86-64-v3 baseline or for this machine's CPU."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import tvm
from tvm.target.codegen import target_has_features

from edgeq.errors import TargetError
from edgeq.targets import TargetKind, host_cpu, load_target, target_names

Edit = Callable[[str], str]


def builtin_text(name: str, new_name: str) -> str:
    """The text of the built-in target ``name``'s file, renamed ``new_name``."""
    return load_target(name).source.read_text().replace(f'name = "{name}"', f'name = "{new_name}"')


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def assert_refused(path: Path, message: str) -> None:
    """Loading ``path`` is one line: the file, then a problem matching ``message``."""
    with pytest.raises(TargetError) as error:
        load_target(path)
    text = str(error.value)
    assert "\n" not in text and text.startswith(f"{path}: "), text
    assert re.search(message, text), text


def key(name: str, value: str) -> Edit:
    """An edit setting the existing key ``name`` (its whole line) to ``value``."""
    return lambda text: re.sub(rf"(?m)^{re.escape(name)} = .*$", f"{name} = {value}", text, count=1)


@pytest.mark.parametrize(
    "edit,message",
    [
        (key("clock_hz", "true"), r"^\S+: hardware\.clock_hz: Input should be a valid integer, got true$"),
        (key("clock_hz", '"1000000000"'), r'hardware\.clock_hz: Input should be a valid integer, got "1000000000"$'),
        (key("int8_macs_per_cycle", "256.0"), r"hardware\.int8_macs_per_cycle: Input should be a valid integer, got 256\.0$"),
        (key("sram_bytes", "-262144"), r"hardware\.sram_bytes: Input should be greater than 0, got -262144$"),
        (key("layer_overhead_cycles", "-1"), r"hardware\.layer_overhead_cycles: Input should be greater than or equal to 0, got -1$"),
        (key("max_tensor_bytes", "4.0e6"), r"npu\.max_tensor_bytes: Input should be a valid integer, got 4000000\.0$"),
        (key("dilations", "[true]"), r"npu\.conv2d\.dilations\.0: Input should be a valid integer, got true$"),
        (key("factors", '["2"]'), r'npu\.upsample_nearest2d\.factors\.0: Input should be a valid integer, got "2"$'),
        (key("factors", "[]"), r"npu\.upsample_nearest2d\.factors: must list at least one value \(leave the op out of \[npu\] ops"),
        (key("dilations", "[]"), r"npu\.conv2d\.dilations: must list at least one value"),
        (key("concat_shares_input_scale", '"yes"'), r'quantization\.concat_shares_input_scale: Input should be a valid boolean, got "yes"$'),
        (key("concat_shares_input_scale", "1"), r"quantization\.concat_shares_input_scale: Input should be a valid boolean, got 1$"),
    ],
)
def test_npu_figures_are_strict(tmp_path, edit, message):
    assert_refused(write(tmp_path, "my-npu", edit(builtin_text("npu-s", "my-npu"))), message)


@pytest.mark.parametrize(
    "edit,message",
    [
        (key("conv2d_int8_macs_per_s", "inf"), r"perf\.conv2d_int8_macs_per_s: Input should be a finite number, got inf$"),
        (key("conv2d_int8_macs_per_s", "nan"), r"perf\.conv2d_int8_macs_per_s: Input should be a finite number, got nan$"),
        (key("memory_bytes_per_s", "0"), r"perf\.memory_bytes_per_s: Input should be greater than 0, got 0$"),
        (key("memory_bytes_per_s", "-4.0e9"), r"perf\.memory_bytes_per_s: Input should be greater than 0, got -4000000000\.0$"),
        (key("parallel_speedup", "true"), r"perf\.parallel_speedup: Input should be a valid number, got true$"),
        (key("linear_int8_macs_per_s", '"4e9"'), r'perf\.linear_int8_macs_per_s: Input should be a valid number, got "4e9"$'),
        (key("kernel_overhead_ns", "-inf"), r"perf\.kernel_overhead_ns: Input should be a finite number, got -inf$"),
        (key("kernel_overhead_ns", "-1"), r"perf\.kernel_overhead_ns: Input should be greater than or equal to 0, got -1$"),
    ],
)
def test_cpu_figures_are_finite_and_positive(tmp_path, edit, message):
    assert_refused(write(tmp_path, "my-cpu", edit(builtin_text("x86_64", "my-cpu"))), message)


def test_an_integer_is_a_number(tmp_path):
    text = key("conv2d_int8_macs_per_s", "10_000_000_000")(builtin_text("x86_64", "my-cpu"))
    assert load_target(write(tmp_path, "my-cpu", text)).perf.conv2d_int8_macs_per_s == 1e10


@pytest.mark.parametrize(
    "host,message",
    [
        ('"arm"', r"host: unknown target 'arm'; known targets: aarch64, .*x86_64-native$"),
        ('"npu-m"', r"host: 'npu-m' is an npu target; the host is a cpu target"),
        ('"absent.toml"', r"host: \S+/absent\.toml: no such file$"),
        ('"my-npu.toml"', r"host: 'my-npu\.toml' is an npu target; the host is a cpu target"),
        ('"other-npu.toml"', r"host: 'other-npu\.toml' is an npu target"),
        ('"bad-cpu.toml"', r"host: \S+/bad-cpu\.toml: perf\.parallel_speedup: Input should be greater than 0, got 0$"),
    ],
)
def test_host_is_a_cpu_target(tmp_path, host, message):
    write(tmp_path, "other-npu", key("host", '"my-npu.toml"')(builtin_text("npu-s", "other-npu")))
    write(tmp_path, "bad-cpu", key("parallel_speedup", "0")(builtin_text("aarch64", "bad-cpu")))
    assert_refused(write(tmp_path, "my-npu", key("host", host)(builtin_text("npu-s", "my-npu"))), message)


def test_host_missing(tmp_path):
    text = builtin_text("npu-s", "my-npu").replace('host = "aarch64"\n', "")
    assert_refused(write(tmp_path, "my-npu", text), r"^\S+: an npu target needs host")


def test_cpu_target_has_no_host(tmp_path):
    assert_refused(write(tmp_path, "my-cpu", 'host = "aarch64"\n' + builtin_text("x86_64", "my-cpu")), r"a cpu target has no host")


def test_host_file_beside_the_npu_file(tmp_path, monkeypatch):
    boards = tmp_path / "boards"
    boards.mkdir()
    cpu = builtin_text("aarch64", "my-cpu").replace('mattr = ["+neon"]', 'mcpu = "cortex-a76"\nmattr = ["+neon", "+dotprod"]')
    write(boards, "my-cpu", cpu)
    npu = write(boards, "my-npu", key("host", '"my-cpu.toml"')(builtin_text("npu-s", "my-npu")))
    monkeypatch.chdir(tmp_path)  # the host is found beside the NPU file, not in the working folder
    host = host_cpu(load_target(Path("boards") / "my-npu.toml"))
    assert (host.name, host.kind, host.llvm.mcpu, host.llvm.mattr) == ("my-cpu", TargetKind.CPU, "cortex-a76", ("+neon", "+dotprod"))
    assert host_cpu(load_target(npu)).name == "my-cpu"


@pytest.mark.parametrize(
    "llvm,message",
    [
        ('mtriple = "x86_64-linux-gnu"\nmcpu = "pentium-9000"',
         r"llvm\.mcpu: 'pentium-9000' is not a CPU LLVM knows for x86_64-linux-gnu \(nearest: pentium-m, "),
        ('mtriple = "x86_64-linux-gnu"\nmcpu = "znver9"', r"llvm\.mcpu: 'znver9' is not a CPU .*\(nearest: znver5, "),
        ('mtriple = "x86_64-linux-gnu"\nmcpu = "native"',
         r"llvm\.mcpu: 'native' is not a CPU .*; leave mcpu out to build for the compiling machine's own CPU$"),
        ('mtriple = "aarch64-linux-gnu"\nmcpu = "cortex-a77x"',
         r"llvm\.mcpu: 'cortex-a77x' is not a CPU LLVM knows for aarch64-linux-gnu \(nearest: cortex-a77"),
        ('mtriple = "x86_64-linux-gnu"\nmattr = ["+avx512vnn"]',
         r"llvm\.mattr: '\+avx512vnn': 'avx512vnn' is not a feature LLVM knows for x86_64-linux-gnu \(nearest: avx512vnni, "),
        ('mtriple = "aarch64-linux-gnu"\nmattr = ["+neon", "-dotprd"]',
         r"llvm\.mattr: '-dotprd': 'dotprd' is not a feature LLVM knows for aarch64-linux-gnu \(nearest: dotprod"),
        ('mtriple = "aarch64-linux-gnu"\nmattr = ["+avx2"]', r"llvm\.mattr: '\+avx2': 'avx2' is not a feature LLVM knows for aarch64-linux-gnu"),
        ('mtriple = "x86_64-linux-gnu"\nmattr = ["avx2"]', r"llvm\.mattr: 'avx2' needs a sign: \+avx2 turns the feature on, -avx2 off$"),
        ('mtriple = "riscv64-linux-gnu"',
         r"llvm\.mtriple: 'riscv64-linux-gnu' is not a triple edgeq builds for: it builds Linux libraries for x86_64 and aarch64 only"),
        ('mtriple = "arm64-apple-darwin"', r"llvm\.mtriple: 'arm64-apple-darwin' is not a triple edgeq builds for"),
        ('mtriple = "x86_64-pc-windows-msvc"', r"llvm\.mtriple: 'x86_64-pc-windows-msvc' is not a triple edgeq builds for"),
    ],
)
def test_llvm_names_are_checked(tmp_path, llvm, message):
    text = re.sub(r"(?s)\[llvm\]\n.*?\n\n", f"[llvm]\n{llvm}\n\n", builtin_text("x86_64", "my-cpu"), count=1)
    assert_refused(write(tmp_path, "my-cpu", text), message)


def test_npu_whose_host_cannot_be_built(tmp_path):
    write(tmp_path, "rv-cpu", key("mtriple", '"riscv64-linux-gnu"')(builtin_text("aarch64", "rv-cpu")))
    npu = write(tmp_path, "my-npu", key("host", '"rv-cpu.toml"')(builtin_text("npu-s", "my-npu")))
    assert_refused(npu, r"host: \S+/rv-cpu\.toml: llvm\.mtriple: 'riscv64-linux-gnu' is not a triple edgeq builds for")


def test_llvm_warnings_are_not_printed(tmp_path, capfd):
    text = key("mtriple", '"x86_64-linux-gnu"\nmattr = ["+avx9001"]')(builtin_text("x86_64", "my-cpu"))
    assert_refused(write(tmp_path, "my-cpu", text), r"'avx9001' is not a feature LLVM knows")
    assert capfd.readouterr().err == ""


def test_known_names_from_another_vendor_load(tmp_path):
    text = key("mtriple", '"x86_64-pc-linux-gnu"\nmattr = ["+avx512vnni", "-sse4a", "+retpoline"]')(builtin_text("x86_64", "my-cpu"))
    llvm = load_target(write(tmp_path, "my-cpu", text)).llvm
    assert (llvm.arch, llvm.mcpu, llvm.mattr) == ("x86_64", "x86-64-v3", ("+avx512vnni", "-sse4a", "+retpoline"))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda folder: folder / "absent.toml", r"absent\.toml: no such file$"),
        (lambda folder: (folder / "dir.toml").mkdir() or folder / "dir.toml", r"dir\.toml: a folder, not a file; give the path of a file$"),
        (lambda folder: write(folder, "file", "") / "my.toml", r"file\.toml/my\.toml: no such file$"),
        (lambda folder: write_bytes(folder / "latin.toml", b'name = "latin"\ndescription = "caf\xe9"\n'),
         r"latin\.toml: not UTF-8 text \(byte 0xe9 at offset 33\); save it as UTF-8$"),
        (lambda folder: write(folder, "broken", 'name = "broken"\n[hardware\n'), r"broken\.toml: not valid TOML: .*\(at line 2, column 10\)$"),
    ],
)
def test_unreadable_files(tmp_path, make, message):
    assert_refused(make(tmp_path), message)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_file_without_read_permission(tmp_path):
    path = write(tmp_path, "secret", builtin_text("x86_64", "secret"))
    path.chmod(0)
    assert_refused(path, r"secret\.toml: cannot read: permission denied$")


def failing_read(path: Path) -> bytes:
    raise OSError(errno.EIO, os.strerror(errno.EIO))


def test_file_failing_while_read(tmp_path, monkeypatch):
    path = write(tmp_path, "flaky", builtin_text("x86_64", "flaky"))
    monkeypatch.setattr(Path, "read_bytes", failing_read)
    assert_refused(path, r"flaky\.toml: cannot read: Input/output error$")


def llvm_target(name: str) -> tvm.target.Target:
    llvm = load_target(name).llvm
    return tvm.target.Target({"kind": "llvm", "mtriple": llvm.mtriple, **({"mcpu": llvm.mcpu} if llvm.mcpu else {}), "mattr": list(llvm.mattr)})


def test_x86_64_builds_for_the_x86_64_v3_baseline():
    target = load_target("x86_64")
    assert (target.kind, target.llvm.mtriple, target.llvm.mcpu, target.llvm.mattr) == (TargetKind.CPU, "x86_64-linux-gnu", "x86-64-v3", ())
    assert target_has_features(["avx2", "fma", "bmi2"], llvm_target("x86_64"))
    assert not target_has_features("avx512vnni", llvm_target("x86_64")) and not target_has_features("avxvnni", llvm_target("x86_64"))


def test_x86_64_native_builds_for_this_machine():
    native, baseline = load_target("x86_64-native"), load_target("x86_64")
    assert (native.kind, native.llvm.mtriple, native.llvm.mcpu, native.llvm.mattr) == (TargetKind.CPU, "x86_64-linux-gnu", None, ("-sse4a",))
    assert native.perf == baseline.perf and "only on CPUs with its features" in native.description


def test_targets_lists_both_x86_targets(capsys):
    from edgeq.cli import main

    assert {"x86_64", "x86_64-native"} <= set(target_names())
    assert main(["targets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:2] == ["x86_64", "cpu"] and "x86-64-v3" in line for line in lines)
    assert any(line.split()[:2] == ["x86_64-native", "cpu"] for line in lines)
    assert len({line.index(" cpu ") if " cpu " in line else line.index(" npu ") for line in lines}) == 1  # aligned
