"""The evaluation metrics all-reduce their sums: two gloo processes, each with half of the
data, compute what one process computes on all of it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vebi.evaluation import (
    CheckerboardScore,
    DeletionArea,
    MeanThresholdIoU,
    PointingGame,
    RelevanceMass,
    ThresholdIoU,
)


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(9, 12, 12, generator=generator)
    masks = torch.rand(9, 12, 12, generator=generator) > 0.6
    curves = torch.rand(9, 5, generator=generator, dtype=torch.float64)
    return maps, masks, curves


def _results(rows: slice) -> dict[str, torch.Tensor]:
    maps, masks, curves = _data()
    metrics = {
        "iou": ThresholdIoU(),
        "iou_at_mean": MeanThresholdIoU(),
        "pointing": PointingGame(),
        "mass": RelevanceMass(),
    }
    out = {}
    for name, metric in metrics.items():
        metric.update(maps[rows], masks[rows])
        value = metric.compute()
        out[name] = value["curve"] if isinstance(value, dict) else value
    deletion = DeletionArea(steps=4)
    deletion.update(curves=curves[rows])
    out["deletion"] = deletion.compute()["auc"]
    artefacts = CheckerboardScore([2])
    artefacts.update(maps[rows])
    out["artefacts"] = artefacts.compute()
    return out


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # uneven shards: 5 and 4 images
        torch.save(_results(slice(0, 5) if rank == 0 else slice(5, 9)), f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # end to end through processes: make acceptance
def test_two_processes_match_one(tmp_path: Path) -> None:
    single = _results(slice(0, 9))
    mp.spawn(_worker, args=(_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        shard = torch.load(tmp_path / f"{rank}.pt")
        for name, value in single.items():
            assert torch.allclose(shard[name].double(), value.double(), atol=1e-9), name
