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
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torchvision.transforms.functional as TF
from torch import nn

from vebi.errors import VebiError
from vebi.evaluation.data import forward_batch_size
from vebi.evaluation.metric_base import Curve, HeatmapMetric, require
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
) -> torch.Tensor:
    """(N, steps + 1) probabilities of ``classes`` along the deletion or insertion path.

    ``batch_size`` perturbed images go through the model at once; by default as many as
    :func:`~vebi.evaluation.data.forward_batch_size` gives on the model's device (at least one
    image's whole path)."""
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
    probabilities = {
        "image": _endpoint_probabilities(model, images, "image", images, batch_size),
        "baseline": _endpoint_probabilities(model, images, baseline, reference, batch_size),
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


#: The class probabilities of the last batch of images and of its baselines (see
#: :func:`_endpoint_probabilities`).
_ENDPOINTS: dict[str, Any] = {}


def _weights_version(model: nn.Module) -> int:
    return sum(p._version for p in model.parameters())


def _endpoint_probabilities(
    model: nn.Module, images: torch.Tensor, kind: str, inputs: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """(N, classes) softmax of ``model`` on ``inputs``: the images (``kind="image"``) or one
    of their baselines, the two ends of every deletion and insertion path. Every method scored
    on a batch shares them (3 forwards per image instead of 4 per image and method): they are
    kept for the last ``images`` tensor seen, while it is alive and unchanged and the model
    and its weights are the same."""
    key = (id(model), _weights_version(model), images._version, images.shape, images.device)
    alive = _ENDPOINTS.get("images")
    if alive is None or alive() is not images or _ENDPOINTS.get("key") != key:
        _ENDPOINTS.clear()
        _ENDPOINTS.update(images=weakref.ref(images), key=key, probabilities={})
    known = _ENDPOINTS["probabilities"]
    if kind not in known:
        with inference_mode(model):
            known[kind] = torch.cat(
                [
                    model(inputs[first : first + batch_size]).softmax(dim=1)
                    for first in range(0, len(inputs), batch_size)
                ]
            )
    return known[kind]


def curve_area(curves: torch.Tensor) -> torch.Tensor:
    """Trapezoid area of curves sampled at S + 1 equal steps over [0, 1] (last dimension),
    ends included: (sum_i p_i - p_0 / 2 - p_S / 2) / S (RISE's ``auc``)."""
    steps = curves.shape[-1] - 1
    return (curves.sum(dim=-1) - (curves[..., 0] + curves[..., -1]) / 2) / steps


class _PerturbationArea(HeatmapMetric):
    """Deletion or insertion: ``update`` runs the perturbation path of each map through the
    model (:func:`perturbation_curves`) and accumulates the curves; ``compute`` gives the mean
    curve and its area (= the mean of the per-image areas)."""

    group = "faithfulness"
    needs_model = True
    mode: str

    def __init__(self, steps: int = 20, baseline: str = "zero", **kwargs: object) -> None:
        super().__init__(**kwargs)
        if baseline not in BASELINES:
            raise VebiError(f"unknown baseline {baseline!r}; use one of {BASELINES}")
        self.steps = steps
        self.baseline = baseline
        self.add_state(
            "curve_sum", torch.zeros(steps + 1, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        heatmaps: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        *,
        images: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        model: nn.Module | None = None,
        curves: torch.Tensor | None = None,
    ) -> None:
        """Accumulate the curves of ``heatmaps`` (run through ``model``), or given ``curves``
        (N, steps + 1) from :func:`perturbation_curves`."""
        if curves is None:
            curves = perturbation_curves(
                require(model, "model", self),
                require(images, "images", self),
                require(heatmaps, "heatmaps", self),
                require(targets, "targets", self),
                self.mode,
                self.steps,
                self.baseline,
            )
        if curves.ndim != 2 or curves.shape[1] != self.steps + 1:
            raise ValueError(f"curves must be (N, {self.steps + 1}); got {tuple(curves.shape)}")
        self.curve_sum += curves.double().sum(dim=0).to(self.curve_sum.device)
        self.count += len(curves)

    def compute(self) -> dict[str, torch.Tensor]:
        curve = self.curve_sum / self.count.clamp_min(1)
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


class CheckerboardScore(HeatmapMetric):
    """Mean :func:`~vebi.explain.heatmaps.checkerboard_score` of the maps: the share of their
    spectral energy at the stride grid. Lower is better (no grid artefacts). ``periods=None``
    takes the model's first stride period (:func:`~vebi.explain.heatmaps.stride_periods`)."""

    name = "artefact_score"
    group = "artefacts"
    higher_is_better = False

    def __init__(self, periods: list[int] | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.periods = list(periods) if periods else None
        self.add_state("score_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def skip_reason(self, model: nn.Module, has_masks: bool) -> str | None:
        if self.periods is None:
            self.periods = stride_periods(model)[:1]
        if not self.periods:
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
        if self.periods is None:
            self.periods = stride_periods(require(model, "model", self))[:1]
        self.score_sum += checkerboard_score(heatmaps, self.periods).double().sum()
        self.count += len(heatmaps)

    def compute(self) -> torch.Tensor:
        return self.score_sum / self.count.clamp_min(1)
