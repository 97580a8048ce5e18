"""Streamed sufficient statistics of the mu-lasso: G = X^T X, B = X^T Y, class counts.

||X w - y||^2 = w^T G w - 2 b^T w + y^T y, so the solve needs only G (m x m) and B (m x C),
which are sums over images: memory is O(m^2 + mC) whatever the number of images N. As a
torchmetrics ``Metric`` with ``sum`` reduction, the states are all-reduced across processes
under DDP, so every process solves the same problem.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class GramStatistics(Metric):
    """Accumulates G = sum_i x_i x_i^T and B = sum_i x_i y_i^T in float64, plus counts.

    G is symmetric, so only its upper block triangle is accumulated (``row_blocks`` GEMMs
    x[:, rows]^T x[:, rows.start:] per batch, about 25% faster than the full product on a CPU)
    and :meth:`compute` mirrors it.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self, num_features: int, num_classes: int, row_blocks: int = 4, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)
        self.num_features = num_features
        self.num_classes = num_classes
        blocks = max(1, min(row_blocks, num_features))
        self._edges = [round(i * num_features / blocks) for i in range(blocks + 1)]
        m, c = num_features, num_classes
        self.add_state("gram", torch.zeros(m, m, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cross", torch.zeros(m, c, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("class_counts", torch.zeros(c, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_samples", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """``features`` (n, m), ``labels`` (n,) class ids in 0..C-1."""
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(
                f"features must be (n, {self.num_features}), got {tuple(features.shape)}"
            )
        if labels.shape != (features.shape[0],):
            raise ValueError(f"labels must be ({features.shape[0]},), got {tuple(labels.shape)}")
        x = features.to(self.gram.device, torch.float64)
        labels = labels.to(self.gram.device).long()
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels outside 0..{self.num_classes - 1}")
        for start, stop in zip(self._edges[:-1], self._edges[1:], strict=True):
            self.gram[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])
        self.cross.index_add_(1, labels, x.T)
        self.class_counts += torch.bincount(labels, minlength=self.num_classes).to(torch.float64)
        self.num_samples += len(labels)

    def _stored(self) -> torch.Tensor:
        """True where the upper block triangle holds G's entries."""
        mask = torch.zeros(self.num_features, self.num_features, dtype=torch.bool)
        for start, stop in zip(self._edges[:-1], self._edges[1:], strict=True):
            mask[start:stop, start:] = True
        return mask.to(self.gram.device)

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "gram": torch.where(self._stored(), self.gram, self.gram.T),
            "cross": self.cross,
            "class_counts": self.class_counts,
            "num_samples": self.num_samples,
        }
