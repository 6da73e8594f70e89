"""Building and timing candidate kernels: on this machine, or on boards behind TVM's RPC tracker.

Candidates are built in this process (:class:`InProcessBuilder`): MetaSchedule's default builder starts worker
processes that each import TVM's tensor intrinsics first, longer than a kernel takes to build, and they would
not know edgeq's own intrinsics. They are timed by MetaSchedule's runners: :func:`local_runner` in a worker
process here, :meth:`Tracker.runner` on a board a tracker hands out (libraries for another architecture are
linked with the cross compiler first).
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder

from edgeq.compile.codegen import Machine
from edgeq.errors import TuneError

EVALUATOR = ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=50, enable_cpu_cache_flush=False)
"""How a candidate is timed: 3 repeats, each the mean of enough runs to last 50 ms (MetaSchedule's ``run_secs``;
edgeq ranks candidates by their mean)."""

RUN_TIMEOUT_SECONDS = 60


@derived_object
class InProcessBuilder(PyBuilder):
    """Builds each candidate with LLVM in this process and links it for ``machine``, into a new folder of
    ``folder`` (the caller's to remove)."""

    def __init__(self, machine: Machine, folder: str) -> None:
        super().__init__()
        self.machine = machine
        self.folder = folder

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        results = []
        for index, item in enumerate(build_inputs):
            try:
                library = tvm.compile(item.mod, target=item.target)
                path = tempfile.mkdtemp(dir=self.folder, prefix=f"{index}-")
                artifact = os.path.join(path, "kernel.so")
                library.export_library(artifact, **self.machine.export_options())
                results.append(BuilderResult(artifact, None))
            except Exception as error:  # noqa: BLE001 - a candidate that does not build is a failed trial, not an error
                results.append(BuilderResult(None, f"{type(error).__name__}: {error}"))
        return results


def local_runner() -> ms.runner.LocalRunner:
    """Times candidates on this machine."""
    return ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_SECONDS, evaluator_config=EVALUATOR)


@dataclass(frozen=True)
class Tracker:
    """A TVM RPC tracker and the key of the boards to measure on."""

    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, address: str, key: str) -> Tracker:
        """``HOST:PORT`` and a key.

        Raises:
            TuneError: ``address`` is not ``HOST:PORT``.
        """
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise TuneError(f"--rpc {address!r}: expected HOST:PORT of a TVM RPC tracker, e.g. 127.0.0.1:9190")
        return cls(host, int(port), key)

    def check(self) -> int:
        """How many boards with the key the tracker has (free or busy).

        Raises:
            TuneError: no tracker answers, or it has no board with the key (naming the keys it has).
        """
        try:
            socket.create_connection((self.host, self.port), timeout=5).close()  # TVM's own client retries for a minute
            summary = tvm.rpc.connect_tracker(self.host, self.port).summary()
        except (OSError, RuntimeError) as error:
            raise TuneError(
                f"no TVM RPC tracker answers at {self.host}:{self.port} ({error}); start one with "
                "`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port PORT`"
            ) from None
        queues = summary.get("queue_info", {})
        if self.key not in queues:
            raise TuneError(
                f"the tracker at {self.host}:{self.port} has no board with key {self.key!r} (keys: "
                f"{', '.join(sorted(queues)) or 'none'}); on the board run `python -m tvm.exec.rpc_server "
                f"--tracker {self.host}:{self.port} --key {self.key}`"
            )
        queue = queues[self.key]
        return int(queue.get("free", 0)) + int(queue.get("pending", 0))

    def runner(self) -> ms.runner.RPCRunner:
        """Times candidates on the tracker's boards with the key."""
        config = ms.runner.RPCConfig(
            tracker_host=self.host, tracker_port=self.port, tracker_key=self.key, session_timeout_sec=RUN_TIMEOUT_SECONDS
        )
        return ms.runner.RPCRunner(rpc_config=config, evaluator_config=EVALUATOR, max_workers=1)


def mean_seconds(result: ms.runner.RunnerResult) -> float | None:
    """A measured candidate's mean time, or None if it failed."""
    if result.error_msg is not None or not result.run_secs:
        return None
    return sum(float(s) for s in result.run_secs) / len(result.run_secs)
