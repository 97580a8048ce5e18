"""Faithfulness by deletion and insertion (Petsiuk et al., RISE), and the artefact score.

Pixels are ranked by the heatmap, highest first: ``argsort(descending=True, stable=True)`` of
the flattened map, so equal values keep raster order (row by row, left to right; a constant
map is swept from the top row down). RISE leaves ties to NumPy's unstable sort. After step i
of S the first ``round(i P / S)`` of the P pixels (Python's round, half to even) are

* deletion: replaced by the baseline image (the class probability should fall fast: lower
  area is better);
* insertion: copied from the image into the baseline (it should rise fast: higher is better).

The curve is the softmax probability p_i of the explained class after each step i = 0..S,
including the unperturbed i = 0 (the image for deletion, the baseline for insertion); its area
is the trapezoid rule over the removed/revealed fraction i / S in [0, 1],
(sum_i p_i - p_0 / 2 - p_S / 2) / S, as RISE's ``auc``.

The two ends of every path, p_0 and p_S, are the model's probabilities on the images and on
their baseline, the same for every method scored on a batch: an :class:`EndpointCache` that
:class:`~vebi.evaluation.heatmaps.HeatmapEvaluation` passes to the metrics keeps them (3
forwards per image instead of 4 per image and method); without one they are computed anew.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision.transforms.functional as TF
from torch import nn

from vebi.errors import VebiError
from vebi.evaluation.data import forward_batch_size
from vebi.evaluation.metric_base import Curve, MeanOverImages, require
from vebi.explain.heatmaps import checkerboard_score, stride_periods
from vebi.models.hooks import inference_mode

BASELINES = ("zero", "blur", "mean")


def baseline_images(images: torch.Tensor, kind: str) -> torch.Tensor:
    """The image pixels are replaced by (deletion) or revealed on (insertion): ``zero`` (black),
    ``blur`` (Gaussian, std = side / 8) or ``mean`` (each image's mean colour)."""
    if kind == "zero":
        return torch.zeros_like(images)
    if kind == "mean":
        return images.mean(dim=(-2, -1), keepdim=True).expand_as(images).clone()
    if kind == "blur":
        sigma = max(images.shape[-2:]) / 8
        size = 2 * int(2 * sigma) + 1
        return TF.gaussian_blur(images, [size, size], [sigma, sigma])
    raise VebiError(f"unknown baseline {kind!r}; use one of {BASELINES}")


def perturbation_curves(
    model: nn.Module,
    images: torch.Tensor,
    heatmaps: torch.Tensor,
    classes: torch.Tensor,
    mode: str,
    steps: int = 20,
    baseline: str = "zero",
    batch_size: int | None = None,
    endpoints: EndpointCache | None = None,
) -> torch.Tensor:
    """(N, steps + 1) probabilities of ``classes`` along the deletion or insertion path.

    ``batch_size`` perturbed images go through the model at once; by default as many as
    :func:`~vebi.evaluation.data.forward_batch_size` gives on the model's device (at least one
    image's whole path). ``endpoints``: the probabilities at the ends of the paths shared with
    the other methods scored on these images (:class:`EndpointCache`); None: computed here."""
    if mode not in ("deletion", "insertion"):
        raise VebiError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1:
        raise VebiError(f"steps must be >= 1, got {steps}")
    if heatmaps.shape != (images.shape[0], *images.shape[-2:]):
        raise VebiError(
            f"heatmaps {tuple(heatmaps.shape)} do not match images {tuple(images.shape)}"
        )
    count, pixels = len(images), heatmaps[0].numel()
    if batch_size is None:
        batch_size = forward_batch_size(images[0].numel(), images.device)
    order = heatmaps.flatten(1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(pixels, device=order.device).expand_as(order))
    rank = rank.view(count, 1, *images.shape[-2:])
    reference = baseline_images(images, baseline)
    endpoints = EndpointCache() if endpoints is None else endpoints
    probabilities = {
        "image": endpoints.probabilities(model, images, "image", images, batch_size),
        "baseline": endpoints.probabilities(model, images, baseline, reference, batch_size),
    }
    first_end, last_end = ("image", "baseline") if mode == "deletion" else ("baseline", "image")
    start, end = (images, reference) if mode == "deletion" else (reference, images)
    curves = torch.empty(count, steps + 1, dtype=torch.float64)
    picked_rows = torch.arange(count, device=classes.device)
    curves[:, 0] = probabilities[first_end][picked_rows, classes].double().cpu()
    curves[:, steps] = probabilities[last_end][picked_rows, classes].double().cpu()
    # the steps in between (the ends are the images and the baseline themselves)
    limits = [round(i * pixels / steps) for i in range(1, steps)]
    per_chunk = max(1, batch_size // max(1, len(limits)))
    with inference_mode(model):
        for first in range(0, count if limits else 0, per_chunk):
            rows = slice(first, first + per_chunk)
            path = torch.stack(
                [torch.where(rank[rows] < limit, end[rows], start[rows]) for limit in limits],
                dim=1,
            )  # (n, steps - 1, C, H, W)
            chosen = classes[rows].repeat_interleave(len(limits))
            inner = model(path.flatten(0, 1)).softmax(dim=1)[torch.arange(len(chosen)), chosen]
            curves[rows, 1:steps] = inner.view(-1, len(limits)).double().cpu()
    return curves


def class_probabilities(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, classes) softmax of ``model`` on ``inputs``, ``batch_size`` images at a time."""
    with inference_mode(model):
        return torch.cat(
            [
                model(inputs[first : first + batch_size]).softmax(dim=1)
                for first in range(0, len(inputs), batch_size)
            ]
        )


class EndpointCache:
    """The two ends of the deletion and insertion paths of one batch of images: the softmax of
    the model on the images (``kind="image"``) and on each of their baselines (``kind`` the
    baseline's name), computed once and shared by every method and metric scored on them.

    They hold while the images and the model's weights stay as they are: the owner clears the
    cache when either changes (:class:`~vebi.evaluation.heatmaps.HeatmapEvaluation` makes one
    per evaluation and clears it at every batch). Given other images or another model (other
    objects, compared with ``is``: the cache holds them) it starts again by itself."""

    def __init__(self) -> None:
        self._images: torch.Tensor | None = None
        self._model: nn.Module | None = None
        self._known: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        """Forget the images, the model and their probabilities."""
        self._images, self._model, self._known = None, None, {}

    def probabilities(
        self,
        model: nn.Module,
        images: torch.Tensor,
        kind: str,
        inputs: torch.Tensor,
        batch_size: int,
    ) -> torch.Tensor:
        """(N, classes) softmax of ``model`` on ``inputs``: the ``images`` (``kind="image"``)
        or their baseline ``kind``, computed on the first request for this kind."""
        if images is not self._images or model is not self._model:
            self.clear()
            self._images, self._model = images, model
        if kind not in self._known:
            self._known[kind] = class_probabilities(model, inputs, batch_size)
        return self._known[kind]


def curve_area(curves: torch.Tensor) -> torch.Tensor:
    """Trapezoid area of curves sampled at S + 1 equal steps over [0, 1] (last dimension),
    ends included: (sum_i p_i - p_0 / 2 - p_S / 2) / S (RISE's ``auc``)."""
    steps = curves.shape[-1] - 1
    return (curves.sum(dim=-1) - (curves[..., 0] + curves[..., -1]) / 2) / steps


class _PerturbationArea(MeanOverImages):
    """Deletion or insertion: ``update`` runs the perturbation path of each map through the
    model (:func:`perturbation_curves`) and adds the curves to their mean over images
    (:class:`~vebi.evaluation.metric_base.MeanOverImages`, all zeros before any image);
    ``compute`` gives the mean curve and its area (= the mean of the per-image areas, the area
    being linear in the curve)."""

    group = "faithfulness"
    needs_model = True
    uses_endpoints = True
    nan_when_empty = False
    mode: str

    def __init__(self, steps: int = 20, baseline: str = "zero", **kwargs: Any) -> None:
        super().__init__((steps + 1,), **kwargs)
        if baseline not in BASELINES:
            raise VebiError(f"unknown baseline {baseline!r}; use one of {BASELINES}")
        self.steps = steps
        self.baseline = baseline

    def update(
        self,
        heatmaps: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        *,
        images: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        model: nn.Module | None = None,
        curves: torch.Tensor | None = None,
        endpoints: EndpointCache | None = None,
    ) -> None:
        """Accumulate the curves of ``heatmaps`` (run through ``model``, the ends of the paths
        from ``endpoints`` when given), or given ``curves`` (N, steps + 1) from
        :func:`perturbation_curves`."""
        if curves is None:
            curves = perturbation_curves(
                require(model, "model", self),
                require(images, "images", self),
                require(heatmaps, "heatmaps", self),
                require(targets, "targets", self),
                self.mode,
                self.steps,
                self.baseline,
                endpoints=endpoints,
            )
        if curves.ndim != 2 or curves.shape[1] != self.steps + 1:
            raise ValueError(f"curves must be (N, {self.steps + 1}); got {tuple(curves.shape)}")
        self._add_scores(curves)

    def compute(self) -> dict[str, torch.Tensor]:
        curve = self._mean()
        return {"curve": curve, "auc": curve_area(curve)}

    def result(self) -> dict[str, Any]:
        value = self.compute()
        return {self.name: float(value["auc"]), f"{self.mode}_curve": value["curve"].tolist()}

    def curve(self) -> Curve:
        x = torch.linspace(0, 1, self.steps + 1).tolist()
        done, better = ("removed", "lower") if self.mode == "deletion" else ("revealed", "higher")
        return Curve(
            self.mode, x, f"fraction of pixels {done}", f"{self.mode} ({better} area is better)"
        )


class DeletionArea(_PerturbationArea):
    """Area under the deletion curve: lower is better (the evidence goes first)."""

    name = "deletion_auc"
    mode = "deletion"
    higher_is_better = False


class InsertionArea(_PerturbationArea):
    """Area under the insertion curve: higher is better."""

    name = "insertion_auc"
    mode = "insertion"
    higher_is_better = True


class CheckerboardScore(MeanOverImages):
    """Mean :func:`~vebi.explain.heatmaps.checkerboard_score` of the maps: the share of their
    spectral energy at the stride grid, 0 before any map. Lower is better (no grid artefacts).
    ``periods=None`` takes the model's first stride period
    (:func:`~vebi.explain.heatmaps.stride_periods`), looked up at each ``update``."""

    name = "artefact_score"
    group = "artefacts"
    higher_is_better = False
    nan_when_empty = False

    def __init__(self, periods: list[int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.periods = list(periods) if periods else None

    def periods_for(self, model: nn.Module | None) -> list[int]:
        """The periods scored: the given ones, else the model's first stride period (none if
        it has no strided layer)."""
        if self.periods is not None:
            return self.periods
        return stride_periods(require(model, "model", self))[:1]

    def skip_reason(self, model: nn.Module, has_masks: bool) -> str | None:
        if not self.periods_for(model):
            return "artefact score skipped: the model has no strided layer"
        return None

    def update(
        self,
        heatmaps: torch.Tensor,
        masks: torch.Tensor | None = None,
        *,
        images: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self._add_scores(checkerboard_score(heatmaps, self.periods_for(model)))
