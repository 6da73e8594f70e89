"""DistributedDataParallel: two gloo processes on 127.0.0.1 against one process fed the union of their batches.

docs/training.md "Distributed training" states what is exact: calibration ranges (min/max and histogram) are
those of the union, bit for bit; after SGD steps the weights agree within float32 rounding (DDP averages the ranks'
gradients, one process sums one larger batch); every rank converts the same integer model.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from models import SmallCNN
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from edgeq.quantization import (
    FakeQuantState,
    MinMaxObserver,
    QConfig,
    convert_fx,
    default_calib_qconfig,
    prepare_qat_fx,
    set_fake_quantize,
)

WORLD = 2
STEPS = 3
RANK_BATCH = 4
QCONFIGS = {"histogram": default_calib_qconfig, "minmax": QConfig(MinMaxObserver)}
PROBE = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(7))


def _batches(rank: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's batch of ``rank``; ``None``: the union of every rank's batch of that step, in rank order."""
    generator = torch.Generator().manual_seed(1)
    steps = []
    for _ in range(STEPS):
        images = torch.randn(WORLD, RANK_BATCH, 1, 12, 12, generator=generator) * 2
        labels = torch.randint(0, 10, (WORLD, RANK_BATCH), generator=generator)
        steps.append((images.flatten(0, 1), labels.flatten()) if rank is None else (images[rank], labels[rank]))
    return steps


def _prepared(qconfig: QConfig) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return prepare_qat_fx(SmallCNN(), qconfig, example_inputs=(PROBE[:1],), target="npu-m")


def _integer(prepared: torch.fx.GraphModule) -> np.ndarray:
    return convert_fx(prepared).run_integer(PROBE).numpy()


def _job(qconfig_name: str, rank: int | None) -> dict[str, object]:
    """Calibrate, then SGD on the mean loss with ranges and BatchNorm frozen (VALIDATION, eval), then convert;
    under torch.distributed the model trains wrapped in DistributedDataParallel on this rank's batches."""
    prepared = _prepared(QCONFIGS[qconfig_name]).eval()
    batches = _batches(rank)
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for images, _ in batches:
            prepared(images)
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    result: dict[str, object] = {"calibrated": _integer(prepared)}
    trained = DistributedDataParallel(prepared) if rank is not None else prepared
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.05)
    for images, labels in batches:
        optimizer.zero_grad()
        F.cross_entropy(trained(images), labels).backward()
        optimizer.step()
    result["trained"] = _integer(prepared)
    result["parameters"] = {name: p.detach().clone() for name, p in prepared.named_parameters()}
    if rank is not None:  # QAT, BatchNorm in training mode: the ranks' ranges and statistics part until convert_fx
        set_fake_quantize(prepared, FakeQuantState.QAT)
        prepared.train()
        with torch.no_grad():
            trained(batches[0][0])
        result["bn_mean_before_convert"] = prepared.get_submodule(_first_bn(prepared)).running_mean.clone()
        result["converted"] = _integer(prepared)
        result["state_dict"] = {k: v.clone() for k, v in prepared.state_dict().items()}
    return result


def _first_bn(model: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d))


def _rank_main(rank: int, port: int, qconfig_name: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(_job(qconfig_name, rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.flow  # two spawned processes: about a minute on a loaded machine
@pytest.mark.parametrize("qconfig_name", sorted(QCONFIGS))
def test_ddp_ranks_convert_the_union_model(qconfig_name, tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), qconfig_name, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    union = _job(qconfig_name, None)
    # calibration: the union's ranges, bit for bit, on both ranks
    for result in ranks:
        np.testing.assert_array_equal(result["calibrated"], union["calibrated"])
    # SGD with DDP's mean gradient: the union's weights within float32 rounding, the same integer model on both ranks
    np.testing.assert_array_equal(ranks[0]["trained"], ranks[1]["trained"])
    for name, value in union["parameters"].items():
        torch.testing.assert_close(ranks[0]["parameters"][name], value, rtol=1e-5, atol=1e-6)
    # BatchNorm in training mode: the ranks' statistics differ, convert_fx takes rank 0's
    assert not torch.equal(ranks[0]["bn_mean_before_convert"], ranks[1]["bn_mean_before_convert"])
    np.testing.assert_array_equal(ranks[0]["converted"], ranks[1]["converted"])
    assert ranks[0]["state_dict"].keys() == ranks[1]["state_dict"].keys()
    for key, value in ranks[0]["state_dict"].items():
        torch.testing.assert_close(ranks[1]["state_dict"][key], value, rtol=0, atol=0, msg=key)


def test_ddp_does_not_broadcast_observers():
    prepared = _prepared(default_calib_qconfig)
    ignored = set(prepared._ddp_params_and_buffers_to_ignore)
    assert not any(name.endswith(("running_mean", "running_var")) for name in ignored)  # BatchNorm: DDP's rule
    assert {name for name in ignored if name.endswith("running_max")} == {
        f"{path}.running_max" for path, module in prepared.named_modules() if hasattr(module, "clipping_range")
    }


@pytest.mark.parametrize("when", ["before_prepare", "after_prepare"])
def test_sync_batchnorm_folds(when):
    """convert_sync_batchnorm before or after prepare: the same calibrated integer model as BatchNorm2d."""
    images = _batches(None)[0][0]

    def calibrated(model: nn.Module, sync_after: bool, expect_sync: bool) -> np.ndarray:
        prepared = prepare_qat_fx(model, default_calib_qconfig, example_inputs=(PROBE[:1],), target="npu-m").eval()
        if sync_after:
            prepared = nn.SyncBatchNorm.convert_sync_batchnorm(prepared)
        assert any(isinstance(m, nn.SyncBatchNorm) for m in prepared.modules()) == expect_sync
        set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
        with torch.no_grad():
            prepared(images)
        return _integer(prepared)

    torch.manual_seed(0)
    plain = SmallCNN()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(SmallCNN()) if when == "before_prepare" else SmallCNN()
    synced.load_state_dict(plain.state_dict())
    np.testing.assert_array_equal(calibrated(synced, when == "after_prepare", True), calibrated(plain, False, False))
