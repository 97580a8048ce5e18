"""Any folder of class folders (ILSVRC-style) as a LightningDataModule."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import LightningDataModule
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from vebi.errors import VebiError


def read_rgb(path: str) -> Image.Image:
    """PIL loader that names the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise VebiError(f"cannot read image {path}: {error}; delete or replace the file") from error


class ImageFolderDataModule(LightningDataModule):
    """``root/train/<class>/*`` (and optionally ``root/val``, ``root/test``) as (image, label).

    Images are RGB in [0, 1] at ``image_size`` (train: random resized crop + flip; evaluation:
    resize + centre crop; normalisation is the model's job). Without ``val`` a stratification-free
    random ``val_fraction`` of ``train`` is held out (fixed by ``split_seed``); without ``test`` the
    validation images are the test images. Class names are the sorted folder names.
    """

    def __init__(self, root: str | Path, image_size: int = 224, batch_size: int = 32,
                 val_fraction: float = 0.1, split_seed: int = 0, num_workers: int = 2) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = Path(root)
        self.data_train = self.data_val = self.data_test = self._train_eval = None

    def _split(self, name: str) -> Path | None:
        folder = self.root / name
        return folder if folder.is_dir() else None

    @property
    def class_names(self) -> list[str]:
        train = self._split("train")
        if train is None:
            raise VebiError(f"no {self.root / 'train'} folder (expected <root>/train/<class>/<images>)")
        return sorted(p.name for p in train.iterdir() if p.is_dir())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.hparams.image_size, self.hparams.image_size)

    def _transforms(self, train: bool) -> transforms.Compose:
        size = self.hparams.image_size
        if train:
            steps = [transforms.RandomResizedCrop(size, scale=(0.5, 1.0)), transforms.RandomHorizontalFlip()]
        else:
            steps = [transforms.Resize(int(round(size * 1.14))), transforms.CenterCrop(size)]
        return transforms.Compose([*steps, transforms.ToTensor()])

    def _folder(self, path: Path, train: bool) -> datasets.ImageFolder:
        try:
            return datasets.ImageFolder(str(path), transform=self._transforms(train), loader=read_rgb)
        except FileNotFoundError as error:  # e.g. an empty class folder
            raise VebiError(f"{path}: {error}") from error

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        train_dir = self._split("train")
        if train_dir is None:
            raise VebiError(f"no {self.root / 'train'} folder (expected <root>/train/<class>/<images>)")
        train, train_eval = self._folder(train_dir, True), self._folder(train_dir, False)
        if (val_dir := self._split("val")) is not None:
            self.data_train, self._train_eval = train, train_eval
            self.data_val = self._folder(val_dir, False)
        else:
            generator = torch.Generator().manual_seed(self.hparams.split_seed)
            order = torch.randperm(len(train), generator=generator).tolist()
            n_val = max(1, round(self.hparams.val_fraction * len(order)))
            self.data_train, self._train_eval = Subset(train, order[n_val:]), Subset(train_eval, order[n_val:])
            self.data_val = Subset(train_eval, order[:n_val])
        test_dir = self._split("test")
        self.data_test = self._folder(test_dir, False) if test_dir is not None else self.data_val

    def mining_dataset(self) -> Dataset:
        """The training images with the evaluation transforms (no augmentation)."""
        if self._train_eval is None:
            raise VebiError("the data module is not set up: call setup() first")
        return self._train_eval

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise VebiError("the data module is not set up: call setup() first")
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, shuffle=False)
