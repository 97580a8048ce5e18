"""Planted data and methods for end-to-end checks of evaluate.py (used through its config).

:class:`PlantedMaskData`: 3 classes of 3 x 32 x 32 noise images with a bright square in colour
c at a seeded random place; the mask is the square, and the image itself marks it (channel 0
is exactly 1.0 there and below 0.5 elsewhere). :class:`MaskMethod` reads the mask back from the
image, so its map equals the mask (IoU 1, pointing game 1) if and only if images and masks stay
in line all the way through the loader; :class:`ShiftedMaskMethod` moves it by half the image
(IoU 0, strict pointing game 0; 12.7 px away, a hit within the pointing game's 15 px).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from vebi.data.base import SplitDataModule
from vebi.evaluation.methods import HeatmapMethod

SIDE, SQUARE, CLASSES = 32, 8, 3


def planted_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, SIDE, SIDE, generator=generator) * 0.45
    labels = torch.arange(count) % CLASSES
    masks = torch.zeros(count, SIDE, SIDE)
    for i in range(count):
        top, left = torch.randint(0, SIDE // 2 - SQUARE, (2,), generator=generator).tolist()
        region = (slice(top, top + SQUARE), slice(left, left + SQUARE))
        masks[i][region] = 1.0
        images[i, 0][region] = 1.0
        images[i, int(labels[i])][region] = 1.0
    return images, labels, masks


class _Items(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> None:
        self.images, self.labels, self.masks = images, labels, masks

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        return self.images[index], int(self.labels[index]), self.masks[index]


class PlantedMaskData(SplitDataModule):
    """The planted images as (image, label, mask) splits (module doc)."""

    class_names = ["red", "green", "blue"]

    def __init__(self, train: int = 90, test: int = 60, batch_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.hparams["num_workers"] = 0
        self.hparams["image_size"] = SIDE

    def setup(self, stage: str | None = None) -> None:
        self.data_train = _Items(*planted_images(self.hparams.train, seed=1))
        self.data_val = _Items(*planted_images(self.hparams.test, seed=2))
        self.data_test = _Items(*planted_images(self.hparams.test, seed=3))


class MaskMethod(HeatmapMethod):
    """The mask, read back from the marked pixels of the image."""

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return (images[:, 0] == 1.0).float()


class ShiftedMaskMethod(MaskMethod):
    """The mask moved by half the image in both directions (never overlaps it)."""

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return super().__call__(images, classes).roll((SIDE // 2, SIDE // 2), dims=(1, 2))
