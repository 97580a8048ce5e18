"""ILSVRC'12 (ImageNet) in its usual folder layout, or any subset of its classes.

Layout: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` (what torchvision's
``ImageNet`` dataset class makes of the official archives; the official flat ``val`` folder
must be sorted into class folders first). Evaluation transforms are the standard ones: resize
to 256, centre crop 224 (for ``image_size`` 224), [0, 1] tensors; normalisation is the model's.

Labels (``label_space``):

* ``imagenet``: the class's index among the 1000 ILSVRC wnids in sorted order, which is the
  output order of the torchvision ImageNet classifiers: a pretrained network is mined and
  evaluated as it is, on any subset of classes (``classes``). The 1000 wnids come from
  ``synsets`` (a file whose lines start with a wnid, e.g. ``LOC_synset_mapping.txt``), from
  torchvision's ``meta.bin`` in ``root``, or from a ``train`` folder holding all 1000;
  the class names are torchvision's ImageNet category names.
* ``subset``: labels 0..K-1 over the chosen classes (to fine-tune on them).

``images_per_class`` caps the training (and so the mining) images of each class: the first
ones in file-name order, so the same images every run.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torchvision import datasets

from vebi.data.base import image_transforms
from vebi.data.image_folder import ImageFolderDataModule, read_rgb
from vebi.errors import VebiError
from vebi.models.torchvision_models import imagenet_categories

LABEL_SPACES = ("imagenet", "subset")
NUM_IMAGENET_CLASSES = 1000


class ILSVRCFolder(datasets.ImageFolder):
    """An ImageFolder over the chosen wnid folders with given labels (``class_to_idx``), each
    class capped at ``per_class`` images (file-name order)."""

    samples: list[tuple[str, int]]  # (path, label), as torchvision's DatasetFolder sets it

    def __init__(
        self,
        root: str | Path,
        class_to_idx: dict[str, int],
        transform: object,
        per_class: int | None = None,
    ) -> None:
        self._wanted = dict(class_to_idx)
        super().__init__(str(root), transform=transform, loader=read_rgb)
        if per_class is not None:
            kept: dict[int, int] = {}
            samples: list[tuple[str, int]] = []
            for path, label in self.samples:  # sorted by class, then by file name
                if kept.get(label, 0) < per_class:
                    kept[label] = kept.get(label, 0) + 1
                    samples.append((path, label))
            self.samples = samples
            self.imgs = samples
            self.targets = [label for _, label in samples]

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        missing = [wnid for wnid in self._wanted if not (Path(directory) / wnid).is_dir()]
        if missing:
            raise VebiError(
                f"{directory} has no folder for class(es) {missing[:5]}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                + ": expected <root>/<split>/<wnid>/*.JPEG for every chosen class"
            )
        return sorted(self._wanted), self._wanted


class ImageNetDataModule(ImageFolderDataModule):
    """ILSVRC'12 or a subset of its classes (module doc).

    Args:
        root: the folder with ``train/`` and ``val/`` (wnid class folders).
        classes: wnids to use (``None``: every class folder in ``train``).
        label_space: ``imagenet`` (labels of the 1000-class torchvision heads) or ``subset``.
        synsets: a file listing the 1000 wnids in order (first word of each line).
        images_per_class: cap on training/mining images per class (``None``: all).
    """

    def __init__(
        self,
        root: str | Path,
        classes: list[str] | None = None,
        label_space: str = "imagenet",
        synsets: str | Path | None = None,
        images_per_class: int | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 4,
    ) -> None:
        if label_space not in LABEL_SPACES:
            raise VebiError(f"label_space must be one of {LABEL_SPACES}, got {label_space!r}")
        if images_per_class is not None and images_per_class < 1:
            raise VebiError(f"images_per_class must be >= 1 or null, got {images_per_class}")
        super().__init__(root, image_size, batch_size, val_fraction, split_seed, num_workers)
        self.save_hyperparameters(logger=False)

    def _train_wnids(self) -> list[str]:
        train = self._split("train")
        if train is None:
            raise VebiError(
                f"no {self.root / 'train'} folder (expected <root>/train/<wnid>/*.JPEG)"
            )
        return sorted(p.name for p in train.iterdir() if p.is_dir())

    @functools.cached_property
    def all_wnids(self) -> list[str]:
        """The 1000 ILSVRC wnids in label order (module doc: where they come from)."""
        synsets = self.hparams.synsets
        if synsets:
            path = Path(synsets)
            if not path.is_file():
                raise VebiError(f"data.synsets={path}: no such file")
            wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        elif (self.root / "meta.bin").is_file():
            wnid_to_classes, _ = torch.load(self.root / "meta.bin", weights_only=True)
            wnids = sorted(wnid_to_classes)
        else:
            wnids = self._train_wnids()
        if len(wnids) != NUM_IMAGENET_CLASSES or len(set(wnids)) != len(wnids):
            raise VebiError(
                f"label_space=imagenet needs the {NUM_IMAGENET_CLASSES} ILSVRC wnids (found "
                f"{len(set(wnids))}): give data.synsets=<file listing them, e.g. "
                "LOC_synset_mapping.txt>, put torchvision's meta.bin in the root, or use "
                "data.label_space=subset (labels 0..K-1 over the chosen classes)"
            )
        return wnids

    @functools.cached_property
    def chosen_wnids(self) -> list[str]:
        chosen = list(self.hparams.classes or self._train_wnids())
        if not chosen:
            raise VebiError(f"no class folders in {self.root / 'train'}")
        if len(set(chosen)) != len(chosen):
            raise VebiError(f"data.classes lists a wnid twice: {chosen}")
        if self.hparams.label_space == "imagenet":
            unknown = sorted(set(chosen) - set(self.all_wnids))
            if unknown:
                raise VebiError(f"data.classes holds wnids that are not ILSVRC classes: {unknown}")
        return chosen

    @property
    def class_to_idx(self) -> dict[str, int]:
        if self.hparams.label_space == "imagenet":
            position = {wnid: i for i, wnid in enumerate(self.all_wnids)}
            return {wnid: position[wnid] for wnid in self.chosen_wnids}
        return {wnid: i for i, wnid in enumerate(sorted(self.chosen_wnids))}

    @property
    def class_names(self) -> list[str]:
        """The model's classes: the 1000 ImageNet names, or the chosen wnids (``subset``)."""
        if self.hparams.label_space == "imagenet":
            return imagenet_categories("resnet50")  # the names ship with torchvision
        return sorted(self.chosen_wnids)

    def _folder(self, path: Path, train: bool) -> datasets.ImageFolder:
        size = self.hparams.image_size
        cap = self.hparams.images_per_class if path.name == "train" else None
        try:
            return ILSVRCFolder(
                path,
                self.class_to_idx,
                image_transforms(size, train, eval_resize=256 / 224),
                per_class=cap,
            )
        except FileNotFoundError as error:  # e.g. an empty class folder
            raise VebiError(f"{path}: {error}") from error
