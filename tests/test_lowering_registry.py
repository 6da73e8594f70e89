"""The integer lowering is driven by its registry: every op's rule found by asking ``LOWERING``, each table
activation's Relax form by asking ``TABLE_FORMS``, and a missing one named with its op."""

from __future__ import annotations

import pytest

from edgeq.compile import lower_integer
from edgeq.compile.lowering.lookup_table import TABLE_FORMS
from edgeq.compile.lowering.rule import LOWERING
from edgeq.ops import LOOKUP_TABLE_OPS, Op


def test_the_driver_runs_every_registered_rule_once():
    factories = {LOWERING[op] for op in Op}
    assert len(lower_integer._rules()) == len(factories)


def test_a_rule_missing_from_the_registry_stops_the_driver():
    entry = LOWERING._entries.pop(Op.MUL)
    try:
        assert LOWERING.missing() == [Op.MUL]
        with pytest.raises(KeyError, match="mul has no lowering rule in compile/lowering/"):
            lower_integer._rules()
    finally:
        LOWERING._entries[Op.MUL] = entry


@pytest.mark.parametrize("op", LOOKUP_TABLE_OPS, ids=lambda op: op.value)
def test_each_table_activation_needs_its_own_form(op):
    entry = TABLE_FORMS._entries.pop(op)
    try:
        assert TABLE_FORMS.missing() == [op]
        with pytest.raises(KeyError, match=f"{op.value} has no Relax form in compile/lowering/lookup_table.py"):
            lower_integer._rules()
    finally:
        TABLE_FORMS._entries[op] = entry
