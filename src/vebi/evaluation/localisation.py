"""Localisation metrics of heatmaps against ground-truth masks (docs/method.md, section 5).

Every metric is a :class:`~vebi.evaluation.metric_base.HeatmapMetric` (group
``localisation``, needs masks): ``update(heatmaps, masks)`` with heatmaps (N, H, W) in [0, 1]
and masks (N, H, W) with 1 (or True) on the relevant region; sums are all-reduced under DDP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vebi.evaluation.metric_base import Curve, HeatmapMetric, require


def _check(
    heatmaps: torch.Tensor, masks: torch.Tensor | None, metric: HeatmapMetric
) -> tuple[torch.Tensor, torch.Tensor]:
    masks = require(masks, "masks", metric)
    if heatmaps.ndim != 3 or heatmaps.shape != masks.shape:
        raise ValueError(
            f"heatmaps and masks must both be (N, H, W); got {tuple(heatmaps.shape)} "
            f"and {tuple(masks.shape)}"
        )
    if not torch.isfinite(heatmaps).all():
        raise ValueError("heatmaps contain NaN/Inf")
    return heatmaps.float(), masks.bool()


def _iou(binary: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-image IoU of two boolean (N, H, W) maps; 1 when both are empty."""
    intersection = (binary & masks).flatten(1).sum(1).float()
    union = (binary | masks).flatten(1).sum(1).float()
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


class _LocalisationMetric(HeatmapMetric):
    group = "localisation"
    needs_masks = True
    higher_is_better = True

    def update(
        self,
        heatmaps: torch.Tensor,
        masks: torch.Tensor | None = None,
        *,
        images: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self._update(*_check(heatmaps, masks, self))

    def _update(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> None:
        raise NotImplementedError


class ThresholdIoU(_LocalisationMetric):
    """IoU between ``heatmap >= t`` and the mask, for each threshold t; ``compute`` returns the
    curve (mean IoU over images per threshold) and its mean over the thresholds."""

    name = "iou_mean"

    def __init__(self, thresholds: torch.Tensor | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.register_buffer(
            "thresholds",
            torch.linspace(0.05, 0.95, 19)
            if thresholds is None
            else torch.as_tensor(thresholds, dtype=torch.float32),
        )
        self.add_state(
            "iou_sum", torch.zeros(len(self.thresholds), dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _update(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> None:
        for i, threshold in enumerate(self.thresholds):
            self.iou_sum[i] += _iou(heatmaps >= threshold, masks).double().sum()
        self.count += len(heatmaps)

    def compute(self) -> dict[str, torch.Tensor]:
        curve = self.iou_sum / self.count.clamp_min(1)
        return {"thresholds": self.thresholds, "curve": curve, "mean": curve.mean()}

    def result(self) -> dict[str, Any]:
        value = self.compute()
        return {
            self.name: float(value["mean"]),
            "iou_curve": value["curve"].tolist(),
            "iou_thresholds": value["thresholds"].tolist(),
        }

    def curve(self) -> Curve:
        return Curve(
            "iou", self.thresholds.tolist(), "threshold", "IoU of the thresholded map with the mask"
        )


class MeanThresholdIoU(_LocalisationMetric):
    """IoU between ``heatmap >= mean(heatmap)`` (each map's own mean) and the mask."""

    name = "iou_at_map_mean"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("iou_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _update(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> None:
        means = heatmaps.flatten(1).mean(1).view(-1, 1, 1)
        self.iou_sum += _iou(heatmaps >= means, masks).double().sum()
        self.count += len(heatmaps)

    def compute(self) -> torch.Tensor:
        return self.iou_sum / self.count.clamp_min(1)


class PointingGame(_LocalisationMetric):
    """Share of images whose heatmap maximum lies inside the mask (ties: the first maximum)."""

    name = "pointing_game"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _update(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> None:
        peaks = heatmaps.flatten(1).argmax(1)
        self.hits += masks.flatten(1).gather(1, peaks[:, None]).double().sum()
        self.count += len(heatmaps)

    def compute(self) -> torch.Tensor:
        return self.hits / self.count.clamp_min(1)


class RelevanceMass(_LocalisationMetric):
    """Relevance-mass accuracy: the share of each heatmap's total mass inside the mask,
    sum(h * m) / sum(h), averaged over images (an all-zero map scores 0)."""

    name = "relevance_mass"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("mass_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _update(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> None:
        total = heatmaps.flatten(1).sum(1).double()
        inside = (heatmaps * masks).flatten(1).sum(1).double()
        self.mass_sum += torch.where(
            total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total)
        ).sum()
        self.count += len(heatmaps)

    def compute(self) -> torch.Tensor:
        return self.mass_sum / self.count.clamp_min(1)
