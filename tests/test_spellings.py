"""The quantization front end's vocabulary: every op after fusion is some spelling of the user's, and every pre-fusion
op is rewritten (or ends the region)."""

import pytest

from edgeq.ops import Op
from edgeq.quantization.canonical_emitters import PRE_FUSION_EMITTERS
from edgeq.quantization.patterns import PreFusionOp, spelled_ops
from edgeq.quantization.qat_modules import TORCH_FUNCTIONS


def test_every_op_has_a_spelling():
    assert spelled_ops() == set(Op) | set(PreFusionOp)


def test_pre_fusion_ops_are_rewritten():
    assert set(PRE_FUSION_EMITTERS) == set(PreFusionOp) - {PreFusionOp.DEQUANT_STUB}


def test_a_missing_torch_function_is_named():
    function = TORCH_FUNCTIONS._entries.pop(Op.TANH)
    try:
        assert TORCH_FUNCTIONS.missing() == [Op.TANH]
        with pytest.raises(KeyError, match="tanh has no torch function in quantization/qat_modules.py"):
            TORCH_FUNCTIONS[Op.TANH]
    finally:
        TORCH_FUNCTIONS._entries[Op.TANH] = function
