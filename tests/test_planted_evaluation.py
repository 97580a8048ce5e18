"""End to end through evaluate.py and the galleries with planted answers: a method whose map
is the mask must score IoU 1 and pointing 1, a shifted one 0, and a gallery must average
exactly the top-N images of its class by the feature's response."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from tests.planted_data import PlantedMaskData
from vebi.explain.interpretation import average_visualisations
from vebi.mining import FeatureMiner
from vebi.mining.cache import ActivationCache
from vebi.models import TorchvisionClassifier


def test_planted_maps_score_exactly_through_the_streaming_loader(tmp_path: Path) -> None:
    result = run_cli(
        "evaluate.py",
        "~data",
        "+data._target_=tests.planted_data.PlantedMaskData",
        "model_source=config",
        "model=resnet18",
        "model.num_classes=3",
        "model_source.allow_random_init=true",
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
    for metric in ("iou_mean", "iou_at_map_mean", "pointing_game", "relevance_mass"):
        assert planted[metric] == pytest.approx(1.0), metric
        assert shifted[metric] == pytest.approx(0.0), metric
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
