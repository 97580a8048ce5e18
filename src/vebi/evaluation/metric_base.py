"""One interface for every heatmap metric, as Quantus has one for its metrics.

A metric is a torchmetrics ``Metric`` (sums all-reduced under DDP) that says

* ``name``: the key of its headline number in results, tables and W&B;
* ``higher_is_better``;
* ``group``: the evaluator it belongs to (``localisation``, ``faithfulness``, ``artefacts``;
  ``evaluation.evaluators`` switches groups on and off, and W&B gets a table per group);
* ``needs_masks`` / ``needs_model``: what ``update`` needs besides the maps;

and is fed every batch of maps the same way::

    metric.update(heatmaps, masks, images=images, targets=targets, model=model)

``heatmaps`` (N, H, W) in [0, 1]; ``masks`` (N, H, W) bool or None; ``images`` (N, C, H, W);
``targets`` (N,) the explained classes. :meth:`HeatmapMetric.result` gives the headline and any
extra numbers (curves) as plain floats, which reporting prints and logs without knowing the
metric. Metrics are listed in ``evaluation.metrics`` with ``_target_``; adding one is a
subclass plus two config lines (the README shows one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torchmetrics import Metric

GROUPS = ("localisation", "faithfulness", "artefacts")


@dataclass(frozen=True)
class Curve:
    """A curve a metric reports per method: ``<key>_curve`` values at ``x`` (plotted)."""

    key: str
    x: Sequence[float]
    x_label: str
    title: str


class HeatmapMetric(Metric):
    """Base class of the heatmap metrics (module doc)."""

    name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    group: ClassVar[str]
    needs_masks: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False
    full_state_update = False
    is_differentiable = False

    def skip_reason(self, model: nn.Module, has_masks: bool) -> str | None:
        """Why this metric cannot score this model/data (None: it can)."""
        if self.needs_masks and not has_masks:
            return f"{self.name} skipped: the data set has no ground-truth masks"
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
        raise NotImplementedError

    def result(self) -> dict[str, Any]:
        """``{name: headline value, ...extras}`` as plain numbers and lists."""
        return {self.name: float(self.compute())}

    def curve(self) -> Curve | None:
        """The curve this metric adds to each method's results, if any."""
        return None


def require(value: Any, what: str, metric: HeatmapMetric) -> Any:
    """``value``, or a clear error when a metric is fed without what it needs."""
    if value is None:
        raise ValueError(f"{type(metric).__name__}.update needs {what}=")
    return value
