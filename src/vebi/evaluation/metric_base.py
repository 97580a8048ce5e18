"""One interface for every heatmap metric, as Quantus has one for its metrics.

A metric is a torchmetrics ``Metric`` (sums all-reduced under DDP) that says

* ``name``: the key of its headline number in results, tables and W&B;
* ``higher_is_better``;
* ``group``: the evaluator it belongs to (``localisation``, ``faithfulness``, ``artefacts``;
  ``evaluation.evaluators`` switches groups on and off, and W&B gets a table per group);
* ``needs_masks`` / ``needs_model``: what ``update`` needs besides the maps;
* ``uses_endpoints``: whether ``update`` also takes ``endpoints=``, the
  :class:`~vebi.evaluation.faithfulness.EndpointCache` that
  :class:`~vebi.evaluation.heatmaps.HeatmapEvaluation` shares between the methods of a batch;

and is fed every batch of maps the same way::

    metric.update(heatmaps, masks, images=images, targets=targets, model=model)

``heatmaps`` (N, H, W) in [0, 1]; ``masks`` (N, H, W) bool or None; ``images`` (N, C, H, W);
``targets`` (N,) the explained classes. :meth:`HeatmapMetric.result` gives the headline and any
extra numbers (curves) as plain floats, which reporting prints and logs without knowing the
metric. Metrics are listed in ``evaluation.metrics`` with ``_target_``; adding one is a
subclass plus two config lines (the README shows one). A metric that is a mean of per-image
scores derives from :class:`MeanOverImages`, which keeps the sum and the count.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torchmetrics import Metric

from vebi.errors import VebiError

GROUPS = ("localisation", "faithfulness", "artefacts")


@dataclass(frozen=True)
class Curve:
    """A curve a metric reports per method: ``<key>_curve`` values at ``x`` (plotted)."""

    key: str
    x: Sequence[float]
    x_label: str
    title: str


class HeatmapMetric(Metric):
    """Base class of the heatmap metrics (module doc); ``update`` and ``compute`` are abstract
    (torchmetrics' ``Metric`` is an ``abc.ABC``)."""

    name: ClassVar[str]
    higher_is_better: bool  # set by each metric class (torchmetrics: Optional[bool])
    group: ClassVar[str]
    needs_masks: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False
    uses_endpoints: ClassVar[bool] = False
    full_state_update = False
    is_differentiable = False

    def skip_reason(self, model: nn.Module, has_masks: bool) -> str | None:
        """Why this metric cannot score this model/data (None: it can)."""
        if self.needs_masks and not has_masks:
            return f"{self.name} skipped: the data set has no ground-truth masks"
        return None

    @abstractmethod
    def update(
        self,
        heatmaps: torch.Tensor,
        masks: torch.Tensor | None = None,
        *,
        images: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        model: nn.Module | None = None,
    ) -> None:
        """Add a batch of maps (module doc)."""

    def result(self) -> dict[str, Any]:
        """``{name: headline value, ...extras}`` as plain numbers and lists."""
        return {self.name: float(self.compute())}

    def curve(self) -> Curve | None:
        """The curve this metric adds to each method's results, if any."""
        return None


class MeanOverImages(HeatmapMetric):
    """A mean over images of a per-image score s_i, a number or a ``score_shape`` tensor (a
    curve): the states ``total`` = sum_i s_i and ``count`` = the number of images scored are
    summed over the processes under DDP (``dist_reduce_fx="sum"``), so the mean

        mean = total / count

    is the mean over all images of all processes. With no image scored (count = 0) it is NaN
    (0 / 0), or 0 for the metrics that set ``nan_when_empty = False`` (total / max(count, 1)).
    Subclasses add their per-image scores with :meth:`_add_scores` and read :meth:`_mean`;
    ``compute`` is the mean."""

    #: NaN with no image scored; False: 0 (the sum, 0, over max(count, 1)).
    nan_when_empty: ClassVar[bool] = True
    total: torch.Tensor  # states (add_state)
    count: torch.Tensor

    def __init__(self, score_shape: tuple[int, ...] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros(score_shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _add_scores(self, scores: torch.Tensor) -> None:
        """Add the scores (N, *score_shape) of N images (on any device; summed in float64)."""
        self.total += scores.double().sum(dim=0).to(self.total.device)
        self.count += len(scores)

    def _mean(self) -> torch.Tensor:
        """total / count (the class doc: NaN or 0 when no image was scored)."""
        return self.total / (self.count if self.nan_when_empty else self.count.clamp_min(1))

    def compute(self) -> Any:
        return self._mean()


def check_metric(metric: object, where: str) -> HeatmapMetric:
    """``metric`` when it is a :class:`HeatmapMetric` instance, else a :class:`VebiError`
    naming ``where`` (e.g. ``evaluation.metrics.<name>``) and what it is instead."""
    if not isinstance(metric, HeatmapMetric):
        raise VebiError(
            f"{where} is a {type(metric).__name__}, not a vebi HeatmapMetric "
            "(vebi.evaluation.metric_base)"
        )
    return metric


def require(value: Any, what: str, metric: HeatmapMetric) -> Any:
    """``value``, or a clear error when a metric is fed without what it needs."""
    if value is None:
        raise ValueError(f"{type(metric).__name__}.update needs {what}=")
    return value
