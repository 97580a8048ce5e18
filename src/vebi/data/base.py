"""What every vebi data module shares: train/val/test splits, loaders, the mining split."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from vebi.errors import VebiError

if TYPE_CHECKING:
    from lightning.fabric.utilities.data import AttributeDict


@runtime_checkable
class ClassificationData(Protocol):
    """What the jobs (train, mine, explain, evaluate) read from a data module: the contract
    that :class:`SplitDataModule` implements. Images are (C, H, W) float tensors in [0, 1]
    (normalisation is the model's job); items are (image, label[, mask])."""

    class_names: Sequence[str]
    data_test: Dataset | None

    @property
    def num_classes(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def num_workers(self) -> int: ...

    def prepare_data(self) -> None: ...

    def setup(self, stage: str) -> None: ...

    def mining_dataset(self) -> Dataset:
        """The training images without augmentation, in a fixed order."""
        ...

    def test_dataloader(self) -> DataLoader: ...


#: The members of :class:`ClassificationData`, checked by :func:`check_data_contract`.
DATA_CONTRACT = (
    "class_names",
    "num_classes",
    "image_shape",
    "batch_size",
    "num_workers",
    "data_test",
    "prepare_data",
    "setup",
    "mining_dataset",
    "test_dataloader",
)


def check_data_contract(datamodule: object, where: str = "data") -> ClassificationData:
    """``datamodule`` if it is a LightningDataModule offering every member of
    :class:`ClassificationData` (looked up without evaluating properties, which may need the
    data on disk); otherwise one error naming what is missing and how to get it."""
    kind = f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"
    if not isinstance(datamodule, LightningDataModule):
        raise VebiError(f"{where} must be a LightningDataModule, got {kind}")
    missing = [name for name in DATA_CONTRACT if not _offers(datamodule, name)]
    if missing:
        raise VebiError(
            f"{where} ({kind}) lacks {', '.join(missing)}, which the jobs read from a data "
            "module (vebi.data.ClassificationData): derive it from vebi.data.SplitDataModule, "
            "which provides them from data_train/data_val/data_test and its hyper-parameters "
            "batch_size, num_workers (and image_size), or add them"
        )
    # checked member by member above (isinstance against the Protocol would evaluate them)
    return cast(ClassificationData, datamodule)


def lightning_data(data: ClassificationData) -> LightningDataModule:
    """``data`` as the LightningDataModule it is (:func:`check_data_contract` refuses anything
    else), for Lightning's ``Trainer``."""
    if not isinstance(data, LightningDataModule):
        raise VebiError(f"data must be a LightningDataModule, got {type(data).__name__}")
    return data


def _offers(instance: object, name: str) -> bool:
    try:
        inspect.getattr_static(instance, name)
    except AttributeError:
        return False
    return True


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

    if TYPE_CHECKING:  # Lightning annotates hparams ``AttributeDict | MutableMapping``; it is
        # the AttributeDict that ``save_hyperparameters`` fills (attribute access)

        @property
        def hparams(self) -> AttributeDict: ...

        @property
        def class_names(self) -> Sequence[str]: ...  # each subclass's (attribute or property)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images; RGB at ``image_size`` unless a subclass says otherwise."""
        return (3, self.hparams.image_size, self.hparams.image_size)

    @property
    def batch_size(self) -> int:
        return int(self.hparams.batch_size)

    @property
    def num_workers(self) -> int:
        return int(self.hparams.get("num_workers", 0))

    def mining_dataset(self) -> Dataset:
        """The training split as (image, label, ...) without augmentation, in a fixed order."""
        dataset = self.data_mining if self.data_mining is not None else self.data_train
        if dataset is None:
            raise VebiError("the data module is not set up: call setup() first")
        return dataset

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise VebiError("the data module is not set up: call setup() first")
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
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
