"""The Fashion144k loader on a tiny copy of the release format, written by the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vebi.data import Fashion144kDataModule
from vebi.errors import VebiError

TAGS = ["Boots", "Heather Gray", "Shirt", "Red", "Blue"]


def _write_release(root: Path) -> np.ndarray:
    """20 posts; tag columns as in feat/singles.txt; splits 0-11 / 12-15 / 16-19."""
    rng = np.random.default_rng(0)
    (root / "photos").mkdir(parents=True)
    (root / "feat").mkdir()
    tags = np.zeros((20, len(TAGS)), dtype=np.int64)
    for i in range(20):
        tags[i, i % len(TAGS)] = 1
        if i % 7 == 0:
            tags[i, (i + 1) % len(TAGS)] = 1  # two tags: dropped when both are classes
        Image.fromarray(rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)).save(
            root / "photos" / f"p{i}.jpg"
        )
    (root / "photos.txt").write_text("".join(f"photos/p{i}.jpg,{i * 3},x\n" for i in range(20)))
    (root / "feat" / "singles.txt").write_text("\n".join(TAGS) + "\n")
    np.save(root / "feat" / "feat_sin.npy", tags)
    np.save(root / "trainids.npy", np.arange(12))
    np.save(root / "validids.npy", np.arange(12, 16))
    np.save(root / "testids.npy", np.arange(16, 20))
    return tags


def test_single_label_k_class_setting(tmp_path: Path) -> None:
    tags = _write_release(tmp_path)
    classes = ["Shirt", "Red", "Blue"]
    datamodule = Fashion144kDataModule(tmp_path, classes=classes, image_size=16, num_workers=0)
    datamodule.prepare_data()
    datamodule.setup()
    columns = [TAGS.index(c) for c in classes]
    expected = [i for i in range(12) if tags[i, columns].sum() == 1]
    assert len(datamodule.data_train) == len(expected)
    assert datamodule.data_train.labels.tolist() == [
        int(np.argmax(tags[i, columns])) for i in expected
    ]
    image, label = datamodule.data_val[0]
    assert image.shape == (3, 16, 16) and 0 <= label < 3
    assert datamodule.num_classes == 3 and datamodule.skipped == {"train": 0, "val": 0, "test": 0}


def test_missing_photos_are_skipped_and_counted(tmp_path: Path) -> None:
    _write_release(tmp_path)
    (tmp_path / "photos" / "p2.jpg").unlink()  # train post 2 carries "Shirt"
    datamodule = Fashion144kDataModule(tmp_path, classes=["Shirt", "Red", "Blue"], num_workers=0)
    with pytest.warns(
        UserWarning, match="train: 1 listed photo\\(s\\) are missing and skipped .*p2.jpg"
    ):
        datamodule.setup()
    assert datamodule.skipped["train"] == 1


def test_absent_data_and_bad_classes(tmp_path: Path) -> None:
    with pytest.raises(VebiError, match="Fashion144k_stylenet_v1"):
        Fashion144kDataModule(tmp_path / "nothing").prepare_data()
    _write_release(tmp_path)
    with pytest.raises(VebiError, match="unknown: \\['Sandals'\\]; available: Boots, Heather Gray"):
        Fashion144kDataModule(tmp_path, classes=["Shirt", "Sandals"]).setup()
    np.save(tmp_path / "feat" / "feat_sin.npy", np.zeros((19, len(TAGS))))
    with pytest.raises(VebiError, match="feat_sin.npy is \\(19, 5\\)"):
        Fashion144kDataModule(tmp_path, classes=["Shirt", "Red"]).setup()
