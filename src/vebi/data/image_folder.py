"""Any folder of class folders (ILSVRC-style) as a LightningDataModule."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision import datasets

from vebi.data.base import SplitDataModule, image_transforms
from vebi.errors import VebiError
from vebi.utils.io import IMAGE_READ_ERRORS, image_error_reason


def read_rgb(path: str) -> Image.Image:
    """PIL loader that names the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except IMAGE_READ_ERRORS as error:
        raise VebiError(
            f"cannot read image {path}: {image_error_reason(error)}; delete or replace the file"
        ) from error


class ImageFolderDataModule(SplitDataModule):
    """``root/train/<class>/*`` (and optionally ``root/val``, ``root/test``) as (image, label).

    Images are RGB in [0, 1] at ``image_size`` (train: random resized crop + flip; evaluation:
    resize + centre crop; normalisation is the model's job). Without ``val`` a stratification-free
    random ``val_fraction`` of ``train`` is held out (fixed by ``split_seed``); without ``test`` the
    validation images are the test images. Class names are the sorted folder names.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 224,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = Path(root)

    def _split(self, name: str) -> Path | None:
        folder = self.root / name
        return folder if folder.is_dir() else None

    @property
    def class_names(self) -> list[str]:
        train = self._split("train")
        if train is None:
            raise VebiError(
                f"no {self.root / 'train'} folder (expected <root>/train/<class>/<images>)"
            )
        return sorted(p.name for p in train.iterdir() if p.is_dir())

    def _folder(self, path: Path, train: bool) -> datasets.ImageFolder:
        try:
            return datasets.ImageFolder(
                str(path),
                transform=image_transforms(self.hparams.image_size, train),
                loader=read_rgb,
            )
        except FileNotFoundError as error:  # e.g. an empty class folder
            raise VebiError(f"{path}: {error}") from error

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        train_dir = self._split("train")
        if train_dir is None:
            raise VebiError(
                f"no {self.root / 'train'} folder (expected <root>/train/<class>/<images>)"
            )
        train, train_eval = self._folder(train_dir, True), self._folder(train_dir, False)
        if (val_dir := self._split("val")) is not None:
            self.data_train, self.data_mining = train, train_eval
            self.data_val = self._folder(val_dir, False)
        else:
            generator = torch.Generator().manual_seed(self.hparams.split_seed)
            order = torch.randperm(len(train), generator=generator).tolist()
            n_val = max(1, round(self.hparams.val_fraction * len(order)))
            self.data_train, self.data_mining = (
                Subset(train, order[n_val:]),
                Subset(train_eval, order[n_val:]),
            )
            self.data_val = Subset(train_eval, order[:n_val])
        test_dir = self._split("test")
        self.data_test = self._folder(test_dir, False) if test_dir is not None else self.data_val
