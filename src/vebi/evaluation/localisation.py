"""Localisation metrics of heatmaps against ground-truth masks (docs/method.md, section 5).

Every metric is a :class:`~vebi.evaluation.metric_base.HeatmapMetric` (group
``localisation``, needs masks): ``update(heatmaps, masks)`` with heatmaps (N, H, W) in [0, 1]
and masks (N, H, W) with 1 (or True) on the relevant region; sums are all-reduced under DDP.

Edge cases, the same for every metric here:

* an image whose mask is empty has no object, so localisation is undefined for it: it is left
  out of the mean (as Quantus does) and counted; ``result()`` reports the count under
  ``images_without_mask`` (the same key and value for every localisation metric of a
  method), and the metric is NaN when no image has a mask;
* a constant map (all-zero or any other constant) carries no location: it selects nothing at
  its own mean (IoU 0) and has no maximum to point with (a miss in both pointing games); at
  fixed thresholds it selects the whole image where t <= its value (IoU = the mask's share of
  the image) and nothing above; its relevance mass is 0 when it is all-zero and the mask's
  share of the image otherwise (the share of its mass, as defined).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vebi.errors import VebiError
from vebi.evaluation.metric_base import Curve, HeatmapMetric, MeanOverImages, require

#: The ``result()`` key of the number of images left out because their mask is empty.
WITHOUT_MASK_KEY = "images_without_mask"


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
    """Per-image IoU |B & M| / |B | M| of boolean (N, H, W) maps; the masks are non-empty (the
    images without one are left out), so the union is too."""
    intersection = (binary & masks).flatten(1).sum(1).float()
    union = (binary | masks).flatten(1).sum(1).float()
    return intersection / union.clamp_min(1)


def _constant(heatmaps: torch.Tensor) -> torch.Tensor:
    """(N,) True where a map has one value everywhere (max == min, exactly)."""
    flat = heatmaps.flatten(1)
    return flat.amax(1) == flat.amin(1)


def disk(radius: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (2r + 1, 2r + 1) disk of the offsets (dy, dx) with dy^2 + dx^2 < r^2 (TorchRay's
    acceptance region) and always the centre, so that r = 0 is the pixel itself."""
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    squared = offsets[:, None] ** 2 + offsets[None, :] ** 2
    return squared < max(radius, 1) ** 2


def dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Boolean (N, H, W): the pixels at Euclidean distance < ``radius`` from the mask (and the
    mask itself), i.e. the mask dilated by :func:`disk` (a convolution with it, > 0)."""
    if radius == 0:
        return masks.bool()
    kernel = disk(radius, masks.device).float()[None, None]
    return F.conv2d(masks.float()[:, None], kernel, padding=radius)[:, 0] > 0.5


class _LocalisationMetric(MeanOverImages):
    """The shared part: images without a mask are left out and counted in ``without_mask``
    (module doc); the others add their per-image scores (:meth:`_scores`) to the mean
    (:class:`~vebi.evaluation.metric_base.MeanOverImages`), which is NaN when no image had a
    mask."""

    group = "localisation"
    needs_masks = True
    higher_is_better = True
    without_mask: torch.Tensor  # a state (add_state)

    def __init__(self, score_shape: tuple[int, ...] = (), **kwargs: Any) -> None:
        super().__init__(score_shape, **kwargs)
        self.add_state("without_mask", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        heatmaps: torch.Tensor,
        masks: torch.Tensor | None = None,
        *,
        images: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        model: nn.Module | None = None,
    ) -> None:
        heatmaps, masks = _check(heatmaps, masks, self)
        has_object = masks.flatten(1).any(1)
        self.without_mask += (~has_object).sum()
        if has_object.any():
            self._add_scores(self._scores(heatmaps[has_object], masks[has_object]))

    @abstractmethod
    def _scores(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Per-image scores (N, *score_shape) of maps whose masks are non-empty."""

    def result(self) -> dict[str, Any]:
        return {self.name: float(self.compute()), WITHOUT_MASK_KEY: int(self.without_mask)}


