"""Scoring heatmap methods on the same test images: localisation, faithfulness, artefacts."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from vebi.errors import VebiError
from vebi.evaluation.data import EvaluationSet
from vebi.evaluation.faithfulness import EndpointCache
from vebi.evaluation.methods import HeatmapMethod
from vebi.evaluation.metric_base import HeatmapMetric, check_metric
from vebi.models.hooks import eval_mode
from vebi.utils.distributed import world


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


def explained_classes(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, target: str
) -> torch.Tensor:
    """The classes the maps explain: the labels, or the model's predictions."""
    if target == "label":
        return labels
    if target != "predicted":
        raise VebiError(f"target must be 'label' or 'predicted', got {target!r}")
    with torch.no_grad(), eval_mode(model):
        return model(images).argmax(1)


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
    of each method. The metrics that ``uses_endpoints`` (deletion, insertion) share the ends of
    their perturbation paths through one :class:`~vebi.evaluation.faithfulness.EndpointCache`
    per evaluation, cleared at every batch.
    """

    def __init__(self, metrics: Mapping[str, HeatmapMetric], batch_size: int = 64) -> None:
        self.metrics = {
            name: check_metric(metric, f"evaluation.metrics.{name}")
            for name, metric in metrics.items()
        }
        self.batch_size = batch_size
        #: the peers that failed in the last call, name -> reason (their rows are left out)
        self.failed: dict[str, str] = {}

    def applicable(
        self, model: nn.Module, has_masks: bool
    ) -> tuple[dict[str, HeatmapMetric], list[str]]:
        """(the metrics that can score ``model`` on this data, notes on those that cannot;
        one note for a whole group skipped for one reason, e.g. localisation without masks)."""
        chosen, reasons = {}, {}
        for key, metric in self.metrics.items():
            reason = metric.skip_reason(model, has_masks)
            if reason is None:
                chosen[key] = metric
            else:
                reasons[key] = reason
        notes: list[str] = []
        for group in dict.fromkeys(m.group for m in self.metrics.values()):
            members = [k for k, m in self.metrics.items() if m.group == group]
            why = {reasons.get(k, "").partition(" skipped: ")[2] for k in members}
            if len(members) > 1 and all(k in reasons for k in members) and len(why) == 1:
                notes.append(f"{group} skipped: {why.pop()}")
            else:
                notes += [reasons[k] for k in members if k in reasons and reasons[k] not in notes]
        return chosen, notes

    def __call__(
        self,
        model: nn.Module,
        methods: Mapping[str, HeatmapMethod],
        data: EvaluationSet,
        target: str = "label",
        progress: bool = True,
    ) -> dict[str, dict[str, Any]]:
        """Results per method. Each batch of ``data`` is read once and explained by every
        method; the explained class is the label (``target="label"``) or the model's
        prediction. Under torch.distributed each process scores every world-size-th image
        and the metrics' sums are all-reduced (``seconds_per_image`` is this process's)."""
        device = next(model.parameters()).device
        prototypes, _ = self.applicable(model, data.has_masks)
        rank, size = world()
        shard = data.shard(rank, size)
        metrics = {
            name: {
                key: cast(HeatmapMetric, metric.clone()).to(device)
                for key, metric in prototypes.items()
            }
            for name in methods
        }
        seconds = dict.fromkeys(methods, 0.0)
        endpoints = EndpointCache()
        self.failed = {}
        bar = tqdm(total=len(shard) * len(methods), desc="heatmaps", disable=not progress)
        for batch in shard.batches(self.batch_size):
            endpoints.clear()  # other images
            images = batch.images.to(device)
            masks = None if batch.masks is None else batch.masks.to(device)
            targets = explained_classes(model, images, batch.labels.to(device), target)
            for name, method in methods.items():
                if name in self.failed:
                    continue
                began = time.perf_counter()
                try:
                    maps = method(images, targets)
                except Exception as error:
                    # a peer that refuses this model is a noted row; ours fail loudly
                    if not getattr(method, "is_peer", False):
                        raise
                    self.failed[name] = f"{type(error).__name__}: {error}"
                    continue
                seconds[name] += time.perf_counter() - began
                self._check(name, maps, images)
                for metric in metrics[name].values():
                    shared = {"endpoints": endpoints} if metric.uses_endpoints else {}
                    metric.update(
                        maps, masks, images=images, targets=targets, model=model, **shared
                    )
                bar.update(len(images))
        endpoints.clear()
        bar.close()
        results = {}
        for name in methods:
            if name in self.failed:
                continue
            row: dict[str, Any] = {}
            for metric in metrics[name].values():
                row |= metric.result()
            results[name] = row | {"seconds_per_image": seconds[name] / max(len(shard), 1)}
        return results

    @staticmethod
    def _check(name: str, maps: torch.Tensor, images: torch.Tensor) -> None:
        expected = (len(images), *images.shape[-2:])
        if tuple(maps.shape) != expected:
            raise VebiError(f"method {name} returned maps {tuple(maps.shape)}, expected {expected}")
        if not torch.isfinite(maps).all() or maps.min() < 0 or maps.max() > 1:
            raise VebiError(f"method {name} returned maps outside [0, 1] or with NaN/Inf")
