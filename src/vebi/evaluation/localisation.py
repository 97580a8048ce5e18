"""Localisation metrics of heatmaps against ground-truth masks (docs/method.md, section 5).

Every metric takes ``update(heatmaps, masks)`` with heatmaps (N, H, W) in [0, 1] and masks
(N, H, W) with 1 (or True) on the relevant region, accumulates sums (all-reduced under DDP) and
says whether higher is better, like Quantus's metrics do.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def _check(heatmaps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


class ThresholdIoU(Metric):
    """IoU between ``heatmap >= t`` and the mask, for each threshold t; ``compute`` returns the
    curve (mean IoU over images per threshold) and its mean over the thresholds."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, thresholds: torch.Tensor | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.register_buffer(
            "thresholds", thresholds if thresholds is not None else torch.linspace(0.05, 0.95, 19)
        )
        self.add_state(
            "iou_sum", torch.zeros(len(self.thresholds), dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> None:
        heatmaps, masks = _check(heatmaps, masks)
        for i, threshold in enumerate(self.thresholds):
            self.iou_sum[i] += _iou(heatmaps >= threshold, masks).double().sum()
        self.count += len(heatmaps)

    def compute(self) -> dict[str, torch.Tensor]:
        curve = self.iou_sum / self.count.clamp_min(1)
        return {"thresholds": self.thresholds, "curve": curve, "mean": curve.mean()}


class MeanThresholdIoU(Metric):
    """IoU between ``heatmap >= mean(heatmap)`` (each map's own mean) and the mask."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("iou_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> None:
        heatmaps, masks = _check(heatmaps, masks)
        means = heatmaps.flatten(1).mean(1).view(-1, 1, 1)
        self.iou_sum += _iou(heatmaps >= means, masks).double().sum()
        self.count += len(heatmaps)

    def compute(self) -> torch.Tensor:
        return self.iou_sum / self.count.clamp_min(1)


class PointingGame(Metric):
    """Share of images whose heatmap maximum lies inside the mask (ties: the first maximum)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> None:
        heatmaps, masks = _check(heatmaps, masks)
        peaks = heatmaps.flatten(1).argmax(1)
        self.hits += masks.flatten(1).gather(1, peaks[:, None]).double().sum()
        self.count += len(heatmaps)

    def compute(self) -> torch.Tensor:
        return self.hits / self.count.clamp_min(1)


class RelevanceMass(Metric):
    """Relevance-mass accuracy: the share of each heatmap's total mass inside the mask,
    sum(h * m) / sum(h), averaged over images (an all-zero map scores 0)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("mass_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> None:
        heatmaps, masks = _check(heatmaps, masks)
        total = heatmaps.flatten(1).sum(1).double()
        inside = (heatmaps * masks).flatten(1).sum(1).double()
        self.mass_sum += torch.where(
            total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total)
        ).sum()
        self.count += len(heatmaps)

    def compute(self) -> torch.Tensor:
        return self.mass_sum / self.count.clamp_min(1)