class ThresholdIoU(_LocalisationMetric):
    """IoU between ``heatmap >= t`` and the mask, for each threshold t; ``compute`` returns the
    curve (mean IoU over images per threshold) and its mean over the thresholds. A constant map
    c selects the whole image for t <= c and nothing above (module doc)."""

    name = "iou_mean"
    thresholds: torch.Tensor  # a buffer

    def __init__(self, thresholds: torch.Tensor | None = None, **kwargs: object) -> None:
        values = (
            torch.linspace(0.05, 0.95, 19)
            if thresholds is None
            else torch.as_tensor(thresholds, dtype=torch.float32)
        )
        if values.ndim != 1 or not len(values) or not bool(((values >= 0) & (values <= 1)).all()):
            raise VebiError(
                f"evaluation.thresholds must be a non-empty list of numbers in [0, 1] (maps are "
                f"scaled to [0, 1]), got {values.tolist()}"
            )
        super().__init__(score_shape=(len(values),), **kwargs)
        self.register_buffer("thresholds", values)

    def _scores(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return torch.stack([_iou(heatmaps >= t, masks) for t in self.thresholds], dim=1)

    def compute(self) -> dict[str, torch.Tensor]:
        curve = self._mean()
        return {"thresholds": self.thresholds, "curve": curve, "mean": curve.mean()}

    def result(self) -> dict[str, Any]:
        value = self.compute()
        return {
            self.name: float(value["mean"]),
            "iou_curve": value["curve"].tolist(),
            "iou_thresholds": value["thresholds"].tolist(),
            WITHOUT_MASK_KEY: int(self.without_mask),
        }

    def curve(self) -> Curve:
        return Curve(
            "iou", self.thresholds.tolist(), "threshold", "IoU of the thresholded map with the mask"
        )


class MeanThresholdIoU(_LocalisationMetric):
    """IoU between ``heatmap >= mean(heatmap)`` (each map's own mean) and the mask; a constant
    map selects nothing (IoU 0), rather than the whole image."""

    name = "iou_at_map_mean"

    def _scores(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        means = heatmaps.flatten(1).mean(1).view(-1, 1, 1)
        selected = (heatmaps >= means) & ~_constant(heatmaps).view(-1, 1, 1)
        return _iou(selected, masks)


class PointingGame(_LocalisationMetric):
    """Pointing game (Zhang et al., ECCV 2016; TorchRay's benchmark): a hit when a maximum of
    the map lies at Euclidean distance < ``tolerance`` pixels from the mask (TorchRay's
    ``(du^2 + dv^2) < tolerance^2``; ``tolerance=0``: inside the mask itself). Ties: every
    pixel equal to the map's maximum counts (a hit if any of them is within the tolerance, as
    Quantus; TorchRay takes the first arg-max). A constant map has no maximum location: a miss.

    ``tolerance`` is in pixels of the map, which is at the model's input resolution; the
    literature's 15 px are at the original resolution of ~224-500 px images (PASCAL VOC, COCO),
    so at a smaller input size the same 15 px accept a larger share of the image.
    """

    name = "pointing_game"

    def __init__(self, tolerance: int = 15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(tolerance) != tolerance or tolerance < 0:
            raise VebiError(f"tolerance must be an integer >= 0, got {tolerance!r}")
        self.tolerance = int(tolerance)

    def _scores(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        flat = heatmaps.flatten(1)
        peaks = flat == flat.amax(1, keepdim=True)
        near = dilate(masks, self.tolerance).flatten(1)
        return (peaks & near).any(1) & ~_constant(heatmaps)


class StrictPointingGame(_LocalisationMetric):
    """The strict pointing game: a hit when the first arg-max of the map in raster order lies
    inside the mask itself (no tolerance, one maximum); a constant map is a miss."""

    name = "pointing_game_strict"

    def _scores(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        peaks = heatmaps.flatten(1).argmax(1)  # the first maximum (torch.argmax)
        inside = masks.flatten(1).gather(1, peaks[:, None])[:, 0]
        return inside & ~_constant(heatmaps)


class RelevanceMass(_LocalisationMetric):
    """Relevance-mass accuracy (Arras et al., 2022; Quantus' ``RelevanceMassAccuracy``): the
    share of each heatmap's total mass inside the mask, sum(h * m) / sum(h), averaged over
    images (an all-zero map scores 0; a positive constant map the mask's share of the image)."""

    name = "relevance_mass"

    def _scores(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        maps = heatmaps.double().flatten(1)
        total, inside = maps.sum(1), (maps * masks.flatten(1)).sum(1)
        return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))
