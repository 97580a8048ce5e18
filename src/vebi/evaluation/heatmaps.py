"""Scoring heatmap methods on the same test images: localisation, faithfulness, artefacts."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vebi.errors import VebiError
from vebi.evaluation.methods import HeatmapMethod
from vebi.evaluation.metric_base import HeatmapMetric


@dataclass
class EvaluationImages:
    """Test images (N, C, H, W) in [0, 1], labels (N,) and, where the data has them, masks
    (N, H, W) with 1 on the class-deciding region."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> EvaluationImages:
        return EvaluationImages(
            self.images[indices],
            self.labels[indices],
            None if self.masks is None else self.masks[indices],
        )


def balanced_subset(labels: torch.Tensor, count: int | None, seed: int) -> torch.Tensor:
    """Sorted indices of ``count`` images (all when None), as equal a share of each class as
    the data allows, each class's drawn in a seeded random order."""
    if count is None or count >= len(labels):
        return torch.arange(len(labels))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    # position of each image within its class in the random order -> round-robin over classes
    within = torch.zeros(len(labels), dtype=torch.long)
    for c in labels.unique():
        members = order[labels[order] == c]
        within[members] = torch.arange(len(members))
    ranked = order[torch.argsort(within[order], stable=True)]
    return ranked[: int(count)].sort().values


def load_test_images(
    dataset: Dataset, limit: int | None, seed: int, batch_size: int = 256
) -> EvaluationImages:
    """The test split in memory; with ``limit`` a seeded random subset of that many images."""
    if len(dataset) == 0:
        raise VebiError("the test split is empty: nothing to evaluate (check the data set)")
    indices = torch.arange(len(dataset))
    if limit is not None and limit < len(dataset):
        if limit < 1:
            raise VebiError(f"the number of evaluation images must be >= 1, got {limit}")
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(dataset), generator=generator)[:limit].sort().values
    subset = torch.utils.data.Subset(dataset, indices.tolist())
    images, labels, masks = [], [], []
    for batch in DataLoader(subset, batch_size=batch_size, shuffle=False):
        images.append(batch[0].float())
        labels.append(torch.as_tensor(batch[1]).long())
        if len(batch) > 2:
            masks.append(batch[2].reshape(len(batch[0]), *batch[0].shape[-2:]).bool())
    return EvaluationImages(
        torch.cat(images), torch.cat(labels), torch.cat(masks) if masks else None
    )


def metric_info(metrics: Mapping[str, HeatmapMetric]) -> dict[str, Any]:
    """What reporting needs to know of the metrics, as plain data stored with the results:
    the direction of each headline, the metrics of each group, and the curves to plot."""
    groups: dict[str, list[str]] = {}
    for metric in metrics.values():
        groups.setdefault(metric.group, []).append(metric.name)
    curves = {}
    for metric in metrics.values():
        curve = metric.curve()
        if curve is not None:
            curves[curve.key] = {"x": list(curve.x), "x_label": curve.x_label, "title": curve.title}
    return {
        "directions": {m.name: bool(m.higher_is_better) for m in metrics.values()},
        "groups": groups,
        "curves": curves,
    }


class HeatmapEvaluation:
    """Run every method on the same images and score its maps with every metric.

    ``metrics``: name -> :class:`~vebi.evaluation.metric_base.HeatmapMetric` (each method is
    scored by a fresh copy of each); those that cannot score this model or data (no masks, no
    strided layer) are left out with a note (:meth:`applicable`). Also the seconds per image
    of each method.
    """

    def __init__(self, metrics: Mapping[str, HeatmapMetric], batch_size: int = 64) -> None:
        for name, metric in metrics.items():
            if not isinstance(metric, HeatmapMetric):
                raise VebiError(
                    f"evaluation.metrics.{name} is a {type(metric).__name__}, not a vebi "
                    "HeatmapMetric (vebi.evaluation.metric_base)"
                )
        self.metrics = dict(metrics)
        self.batch_size = batch_size

    def applicable(
        self, model: nn.Module, has_masks: bool
    ) -> tuple[dict[str, HeatmapMetric], list[str]]:
        """(the metrics that can score ``model`` on this data, notes on those that cannot)."""
        chosen, notes = {}, []
        for key, metric in self.metrics.items():
            reason = metric.skip_reason(model, has_masks)
            if reason is None:
                chosen[key] = metric
            elif reason not in notes:
                notes.append(reason)
        return chosen, notes

    def __call__(
        self,
        model: nn.Module,
        methods: Mapping[str, HeatmapMethod],
        data: EvaluationImages,
        classes: torch.Tensor,
        keep: torch.Tensor | None = None,
        progress: bool = True,
    ) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
        """(results per method, maps of the images ``keep`` per method for the panels)."""
        results, kept = {}, {}
        device = next(model.parameters()).device
        prototypes, _ = self.applicable(model, data.masks is not None)
        for name, method in tqdm(methods.items(), desc="heatmap methods", disable=not progress):
            metrics = {key: metric.clone().to(device) for key, metric in prototypes.items()}
            for metric in metrics.values():
                metric.reset()
            seconds, pieces = 0.0, []
            for start in range(0, len(data), self.batch_size):
                rows = slice(start, start + self.batch_size)
                images, targets = data.images[rows].to(device), classes[rows].to(device)
                masks = None if data.masks is None else data.masks[rows].to(device)
                began = time.perf_counter()
                maps = method(images, targets)
                seconds += time.perf_counter() - began
                self._check(name, maps, images)
                pieces.append(maps.cpu())
                for metric in metrics.values():
                    metric.update(maps, masks, images=images, targets=targets, model=model)
            row: dict[str, Any] = {}
            for metric in metrics.values():
                row |= metric.result()
            results[name] = row | {"seconds_per_image": seconds / len(data)}
            if keep is not None:
                kept[name] = torch.cat(pieces)[keep]
        return results, kept

    @staticmethod
    def _check(name: str, maps: torch.Tensor, images: torch.Tensor) -> None:
        expected = (len(images), *images.shape[-2:])
        if tuple(maps.shape) != expected:
            raise VebiError(f"method {name} returned maps {tuple(maps.shape)}, expected {expected}")
        if not torch.isfinite(maps).all() or maps.min() < 0 or maps.max() > 1:
            raise VebiError(f"method {name} returned maps outside [0, 1] or with NaN/Inf")
