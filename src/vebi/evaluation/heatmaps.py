"""Scoring heatmap methods on the same test images: localisation, faithfulness, artefacts."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vebi.errors import VebiError
from vebi.evaluation.faithfulness import (
    CheckerboardScore,
    DeletionArea,
    InsertionArea,
    perturbation_curves,
)
from vebi.evaluation.localisation import MeanThresholdIoU, PointingGame, RelevanceMass, ThresholdIoU
from vebi.evaluation.methods import HeatmapMethod

#: Reported metric name -> higher is better (from the metric classes).
DIRECTIONS: dict[str, bool] = {
    "iou_mean": ThresholdIoU.higher_is_better,
    "iou_at_map_mean": MeanThresholdIoU.higher_is_better,
    "pointing_game": PointingGame.higher_is_better,
    "relevance_mass": RelevanceMass.higher_is_better,
    "deletion_auc": DeletionArea.higher_is_better,
    "insertion_auc": InsertionArea.higher_is_better,
    "artefact_score": CheckerboardScore.higher_is_better,
}


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


class HeatmapEvaluation:
    """Run every method on the same images and score its maps.

    Localisation (only with masks): IoU over ``thresholds`` (curve and mean), IoU at each
    map's mean, pointing game, relevance mass. Faithfulness: deletion / insertion curves and
    areas (``steps``, baselines). Artefacts: checkerboard score at ``periods`` (skipped when
    the model has no strides). Also the seconds per image of each method.
    """

    def __init__(
        self,
        thresholds: Sequence[float] | None = None,
        steps: int = 20,
        deletion_baseline: str = "zero",
        insertion_baseline: str = "blur",
        periods: Sequence[int] | None = None,
        batch_size: int = 64,
        evaluators: Sequence[str] = ("localisation", "faithfulness", "artefacts"),
    ) -> None:
        unknown = set(evaluators) - {"localisation", "faithfulness", "artefacts"}
        if unknown:
            raise VebiError(f"unknown heatmap evaluators {sorted(unknown)}")
        self.thresholds = torch.tensor(
            thresholds if thresholds is not None else torch.linspace(0.05, 0.95, 19).tolist()
        )
        self.steps = steps
        self.deletion_baseline = deletion_baseline
        self.insertion_baseline = insertion_baseline
        self.periods = list(periods or [])
        self.batch_size = batch_size
        self.evaluators = tuple(evaluators)

    def _metrics(self, has_masks: bool) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if "localisation" in self.evaluators and has_masks:
            metrics |= {
                "iou": ThresholdIoU(self.thresholds),
                "iou_at_map_mean": MeanThresholdIoU(),
                "pointing_game": PointingGame(),
                "relevance_mass": RelevanceMass(),
            }
        if "faithfulness" in self.evaluators:
            metrics |= {
                "deletion": DeletionArea(self.steps),
                "insertion": InsertionArea(self.steps),
            }
        if "artefacts" in self.evaluators and self.periods:
            metrics["artefact_score"] = CheckerboardScore(self.periods)
        return metrics

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
        for name, method in tqdm(methods.items(), desc="heatmap methods", disable=not progress):
            metrics = {
                key: metric.to(device)
                for key, metric in self._metrics(data.masks is not None).items()
            }
            seconds, pieces = 0.0, []
            for start in range(0, len(data), self.batch_size):
                rows = slice(start, start + self.batch_size)
                images, targets = data.images[rows].to(device), classes[rows].to(device)
                began = time.perf_counter()
                maps = method(images, targets)
                seconds += time.perf_counter() - began
                self._check(name, maps, images)
                pieces.append(maps.cpu())
                self._update(
                    metrics,
                    model,
                    images,
                    maps,
                    targets,
                    None if data.masks is None else data.masks[rows].to(device),
                )
            results[name] = self._compute(metrics) | {"seconds_per_image": seconds / len(data)}
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

    def _update(
        self,
        metrics: dict[str, Any],
        model: nn.Module,
        images: torch.Tensor,
        maps: torch.Tensor,
        targets: torch.Tensor,
        masks: torch.Tensor | None,
    ) -> None:
        for key, metric in metrics.items():
            if key in ("deletion", "insertion"):
                baseline = self.deletion_baseline if key == "deletion" else self.insertion_baseline
                metric.update(
                    perturbation_curves(model, images, maps, targets, key, self.steps, baseline)
                )
            elif key == "artefact_score":
                metric.update(maps)
            else:
                metric.update(maps, masks)

    @staticmethod
    def _compute(metrics: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, metric in metrics.items():
            value = metric.compute()
            if key == "iou":
                out["iou_mean"] = float(value["mean"])
                out["iou_curve"] = value["curve"].tolist()
                out["iou_thresholds"] = value["thresholds"].tolist()
            elif key in ("deletion", "insertion"):
                out[f"{key}_auc"] = float(value["auc"])
                out[f"{key}_curve"] = value["curve"].tolist()
            else:
                out[key] = float(value)
        return out
