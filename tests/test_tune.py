"""edgeq tune: tuning records measured on this machine and on a board behind a TVM RPC tracker (here a tracker and
a server on 127.0.0.1 that stop by themselves), used by compile automatically, with artifacts still equal to the
integer model bit for bit; the budget; the errors. (Every point of the search space is exact: test_kernels.py.)"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import tvm
from models import SmallCNN, integer_model

from edgeq.cli import main
from edgeq.compile import compile_model
from edgeq.compile.tuning_records import TuningRecords, records_folder
from edgeq.errors import CompileError
from edgeq.export import to_onnx
from edgeq.targets import load_target
from edgeq.tune import Tracker, TuneError, tune_model
from edgeq.tune.budget import TuningState
from edgeq.tune.tasks import Task
from edgeq_runtime import Model

pytestmark = pytest.mark.flow  # tunes kernels with MetaSchedule

KEY = "edgeq-test-board"
LIFETIME_SECONDS = 600
"""The tracker and the server exit by themselves after this long, whatever happens to the test process."""

TUNABLE_KERNELS = 4
"""SmallCNN's three convolutions and its classifier."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listening(port: int, seconds: float = 60) -> None:
    """Wait until a process listens on 127.0.0.1:``port`` (``seconds`` at most)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _start(command: list[str]) -> subprocess.Popen:
    """``python command`` in the background, ending by itself after LIFETIME_SECONDS."""
    return subprocess.Popen(["timeout", str(LIFETIME_SECONDS), sys.executable, *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def tracker():
    """A TVM RPC tracker with one server (this machine) registered under ``KEY``."""
    port, server_port = _free_port(), _free_port()
    tracker_command = ["-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)]
    server_command = ["-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key", KEY, "--host", "127.0.0.1",
                      "--port", str(server_port), "--port-end", str(server_port + 50)]
    processes = []
    try:
        processes.append(_start(tracker_command))
        _listening(port)  # before the server starts: it retries a tracker only every 5 seconds
        processes.append(_start(server_command))
        found = Tracker("127.0.0.1", port, KEY)
        for _ in range(300):  # until the server has registered
            try:
                if found.check():
                    break
            except TuneError:
                pass
            time.sleep(0.2)
        yield found
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    """SmallCNN for x86_64 as an integer model and its QDQ file, with samples."""
    torch.manual_seed(0)
    samples = torch.randn(4, 1, 16, 16)
    int_model = integer_model(SmallCNN().eval(), samples, "x86_64")
    path = to_onnx(int_model, (samples[:1],), tmp_path_factory.mktemp("tune") / "small.onnx")
    return int_model, path, samples


def assert_equals_integer_model(artifact, int_model, samples: torch.Tensor) -> None:
    with Model.load(artifact) as model:
        for sample in samples:
            got = next(iter(model.run(sample[None].numpy(), raw=True).values()))
            np.testing.assert_array_equal(got, int_model.run_integer(sample[None]).numpy())


def test_tuning_on_a_board_through_the_rpc_tracker_and_compile_uses_the_records(tracker, small_cnn, tmp_path, monkeypatch, capsys):
    int_model, path, samples = small_cnn
    monkeypatch.setenv("EDGEQ_CACHE_DIR", str(tmp_path / "cache"))
    address = f"{tracker.host}:{tracker.port}"
    assert main(["tune", str(path), "--budget", "0.3", "--rpc", address, "--key", KEY]) == 0
    printed = capsys.readouterr().out
    assert f"board(s) with key {KEY}" in printed and f"measured on {address} key {KEY}" in printed
    assert "tunable kernels per run: default" in printed and " left" in printed
    baseline = load_target("x86_64").llvm  # the model's target: the x86-64-v3 baseline, whatever this CPU is
    folder = records_folder("x86_64", {"mtriple": baseline.mtriple, "mcpu": baseline.mcpu})
    assert (folder / "database_tuning_record.json").stat().st_size > 0

    artifact = tmp_path / "tuned.edgeq"
    compiled = subprocess.run(  # a fresh process: it reads the records as a user's next command would
        [sys.executable, "-m", "edgeq.cli", "compile", str(path), "-o", str(artifact)], capture_output=True, text=True, check=True
    )
    assert f"{TUNABLE_KERNELS} of the {TUNABLE_KERNELS} tunable ones from tuning records ({folder})" in compiled.stdout
    assert_equals_integer_model(artifact, int_model, samples)

    assert main(["compile", str(path), "-o", str(tmp_path / "untuned.edgeq"), "--untuned"]) == 0
    assert f"0 of the {TUNABLE_KERNELS} tunable ones" in capsys.readouterr().out


def test_tuning_on_this_machine_keeps_the_best_records_within_the_budget(small_cnn, tmp_path):
    int_model, _, samples = small_cnn
    lines: list[str] = []
    result = tune_model(int_model, (samples[:1],), records=tmp_path / "records", budget_minutes=0.3, progress=lines.append)
    assert [k.schedule for k in result.kernels] == ["conv2d", "conv2d", "conv2d", "dense"]
    assert all(k.best_seconds <= k.default_seconds for k in result.kernels)
    assert sum(k.trials for k in result.kernels) > 0
    assert result.measured_on == "this machine"
    assert any(" left" in line for line in lines)

    records = TuningRecords(tmp_path / "records", tvm.target.Target(result.machine))
    assert len(records) >= TUNABLE_KERNELS  # the default schedules at least
    compiled = compile_model(int_model, (samples[:1],), out=tmp_path / "t.edgeq", tuning_records=tmp_path / "records")
    assert compiled.manifest["tuned_kernels"] == TUNABLE_KERNELS
    assert sum(k.tuned for k in compiled.kernels) == TUNABLE_KERNELS
    assert_equals_integer_model(compiled.artifact, int_model, samples)


def test_the_budget_goes_first_to_the_kernel_with_most_time_per_trial():
    tasks = [Task("a", "conv2d", tvm.IRModule(), 1, True), Task("b", "conv2d", tvm.IRModule(), 3, True)]
    state = TuningState(tasks, [0.004, 0.002], time.monotonic() + 60, lambda line: None)
    assert state.promise(1) > state.promise(0)  # 3 runs x 2 ms beat 1 run x 4 ms
    state.trials[1] = 8
    assert state.promise(0) > state.promise(1)  # ... until b has had its trials
    assert 0 < state.left() <= 60


def test_tuning_errors_name_what_to_do(tracker, small_cnn, tmp_path, capsys):
    _, path, _ = small_cnn
    closed = _free_port()
    assert main(["tune", str(path), "--rpc", f"127.0.0.1:{closed}", "--key", KEY]) == 1
    assert f"no TVM RPC tracker answers at 127.0.0.1:{closed}" in capsys.readouterr().err
    assert main(["tune", str(path), "--rpc", f"{tracker.host}:{tracker.port}", "--key", "no-such-board"]) == 1
    error = capsys.readouterr().err
    assert "has no board with key 'no-such-board'" in error and KEY in error
    assert main(["tune", str(path), "--rpc", "127.0.0.1"]) == 1
    assert "--rpc HOST:PORT and --key KEY go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", str(path), "--budget", "0"])
    assert "expected a positive number of minutes" in capsys.readouterr().err
    assert main(["tune", str(path), "--target", "npu-s"]) == 1  # its CPU is an aarch64 board
    assert "runs on aarch64, not on this machine" in capsys.readouterr().err
    with pytest.raises(CompileError, match="no tuning records here"):
        compile_model(path, out=tmp_path / "x.edgeq", tuning_records=tmp_path)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "database_workload.json").write_text("not json\n")
    (corrupt / "database_tuning_record.json").write_text("not json\n")
    with pytest.raises(CompileError, match=r"corrupt: unreadable tuning records .*delete the folder and tune again"):
        compile_model(path, out=tmp_path / "x.edgeq", tuning_records=corrupt)
    assert not (tmp_path / "x.edgeq").exists()
