"""Interpretation: average visualisations of the relevant features (docs/method.md, section 3)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.utils.data import Dataset

from vebi.explain.backprop import backprop_feature
from vebi.explain.figures import gallery_figure, save_figure
from vebi.explain.heatmaps import signal_to_heatmap
from vebi.explain.rules import Rules
from vebi.mining.cache import ActivationCache
from vebi.mining.relevant import RelevantFeatures
from vebi.utils.io import safe_file_name


@dataclass
class FeatureVisualisation:
    """The average visualisation of one relevant feature of one class."""

    class_id: int
    layer: str
    channel: int
    weight: float
    average_map: torch.Tensor  # (H, W) in [0, 1]
    average_image: torch.Tensor  # (C, H, W)
    dataset_indices: list[int]  # the top-N images it averages


def average_visualisations(
    model: nn.Module,
    relevant: RelevantFeatures,
    dataset: Dataset,
    cache: ActivationCache,
    top_n: int = 20,
    rules: Rules | None = None,
    device: torch.device | str | None = None,
) -> list[FeatureVisualisation]:
    """For each relevant feature f of each class c: heatmaps of f on the top-N training images
    of c ranked by x[f], each normalised to [0, 1], averaged (and the images averaged too)."""
    rules = rules or Rules()
    device = device or next(model.parameters()).device
    labels = cache.read("labels")
    indices = cache.read("indices")
    features = np.concatenate([chunk["features"] for chunk in cache.iter_chunks()])
    results = []
    for class_id in range(relevant.num_classes):
        rows = np.flatnonzero(labels == class_id)
        for feature in relevant.relevant(class_id):
            if len(rows) == 0:
                break
            order = rows[np.argsort(-features[rows, feature.feature_id], kind="stable")[:top_n]]
            chosen = indices[order].tolist()
            images = torch.stack([torch.as_tensor(dataset[i][0]) for i in chosen]).to(device)
            signal = backprop_feature(model, images, feature.layer, feature.channel, rules=rules)
            results.append(
                FeatureVisualisation(
                    class_id,
                    feature.layer,
                    feature.channel,
                    feature.weight,
                    signal_to_heatmap(signal).mean(0).cpu(),
                    images.mean(0).cpu(),
                    chosen,
                )
            )
    return results


def save_galleries(
    visualisations: list[FeatureVisualisation], relevant: RelevantFeatures, folder: str | Path
) -> list[Path]:
    """One PNG per class, ``<folder>/class_<c>_<name>.png``; returns their paths."""
    paths = []
    for class_id, name in enumerate(relevant.class_names):
        tiles = [v for v in visualisations if v.class_id == class_id]
        titles = [f"{v.layer}/{v.channel} w={v.weight:.2f}" for v in tiles]
        figure = gallery_figure(
            [v.average_map for v in tiles],
            [v.average_image for v in tiles],
            titles,
            f"class {name}: average visualisations of its {len(tiles)} relevant features",
        )
        paths.append(
            save_figure(figure, Path(folder) / f"class_{class_id}_{safe_file_name(name)}.png")
        )
    return paths


def interpret_and_log(
    model: nn.Module,
    relevant: RelevantFeatures,
    dataset: Dataset,
    cache_path: str | Path,
    folder: str | Path,
    loggers: list,
    top_n: int = 20,
) -> list[Path]:
    """Average visualisations of every relevant feature, a gallery PNG per class, logged to
    W&B as images (``interpretation/class_<c>``)."""
    cache = ActivationCache(cache_path, fingerprint="")
    visualisations = average_visualisations(model, relevant, dataset, cache, top_n)
    paths = save_galleries(visualisations, relevant, folder)
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(
                "interpretation/galleries",
                images=[str(p) for p in paths],
                caption=[f"class {name}" for name in relevant.class_names],
            )
    return paths
