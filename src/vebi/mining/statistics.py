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

Both run on any torch device: G is accumulated where the model runs (a GPU's memory holds
ResNet-50's 2.4 GB G many times over), and the streamed passes are torch matrix products on
the model's device, in float64, with the next block of cache rows read by a background
thread while the current one is multiplied.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torchmetrics import Metric

from vebi.utils.distributed import all_reduce_sum_, world

#: Working-set unions up to this size get one X_U^T X_U per block, sliced per class.
UNION_GRAM_MAX = 4096
#: Bytes of float64 rows gathered before each addition to G (at most 2048 rows).
GRAM_BLOCK_BYTES = 256 * 2**20


class GramStatistics(Metric):
    """Accumulates G = sum_i x_i x_i^T and B = sum_i x_i y_i^T in float64, plus counts.

    G is symmetric, so only its upper block triangle is accumulated (``row_blocks`` GEMMs
    x[:, rows]^T x[:, rows.start:] per batch, about 25% faster than the full product on a CPU)
    and :meth:`gram_matrix` mirrors it in place (no second m x m array). Batches are gathered
    into blocks of up to :data:`GRAM_BLOCK_BYTES` of rows before they are added to G: one
    product per 50 images would read and write all of G per batch, which makes the sum memory
    bound (on a CPU 3x slower at m = 17,408). The states live on the
    device the metric is moved to (the model's). Under torch.distributed, :meth:`compute`
    all-reduces each state once, in place on its device (torchmetrics' own sync would gather
    world-size copies of G first); call it once, after the last update.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    gram: torch.Tensor  # not a state: allocated by the first update
    cross: torch.Tensor  # states (add_state)
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
        kwargs.setdefault("sync_on_compute", False)  # reduced once by compute, not gathered
        super().__init__(**kwargs)
        self._reduced = False
        self.num_features = num_features
        self.num_classes = num_classes
        self.with_gram = with_gram
        blocks = max(1, min(row_blocks, num_features))
        self._edges = [round(i * num_features / blocks) for i in range(blocks + 1)]
        m, c = num_features, num_classes
        # G is no torchmetrics state: add_state would keep a second m x m copy (its reset
        # value); it is allocated on the first update, on the device of the other states
        self.gram = torch.zeros(0, 0, dtype=torch.float64)
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0
        self.block_rows = max(1, min(2048, GRAM_BLOCK_BYTES // (8 * max(num_features, 1))))
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
            self._pending.append(x)
            self._pending_rows += len(x)
            if self._pending_rows >= self.block_rows:
                self._add_pending()
        self.cross.index_add_(1, labels, x.T)
        self.class_counts += torch.bincount(labels, minlength=self.num_classes).to(torch.float64)
        self.num_samples += len(labels)

    def _add_pending(self) -> None:
        """Add the gathered rows to G's upper block triangle (allocating G the first time)."""
        if self.gram.shape != (self.num_features, self.num_features):
            self.gram = torch.zeros(
                self.num_features, self.num_features, dtype=torch.float64, device=self.cross.device
            )
        if not self._pending:
            return
        x = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_rows = [], 0
        for start, stop in zip(self._edges[:-1], self._edges[1:], strict=True):
            self.gram[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])

    def reset(self) -> None:
        super().reset()
        self.gram = torch.zeros(0, 0, dtype=torch.float64)
        self._pending, self._pending_rows = [], 0
        self._reduced = False

    def _mirror(self) -> None:
        """Copy the upper block triangle into the lower one, block by block, in place."""
        edges = self._edges  # the diagonal blocks are accumulated whole
        for i, (start, stop) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            for other, end in zip(edges[i + 1 : -1], edges[i + 2 :], strict=True):
                self.gram[other:end, start:stop] = self.gram[start:stop, other:end].T

    def _reduce_once(self) -> None:
        """Sum the states over the processes of torch.distributed, in place, once."""
        if self.with_gram:
            self._add_pending()  # (an empty shard's G: zeros, still reduced)
        if world()[1] > 1 and not self._reduced:
            for name in ("cross", "class_counts", "num_samples") + (
                ("gram",) if self.with_gram else ()
            ):
                setattr(self, name, all_reduce_sum_(getattr(self, name)))
        self._reduced = True

    def compute(self) -> dict[str, torch.Tensor]:
        """B, class counts and N, summed over the processes of torch.distributed (G: see
        :meth:`gram_matrix`; torchmetrics returns copies of what compute returns)."""
        self._reduce_once()
        return {
            "cross": self.cross,
            "class_counts": self.class_counts,
            "num_samples": self.num_samples,
        }

    def gram_matrix(self) -> torch.Tensor:
        """G (m x m, float64, on the states' device), summed over the processes and mirrored
        in place: the accumulated tensor itself, not a copy."""
        if not self.with_gram:
            raise ValueError("G was not accumulated (with_gram=False)")
        self._reduce_once()
        self._mirror()
        return self.gram


