"""Streamed sufficient statistics of the mu-lasso: G = X^T X, B = X^T Y, class counts.

||X w - y||^2 = w^T G w - 2 b^T w + y^T y, so the solve needs only G (m x m) and B (m x C),
which are sums over images, whatever the number of images N. As a torchmetrics ``Metric``
with ``sum`` reduction, the states are all-reduced across processes under DDP, so every
process solves the same problem.

G costs m^2 memory: 5.7 GB for VGG-16's 26,816 responses, 40 GB for every layer output of a
ResNet-50. For large m, :class:`StreamedGram` never forms it. The working-set solver only
needs G[S, S] on small working sets S and the products G[:, S] w_S (for the optimality check
on all m features); both are sums over images, X_S^T X_S and X^T (X_S w_S), so one pass over
the activation cache (on disk, N x m) computes them for every class at once. Memory is then
O(mC) for B and the products, plus one block of cache rows; the price is two passes over
the cache per working-set round (a few rounds), which costs far less than the forward pass
that wrote the cache. Under DDP each process streams its own shard and the sums are
all-reduced, so every process still solves the same problem.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torchmetrics import Metric

from vebi.utils.distributed import all_reduce_sum, world

#: Working-set unions up to this size get one X_U^T X_U per block, sliced per class.
UNION_GRAM_MAX = 4096


class GramStatistics(Metric):
    """Accumulates G = sum_i x_i x_i^T and B = sum_i x_i y_i^T in float64, plus counts.

    G is symmetric, so only its upper block triangle is accumulated (``row_blocks`` GEMMs
    x[:, rows]^T x[:, rows.start:] per batch, about 25% faster than the full product on a CPU)
    and :meth:`compute` mirrors it.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    gram: torch.Tensor  # states (add_state)
    cross: torch.Tensor
    class_counts: torch.Tensor
    num_samples: torch.Tensor

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        row_blocks: int = 4,
        with_gram: bool = True,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self.num_features = num_features
        self.num_classes = num_classes
        self.with_gram = with_gram
        blocks = max(1, min(row_blocks, num_features))
        self._edges = [round(i * num_features / blocks) for i in range(blocks + 1)]
        m, c = num_features, num_classes
        if with_gram:
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
        x = features.to(self.cross.device, torch.float64)
        labels = labels.to(self.cross.device).long()
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels outside 0..{self.num_classes - 1}")
        if self.with_gram:
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
        """G (when accumulated), B, class counts and N."""
        result = {
            "cross": self.cross,
            "class_counts": self.class_counts,
            "num_samples": self.num_samples,
        }
        if self.with_gram:
            result["gram"] = torch.where(self._stored(), self.gram, self.gram.T)
        return result


def _all_reduce(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Sum float64 arrays over the processes of torch.distributed (no-op in one process)."""
    if world()[1] == 1:
        return arrays
    flat = all_reduce_sum(torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays])))
    out, start = [], 0
    for array in arrays:
        out.append(flat[start : start + array.size].numpy().reshape(array.shape))
        start += array.size
    return out


class StreamedGram:
    """Slices of G = X^T X computed on demand by one pass over row blocks of X (module doc).

    Args:
        blocks: called once per pass; yields float32 blocks of rows of X, (n_i, m).
        size: m.
    """

    def __init__(self, blocks: Callable[[], Iterable[np.ndarray]], size: int) -> None:
        self.blocks = blocks
        self.size = size
        #: passes made over the data so far
        self.passes = 0

    def _rows(self) -> Iterable[np.ndarray]:
        self.passes += 1
        for block in self.blocks():
            if block.ndim != 2 or block.shape[1] != self.size:
                raise ValueError(f"blocks must be (n, {self.size}), got {block.shape}")
            yield block

    @staticmethod
    def _union(index_sets: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        union = np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s in index_sets]))
        return union, [np.searchsorted(union, s) for s in index_sets]

    def submatrices(self, index_sets: Sequence[np.ndarray]) -> list[np.ndarray]:
        """G[S, S] = X_S^T X_S for each index set S, in one pass."""
        if not index_sets:
            return []
        union, positions = self._union(index_sets)
        whole = len(union) <= UNION_GRAM_MAX
        sums = (
            [np.zeros((len(union), len(union)))]
            if whole
            else [np.zeros((len(p), len(p))) for p in positions]
        )
        for block in self._rows():
            xu = block[:, union].astype(np.float64)
            if whole:
                sums[0] += xu.T @ xu
            else:
                for total, pos in zip(sums, positions, strict=True):
                    xs = xu[:, pos]
                    total += xs.T @ xs
        sums = _all_reduce(sums)
        if whole:
            return [sums[0][np.ix_(pos, pos)] for pos in positions]
        return sums

    def products(
        self, index_sets: Sequence[np.ndarray], weights: Sequence[np.ndarray]
    ) -> np.ndarray:
        """(m, k): column j = G[:, S_j] w_j = X^T (X_{S_j} w_j), in one pass."""
        if not index_sets:
            return np.zeros((self.size, 0))
        union, positions = self._union(index_sets)
        stacked = np.zeros((len(union), len(index_sets)))
        for j, (pos, w) in enumerate(zip(positions, weights, strict=True)):
            stacked[pos, j] = w
        total = np.zeros((self.size, len(index_sets)))
        for block in self._rows():
            x = block.astype(np.float64)
            total += x.T @ (x[:, union] @ stacked)
        return _all_reduce([total])[0]
