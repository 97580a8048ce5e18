"""Fashion144k (Simo-Serra et al., CVPR 2015) in the "stylenet" release layout, K-class setting.

Files read under ``root`` (as public loaders of the Fashion144k_stylenet_v1 release read them;
no official specification of the layout was found):

* ``photos.txt``: CSV, first column the relative photo path (``photos/<name>.jpg``); row i is
  post i in every other file;
* ``photos/``: the JPEG photos;
* ``feat/feat_sin.npy``: N x 123 binary "single" tags, names in ``feat/singles.txt`` (one per line,
  in column order);
* ``trainids.npy``, ``validids.npy``, ``testids.npy``: row indices of the splits.

The ICLR'19 paper fine-tunes on 12 classes without saying which; here the classes are a config
list of tag names, and a photo is kept when it carries exactly one of them (a single-label
K-class set). The default, :data:`DEFAULT_CLASSES`, is 12 colour tags: colours are what an
explanation can be checked against by eye. It is a choice of this project, not the paper's.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset
from torchvision import transforms

from vebi.data.base import SplitDataModule, image_transforms
from vebi.data.image_folder import read_rgb
from vebi.errors import VebiError
from vebi.utils.log import get_logger

log = get_logger(__name__)
DEFAULT_CLASSES = (
    "Black",
    "White",
    "Gray",
    "Red",
    "Blue",
    "Navy",
    "Brown",
    "Beige",
    "Pink",
    "Green",
    "Yellow",
    "Purple",
)
WHERE_TO_GET = (
    "Fashion144k is not distributed with vebi: get the 'Fashion144k_stylenet_v1' release from its "
    "authors (Simo-Serra & Ishikawa, CVPR 2016; see the Fashion144k project page) and unpack it so "
    "that {root} holds photos.txt, photos/, feat/feat_sin.npy, feat/singles.txt and the "
    "*ids.npy files"
)


class TaggedPhotos(Dataset):
    """(image [0, 1] (3, H, W), label) for a list of photo paths."""

    def __init__(
        self, paths: Sequence[Path], labels: np.ndarray, transform: transforms.Compose
    ) -> None:
        self.paths, self.labels, self.transform = list(paths), labels.astype(np.int64), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(read_rgb(str(self.paths[index]))), int(self.labels[index])


def read_fashion144k(
    root: str | Path, classes: Sequence[str]
) -> dict[str, tuple[list[Path], np.ndarray, int]]:
    """Per split: (photo paths, labels, number of listed photos missing on disk and skipped)."""
    root = Path(root)
    needed = [root / "photos.txt", root / "feat" / "feat_sin.npy", root / "feat" / "singles.txt"]
    needed += [root / f"{split}ids.npy" for split in ("train", "valid", "test")]
    absent = [str(p.relative_to(root)) for p in needed if not p.is_file()]
    if absent:
        raise VebiError(
            f"Fashion144k files missing ({', '.join(absent)}). " + WHERE_TO_GET.format(root=root)
        )
    with open(root / "photos.txt", newline="") as handle:
        photos = [row[0] for row in csv.reader(handle) if row]
    names = [
        line.strip()
        for line in (root / "feat" / "singles.txt").read_text().splitlines()
        if line.strip()
    ]
    tags = np.load(root / "feat" / "feat_sin.npy", allow_pickle=False)
    if tags.shape != (len(photos), len(names)):
        raise VebiError(
            f"feat_sin.npy is {tags.shape}, expected ({len(photos)}, {len(names)}) from "
            "photos.txt and singles.txt"
        )
    unknown = [c for c in classes if c not in names]
    if unknown or len(set(classes)) != len(classes) or len(classes) < 2:
        raise VebiError(
            f"class tags must be >= 2 distinct names from feat/singles.txt; unknown: {unknown}; "
            f"available: {', '.join(names)}"
        )
    chosen = tags[:, [names.index(c) for c in classes]] > 0
    single = chosen.sum(axis=1) == 1
    result = {}
    for split, file in (("train", "trainids"), ("val", "validids"), ("test", "testids")):
        ids = np.load(root / f"{file}.npy", allow_pickle=False).astype(np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= len(photos)):
            raise VebiError(f"{file}.npy holds row ids outside 0..{len(photos) - 1}")
        ids = ids[single[ids]]
        paths = [root / photos[i] for i in ids]
        present = np.array([p.is_file() for p in paths], dtype=bool)
        missing = int((~present).sum())
        if missing:
            examples = ", ".join(photos[i] for i in ids[~present][:3])
            warnings.warn(
                f"Fashion144k {split}: {missing} listed photo(s) are missing and skipped "
                f"(e.g. {examples})",
                stacklevel=2,
            )
        labels = chosen[ids[present]].argmax(axis=1)
        result[split] = ([p for p, ok in zip(paths, present, strict=True) if ok], labels, missing)
    return result


class Fashion144kDataModule(SplitDataModule):
    """Fashion144k photos carrying exactly one of ``classes`` (tags), as (image, label)."""

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str] = DEFAULT_CLASSES,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        classes = [str(c) for c in classes]
        self.save_hyperparameters(logger=False)
        self.root = Path(root)
        self.class_names: list[str] = list(classes)
        self.skipped: dict[str, int] = {}

    def _transforms(self, train: bool) -> transforms.Compose:
        return image_transforms(self.hparams.image_size, train, eval_resize=1.0)

    def prepare_data(self) -> None:
        if not (self.root / "photos.txt").is_file():
            raise VebiError(WHERE_TO_GET.format(root=self.root))

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        splits = read_fashion144k(self.root, self.class_names)
        self.skipped = {name: split[2] for name, split in splits.items()}
        for name, (paths, _, _) in splits.items():
            if not paths:
                raise VebiError(
                    f"the Fashion144k {name} split has no photo with exactly one of "
                    f"{self.class_names}"
                )
        self.data_train = TaggedPhotos(*splits["train"][:2], self._transforms(True))
        self.data_mining = TaggedPhotos(*splits["train"][:2], self._transforms(False))
        self.data_val = TaggedPhotos(*splits["val"][:2], self._transforms(False))
        self.data_test = TaggedPhotos(*splits["test"][:2], self._transforms(False))