def _all_reduce(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum float64 tensors over the processes of torch.distributed (no-op in one process)."""
    if world()[1] == 1:
        return tensors
    flat = all_reduce_sum_(torch.cat([t.reshape(-1) for t in tensors]))
    out, begin = [], 0
    for tensor in tensors:
        out.append(flat[begin : begin + tensor.numel()].reshape(tensor.shape))
        begin += tensor.numel()
    return out


#: Bytes of float64 gathered columns per batched per-class product (n x classes x |S|).
GATHER_BYTES = 256 * 2**20


class StreamedGram:
    """Slices of G = X^T X computed on demand by one pass over row blocks of X (module doc).

    Each pass reads the blocks in a background thread, one block ahead of the products, and
    multiplies on ``device`` in float64 (exact sums of the float32 or float16 cache values).

    Args:
        blocks: called once per pass; yields blocks of rows of X, (n_i, m), as numpy arrays
            or tensors of any floating dtype.
        size: m.
        device: where the products run (the model's device; default the CPU).
    """

    def __init__(
        self,
        blocks: Callable[[], Iterable[np.ndarray | torch.Tensor]],
        size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.blocks = blocks
        self.size = size
        self.device = torch.device(device)
        #: passes made over the data so far, and the seconds they took
        self.passes = 0
        self.seconds = 0.0

    def _to_device(self, block: np.ndarray | torch.Tensor) -> torch.Tensor:
        if block.ndim != 2 or block.shape[1] != self.size:
            raise ValueError(f"blocks must be (n, {self.size}), got {tuple(block.shape)}")
        tensor = torch.as_tensor(block)
        if self.device.type == "cuda":  # pinned: the copy overlaps the previous products
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device, torch.float64)

    def _rows(self) -> Iterator[torch.Tensor]:
        """The blocks of one pass on the device, the next one read (and copied) meanwhile."""
        self.passes += 1
        blocks = iter(self.blocks())

        def read() -> torch.Tensor | None:
            block = next(blocks, None)
            return None if block is None else self._to_device(block)

        with ThreadPoolExecutor(1, thread_name_prefix="vebi-cache-reader") as reader:
            ahead = reader.submit(read)
            while True:
                block = ahead.result()
                if block is None:
                    return
                ahead = reader.submit(read)
                yield block

    @staticmethod
    def _union(index_sets: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        union = np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s in index_sets]))
        return union, [np.searchsorted(union, s) for s in index_sets]

    def _padded(self, positions: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, s_max) column positions (padding repeats position 0) and the (k, s_max) mask."""
        width = max(1, max(len(p) for p in positions))
        index = torch.zeros(len(positions), width, dtype=torch.long)
        mask = torch.zeros(len(positions), width, dtype=torch.float64)
        for j, pos in enumerate(positions):
            index[j, : len(pos)] = torch.as_tensor(pos)
            mask[j, : len(pos)] = 1.0
        return index.to(self.device), mask.to(self.device)

    def submatrices(self, index_sets: Sequence[np.ndarray]) -> list[np.ndarray]:
        """G[S, S] = X_S^T X_S for each index set S, in one pass: one X_U^T X_U for a small
        union U, else batched products of each class's gathered columns."""
        if not index_sets:
            return []
        started = time.perf_counter()
        union, positions = self._union(index_sets)
        columns = torch.as_tensor(union, device=self.device)
        whole = len(union) <= UNION_GRAM_MAX
        index, mask = self._padded(positions)
        k, width = index.shape
        if whole:
            sums = torch.zeros(len(union), len(union), dtype=torch.float64, device=self.device)
        else:
            sums = torch.zeros(k, width, width, dtype=torch.float64, device=self.device)
        for block in self._rows():
            xu = block[:, columns]
            if whole:
                sums.addmm_(xu.T, xu)
                continue
            step = max(1, GATHER_BYTES // (8 * width * max(len(block), 1)))
            for first in range(0, k, step):
                rows = slice(first, first + step)
                xs = xu[:, index[rows]] * mask[rows]  # (n, classes, s_max)
                sums[rows] += torch.einsum("nki,nkj->kij", xs, xs)
        sums = _all_reduce([sums])[0].cpu()
        self.seconds += time.perf_counter() - started
        if whole:
            return [sums[np.ix_(pos, pos)].numpy() for pos in positions]
        return [sums[j, : len(pos), : len(pos)].numpy() for j, pos in enumerate(positions)]

    def products(
        self, index_sets: Sequence[np.ndarray], weights: Sequence[np.ndarray]
    ) -> np.ndarray:
        """(m, k): column j = G[:, S_j] w_j = X^T (X_{S_j} w_j), in one pass."""
        if not index_sets:
            return np.zeros((self.size, 0))
        started = time.perf_counter()
        union, positions = self._union(index_sets)
        stacked = np.zeros((len(union), len(index_sets)))
        for j, (pos, w) in enumerate(zip(positions, weights, strict=True)):
            stacked[pos, j] = w
        columns = torch.as_tensor(union, device=self.device)
        stacked_t = torch.as_tensor(stacked, device=self.device)
        total = torch.zeros(self.size, len(index_sets), dtype=torch.float64, device=self.device)
        for block in self._rows():
            total.addmm_(block.T, block[:, columns] @ stacked_t)
        result = _all_reduce([total])[0].cpu().numpy()
        self.seconds += time.perf_counter() - started
        return result
