"""End to end through evaluate.py and the galleries with planted answers: a method whose map
is the mask must score IoU 1 and pointing 1, a shifted one 0, and a gallery must average
exactly the top-N images of its class by the feature's response."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import run_cli
from tests.planted_data import PlantedMaskData
from tests.test_mining import _free_port
from vebi.explain.interpretation import average_visualisations
from vebi.mining import FeatureMiner
from vebi.mining.cache import ActivationCache
from vebi.models import TorchvisionClassifier

#: evaluate.py overrides: the planted data and a random ResNet-18 built from its config
PLANTED_MODEL = [
    "~data",
    "+data._target_=tests.planted_data.PlantedMaskData",
    "model_source=config",
    "model=resnet18",
    "model.num_classes=3",
    "model_source.allow_random_init=true",
]


@pytest.mark.slow  # end to end through processes: make acceptance
def test_planted_maps_score_exactly_through_the_streaming_loader(tmp_path: Path) -> None:
    result = run_cli(
        "evaluate.py",
        *PLANTED_MODEL,
        f"paths.log_dir={tmp_path}",
        "logger=none",
        "trainer.accelerator=cpu",
        "mining.progress=false",
        "evaluation.evaluators=[localisation]",
        "+evaluation.methods.planted._target_=tests.planted_data.MaskMethod",
        "+evaluation.methods.shifted._target_=tests.planted_data.ShiftedMaskMethod",
        "evaluation.select=[planted,shifted]",
        "evaluation.batch_size=7",  # batches that cut across classes
        "evaluation.batch_size_inference=11",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next(tmp_path.glob("evaluate/*/*/results.json")).read_text())
    planted, shifted = (results["heatmaps"]["methods"][name] for name in ("planted", "shifted"))
    assert results["heatmaps"]["num_images"] == 60
    for metric in ("iou_mean", "iou_at_map_mean", "pointing_game_strict", "relevance_mass"):
        assert planted[metric] == pytest.approx(1.0), metric
        assert shifted[metric] == pytest.approx(0.0), metric
    # the configured 15 px tolerance: the shifted square is 9 rows and 9 columns off the mask
    # (12.7 px < 15), a hit on every image
    assert planted["pointing_game"] == shifted["pointing_game"] == 1.0
    assert planted["images_without_mask"] == 0
    assert results["checkpoint"] is None and "resnet18" in results["model"]


def test_gallery_averages_exactly_the_top_images_of_its_class(tmp_path: Path) -> None:
    data = PlantedMaskData()
    data.setup()
    torch.manual_seed(0)
    model = TorchvisionClassifier("resnet18", num_classes=3).eval()
    miner = FeatureMiner(mu=5.0, cache_dir=tmp_path, progress=False, chunk_rows=16)
    report = miner.mine(model, data.data_train)
    top_n = 4
    visualisations = average_visualisations(
        model, report.relevant, data.data_train, ActivationCache(report.cache_path, ""), top_n
    )
    assert visualisations
    with report.relevant.extractor(model) as extractor:
        x = torch.cat([extractor(data.data_train.images[i : i + 30])[0] for i in range(0, 90, 30)])
    labels = data.data_train.labels
    for v in visualisations:
        feature = report.relevant.index.feature_id(v.layer, v.channel)
        members = torch.nonzero(labels == v.class_id).flatten()
        order = members[np.argsort(-x[members, feature].numpy(), kind="stable")[:top_n]]
        assert v.dataset_indices == order.tolist()
        torch.testing.assert_close(v.average_image, data.data_train.images[order].mean(0))


def _gallery_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        _save_gallery(Path(out_dir), f"rank{rank}")
    finally:
        dist.destroy_process_group()


def _save_gallery(folder: Path, name: str) -> None:
    """Mine the planted data (each process its shard under DDP) and save the galleries."""
    data = PlantedMaskData()
    data.setup()
    torch.manual_seed(0)
    model = TorchvisionClassifier("resnet18", num_classes=3).eval()
    miner = FeatureMiner(mu=5.0, cache_dir=folder / name, progress=False, chunk_rows=16)
    report = miner.mine(model, data.data_train)
    visualisations = average_visualisations(
        model, report.relevant, data.data_train, ActivationCache(report.cache_path, ""), 4
    )
    rows = [
        (v.class_id, v.layer, v.channel, v.dataset_indices, v.average_map) for v in visualisations
    ]
    torch.save(rows, folder / f"{name}.pt")


@pytest.mark.slow  # end to end through processes: make acceptance
def test_galleries_under_ddp_are_those_of_one_process(tmp_path: Path) -> None:
    """Two gloo processes, each with its shard of the training images in its cache: the
    ranking is merged over the shards and the features split between the processes; both
    get the galleries of one process (same top images, same maps)."""
    _save_gallery(tmp_path, "single")
    mp.spawn(_gallery_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    single = torch.load(tmp_path / "single.pt")
    assert len(single) > 3
    for rank in range(2):
        shared = torch.load(tmp_path / f"rank{rank}.pt")
        assert [v[:4] for v in shared] == [v[:4] for v in single]
        for a, b in zip(single, shared, strict=True):
            torch.testing.assert_close(b[4], a[4], atol=1e-5, rtol=1e-4)


def _numbers(results: dict) -> dict[str, float]:
    values = {f"metrics/{k}": v for k, v in results["metrics"].items()}
    for row in results["ablation"]["per_class"]:
        values |= {f"ablation/{row['class']}/{k}": v for k, v in row.items() if k != "class"}
    for method, row in results["heatmaps"]["methods"].items():
        values |= {
            f"{method}/{k}": v
            for k, v in row.items()
            if isinstance(v, float) and k != "seconds_per_image"
        }
    return values


@pytest.mark.slow  # end to end through processes: make acceptance
def test_two_processes_give_the_results_of_one(tmp_path: Path) -> None:
    """evaluate.py under DDP (2 gloo processes, trainer.devices=2): each process evaluates
    its shard, the sums are all-reduced, one process writes: the same results.json numbers
    (to 1e-6) and the same files as one process."""
    common = [
        *PLANTED_MODEL,
        "+data.test=61",  # odd: the shards differ in size
        "logger=none",
        "trainer.accelerator=cpu",
        "mining.progress=false",
        "evaluation.evaluators=[sparse,ablation,localisation,faithfulness]",
        "+evaluation.methods.planted._target_=tests.planted_data.MaskMethod",
        "evaluation.select=[planted,centre_gaussian]",
        "evaluation.steps=4",
        "evaluation.ablation.other_images=20",
    ]
    single = run_cli("evaluate.py", *common, f"paths.log_dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr[-3000:]
    one_dir = next((tmp_path / "one").glob("evaluate/*/*/results.json")).parent
    relevant = one_dir / "mining" / "relevant_features.h5"
    double = run_cli(
        "evaluate.py",
        *common,
        f"paths.log_dir={tmp_path / 'two'}",
        f"relevant_features={relevant}",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    )
    assert double.returncode == 0, double.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in double.stdout + double.stderr
    two_dir = next((tmp_path / "two").glob("evaluate/*/*/results.json")).parent
    one, two = (json.loads((d / "results.json").read_text()) for d in (one_dir, two_dir))
    a, b = _numbers(one), _numbers(two)
    assert a.keys() == b.keys() and len(a) > 30
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    files = {p.relative_to(d).as_posix() for d in (one_dir,) for p in d.rglob("*.png")}
    assert files == {p.relative_to(two_dir).as_posix() for p in two_dir.rglob("*.png")} - set()


@pytest.mark.slow  # end to end through processes: make acceptance
def test_empty_shards_do_not_hang(tmp_path: Path) -> None:
    """Three test images, one heatmap image, two processes: the second process's heatmap
    shard and its share of every one-image class in the ablation are empty; every sum and
    gather still completes, and the image is scored as in one process. Fewer test images than
    processes is one clear error (Lightning's test loop needs a batch on each)."""
    common = [
        *PLANTED_MODEL,
        "logger=none",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "mining.progress=false",
        "evaluation.evaluators=[sparse,ablation,localisation,faithfulness]",
        "+evaluation.methods.planted._target_=tests.planted_data.MaskMethod",
        "evaluation.select=[planted]",
        "evaluation.steps=4",
        "evaluation.heatmap_images=1",
        f"paths.log_dir={tmp_path}",
    ]
    result = run_cli("evaluate.py", *common, "+data.test=3", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next(tmp_path.glob("evaluate/*/*/results.json")).read_text())
    assert results["num_test_images"] == 3 and results["heatmaps"]["num_images"] == 1
    assert results["heatmaps"]["methods"]["planted"]["iou_mean"] == pytest.approx(1.0)
    assert len(results["ablation"]["per_class"]) == 3
    refused = run_cli("evaluate.py", *common, "+data.test=1", timeout=600)
    assert refused.returncode == 1
    assert "the test split has 1 image(s), fewer than the 2 processes" in refused.stderr
