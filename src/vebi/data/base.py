"""What every vebi data module shares: train/val/test splits, loaders, the mining split."""

from __future__ import annotations

from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from vebi.errors import VebiError


def image_transforms(size: int, train: bool, eval_resize: float = 1.14) -> transforms.Compose:
    """Train: random resized crop + flip; evaluation: resize (``eval_resize`` x size) + centre
    crop. Both end in [0, 1] tensors; normalisation is the model's job."""
    if train:
        steps = [
            transforms.RandomResizedCrop(size, scale=(0.5, 1.0)),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        steps = [transforms.Resize(int(round(size * eval_resize))), transforms.CenterCrop(size)]
    return transforms.Compose([*steps, transforms.ToTensor()])


class SplitDataModule(LightningDataModule):
    """Base class: subclasses fill ``data_train``/``data_val``/``data_test`` in ``setup`` (and
    ``data_mining``, the training images without augmentation, when it differs from
    ``data_train``) and store ``batch_size``/``num_workers`` (optionally ``pin_memory``) in
    their hyper-parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.data_train: Dataset | None = None
        self.data_val: Dataset | None = None
        self.data_test: Dataset | None = None
        self.data_mining: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images; RGB at ``image_size`` unless a subclass says otherwise."""
        return (3, self.hparams.image_size, self.hparams.image_size)

    def mining_dataset(self) -> Dataset:
        """The training split as (image, label, ...) without augmentation, in a fixed order."""
        dataset = self.data_mining if self.data_mining is not None else self.data_train
        if dataset is None:
            raise VebiError("the data module is not set up: call setup() first")
        return dataset

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise VebiError("the data module is not set up: call setup() first")
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            pin_memory=self.hparams.get("pin_memory", False),
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, shuffle=False)
