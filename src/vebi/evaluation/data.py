"""The test images of an evaluation, streamed from the data set in batches.

Evaluators never hold the test split in memory (50,000 ILSVRC validation images at 224 px
would be 30 GB as float32): an :class:`EvaluationSet` knows the rows it covers and their labels
and hands out batches through a DataLoader (:meth:`EvaluationSet.batches`), or loads a few
rows at once when an evaluator needs them together (:meth:`EvaluationSet.load`: the images of
one class for ablation, the panel images). Peak memory then depends on the batch size, not on
the number of test images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from vebi.errors import VebiError
from vebi.utils.torch_api import dataset_size

#: Input values per forward pass of the evaluators, by device. On the CPU small batches keep
#: every layer's output in the processor's caches (SmallVGG at 112 px, channels-last, 2 cores:
#: 0.9 ms per image in batches of 8-21, 1.45 ms in batches of 500); a GPU wants large ones.
INPUT_BUDGET = {"cpu": 2**17, "cuda": 2**24}


def forward_batch_size(image_numel: int, device: torch.device | str, cap: int = 512) -> int:
    """Images per forward pass (at most ``cap``) for images of ``image_numel`` values each:
    as many as :data:`INPUT_BUDGET` allows on ``device`` (at least one)."""
    budget = INPUT_BUDGET.get(torch.device(device).type, INPUT_BUDGET["cuda"])
    return int(min(cap, max(1, budget // max(1, image_numel))))


@dataclass
class EvaluationImages:
    """A batch of test images (N, C, H, W) in [0, 1], labels (N,) and, where the data has
    them, masks (N, H, W) with 1 on the class-deciding region."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.labels)


def dataset_labels(dataset: Dataset) -> torch.Tensor | None:
    """The labels of every item without reading the images, where the data set keeps them
    (``labels`` / ``targets`` attributes, a TensorDataset's second tensor, through Subsets);
    None otherwise."""
    if isinstance(dataset, Subset):
        inner = dataset_labels(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        return dataset.tensors[1].long()
    for name in ("labels", "targets"):
        values = getattr(dataset, name, None)
        if isinstance(values, torch.Tensor | np.ndarray | list) and len(values) == dataset_size(
            dataset
        ):
            return torch.as_tensor(np.asarray(values), dtype=torch.long)
    return None


def _collate(batch: list[tuple]) -> EvaluationImages:
    images = torch.stack([torch.as_tensor(item[0]).float() for item in batch])
    labels = torch.as_tensor([int(item[1]) for item in batch], dtype=torch.long)
    masks = None
    if len(batch[0]) > 2:
        masks = torch.stack([torch.as_tensor(item[2]) for item in batch])
        masks = masks.reshape(len(batch), *images.shape[-2:]).bool()
    return EvaluationImages(images, labels, masks)


class EvaluationSet:
    """Rows ``rows`` of ``dataset`` (items (image, label[, mask])) with their ``labels``."""

    def __init__(
        self,
        dataset: Dataset,
        rows: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int = 256,
        num_workers: int = 0,
    ) -> None:
        if len(rows) != len(labels):
            raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
        self.dataset = dataset
        self.rows = rows.long()
        self.labels = labels.long()
        self.batch_size = batch_size
        self.num_workers = num_workers

    @classmethod
    def from_dataset(
        cls,
        dataset: Dataset,
        limit: int | None = None,
        seed: int = 0,
        batch_size: int = 256,
        num_workers: int = 0,
    ) -> EvaluationSet:
        """The whole test split, or a seeded random ``limit`` of its images (in data order).
        Labels come without reading images where the data set keeps them, else from one pass."""
        if dataset_size(dataset) == 0:
            raise VebiError("the test split is empty: nothing to evaluate (check the data set)")
        rows = torch.arange(dataset_size(dataset))
        if limit is not None and limit < dataset_size(dataset):
            if limit < 1:
                raise VebiError(f"the number of evaluation images must be >= 1, got {limit}")
            generator = torch.Generator().manual_seed(seed)
            rows = torch.randperm(dataset_size(dataset), generator=generator)[:limit].sort().values
        labels = dataset_labels(dataset)
        if labels is not None:
            return cls(dataset, rows, labels[rows], batch_size, num_workers)
        unread = torch.zeros(len(rows), dtype=torch.long)
        partial = cls(dataset, rows, unread, batch_size, num_workers)
        labels = torch.cat([batch.labels for batch in partial.batches()])
        return cls(dataset, rows, labels, batch_size, num_workers)

    @classmethod
    def from_tensors(
        cls, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None = None
    ) -> EvaluationSet:
        """Images already in memory (tests, small data)."""
        tensors = (images, labels) if masks is None else (images, labels, masks)
        return cls(TensorDataset(*tensors), torch.arange(len(labels)), labels)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def has_masks(self) -> bool:
        return len(self.rows) > 0 and len(self.dataset[int(self.rows[0])]) > 2

    def select(self, positions: torch.Tensor) -> EvaluationSet:
        """The images at ``positions`` (0..len-1) of this set, still unread."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        return EvaluationSet(
            self.dataset,
            self.rows[positions],
            self.labels[positions],
            self.batch_size,
            self.num_workers,
        )

    def shard(self, rank: int, world_size: int) -> EvaluationSet:
        """Every ``world_size``-th image from ``rank``: one process's share under DDP."""
        return self.select(torch.arange(rank, len(self), world_size))

    def batches(self, batch_size: int | None = None) -> Iterator[EvaluationImages]:
        """The images in order, ``batch_size`` (default: the set's) at a time."""
        if len(self) == 0:
            return
        loader = DataLoader(
            Subset(self.dataset, self.rows.tolist()),
            batch_size=batch_size or self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_collate,
        )
        yield from loader

    def load(self, positions: torch.Tensor | None = None) -> EvaluationImages:
        """The images at ``positions`` (all when None) in memory, in one EvaluationImages."""
        subset = self if positions is None else self.select(positions)
        parts = list(subset.batches())
        if not parts:
            raise VebiError("no images to load")
        masks = (
            None
            if parts[0].masks is None
            else torch.cat([cast(torch.Tensor, p.masks) for p in parts])
        )
        return EvaluationImages(
            torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]), masks
        )


class ClassImages:
    """Training images of one class at a time: ``images(class_id, count)`` -> (n, C, H, W),
    a seeded random pick of at most ``count`` of the class's images (fewer when the class has
    fewer; none when it has none). Labels are read once, without the images where the data
    set keeps them; the images are read only when asked for."""

    def __init__(self, dataset: Dataset | Callable[[], Dataset], seed: int = 0) -> None:
        self.dataset = dataset  # or a function that makes it, called on first use
        self.seed = seed
        self._images: EvaluationSet | None = None

    @property
    def images(self) -> EvaluationSet:
        """The whole data set, made (where given as a function) and its labels read on first
        use: a job that needs no training images never sets up the training split."""
        if self._images is None:
            dataset = self.dataset if isinstance(self.dataset, Dataset) else self.dataset()
            self._images = EvaluationSet.from_dataset(dataset)
        return self._images

    def __call__(self, class_id: int, count: int) -> torch.Tensor:
        positions = (self.images.labels == int(class_id)).nonzero()[:, 0]
        if len(positions) == 0 or count < 1:
            return self.images.load(torch.arange(1)).images[:0]
        generator = torch.Generator().manual_seed(self.seed + int(class_id))
        picked = positions[torch.randperm(len(positions), generator=generator)[:count]]
        return self.images.load(picked.sort().values).images
