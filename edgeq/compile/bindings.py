"""Reading a Relax function's bindings: the kernel a binding calls, the variables it reads, and who reads each."""

from __future__ import annotations

import tvm
from tvm import relax

CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def called_kernel(value: relax.Expr) -> relax.GlobalVar | None:
    """The kernel a binding's value calls (None for anything but a ``call_tir``)."""
    return value.args[0] if isinstance(value, relax.Call) and value.op.same_as(CALL_TIR) else None


def reads(value: relax.Expr) -> list[relax.Var]:
    """The variables a binding's value reads (a kernel call: its tensor arguments, once per argument, constants
    left out)."""
    if called_kernel(value) is not None:
        return [argument for argument in value.args[1].fields if isinstance(argument, relax.Var)]
    return list(relax.analysis.free_vars(value))


def readers(function: relax.Function) -> dict[relax.Var, list[relax.Var]]:
    """Each variable of ``function`` -> the variables bound to values reading it (once per binding)."""
    found: dict[relax.Var, list[relax.Var]] = {}
    for var, value in relax.analysis.get_var2val(function).items():
        for read in dict.fromkeys(reads(value)):
            found.setdefault(read, []).append(var)
    return found
