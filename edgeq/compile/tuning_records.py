"""Tuning records: the schedules ``edgeq tune`` measured best, kept per target and CPU, read by compile.

The records are a MetaSchedule JSON database (``database_workload.json``, ``database_tuning_record.json``) in
``<cache>/tuning/<target>/<arch>-<cpu>/`` (:func:`records_folder`; the cache is ``$EDGEQ_CACHE_DIR``, default
``~/.cache/edgeq``). A record belongs to a kernel by its structure (MetaSchedule's structural hash of the fused
PrimFunc, weights excluded), so any model with the same kernel shape uses it. Its schedule is the trace of one
point of the kernel's search space (:func:`edgeq.compile.schedules.design_space`), replayed here: it moves loops,
never changes a number.
"""

from __future__ import annotations

from pathlib import Path

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import meta_schedule as ms

from edgeq.compile import intrinsics
from edgeq.errors import CompileError
from edgeq.fileio import cache_dir, make_folder, slug

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"


def records_folder(target_name: str, llvm: dict) -> Path:
    """The default folder of the tuning records of ``target_name`` built for the LLVM target ``llvm`` (its
    triple's architecture and its ``mcpu``, ``generic`` if none)."""
    arch = str(llvm["mtriple"]).split("-")[0]
    return cache_dir() / "tuning" / slug(target_name) / f"{arch}-{slug(llvm.get('mcpu') or 'generic')}"


def as_workload(function: tirx.PrimFunc) -> tvm.IRModule:
    """A fused kernel as the module MetaSchedule tunes and looks up (its one function named ``main``)."""
    return tvm.IRModule({"main": function.with_attr("global_symbol", "main")})


def has_records(folder: Path) -> bool:
    """Whether ``edgeq tune`` wrote records in ``folder``."""
    return (Path(folder) / RECORDS).is_file()


def open_database(folder: Path, create: bool) -> ms.database.JSONDatabase:
    """The JSON database in ``folder`` (created with the folder if ``create``).

    Raises:
        CompileError: ``folder`` has no records and ``create`` is False, or its files are not a MetaSchedule
            database.
    """
    folder = Path(folder)
    if not create and not has_records(folder):
        raise CompileError(f"{folder}: no tuning records here ({RECORDS} missing); run `edgeq tune` first")
    if create:
        make_folder(folder)
    intrinsics.register_all()  # the traces tensorize with them: reading a record replays its trace's names
    try:
        return ms.database.JSONDatabase(str(folder / WORKLOADS), str(folder / RECORDS), allow_missing=create)
    except Exception as error:  # TVM raises its own error kinds for unreadable JSON
        raise CompileError(f"{folder}: unreadable tuning records ({error}); delete the folder and tune again") from error


class TuningRecords:
    """Tuned schedules for :func:`edgeq.compile.schedules.schedule_kernels`.

    Args:
        folder: a folder ``edgeq tune`` wrote.
        target: the LLVM target the records were measured for.
    """

    def __init__(self, folder: Path, target: tvm.target.Target) -> None:
        self.folder = Path(folder)
        self.target = target
        self._database = open_database(self.folder, create=False)

    def __len__(self) -> int:
        return len(self._database)

    def schedule(self, function: tirx.PrimFunc) -> s_tir.Schedule | None:
        """The best measured schedule of ``function``, or None if it has no record."""
        workload = as_workload(function)
        if not self._database.has_workload(workload):
            return None
        return self._database.query_schedule(workload, self.target, workload_name="main")
