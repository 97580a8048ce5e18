"""Image folders (ILSVRC layout) and torchvision classifiers taking [0, 1] images."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from vebi.data import ImageFolderDataModule
from vebi.errors import VebiError
from vebi.explain import backprop_feature
from vebi.models import TorchvisionClassifier


def _write_folder(root: Path, per_class: int = 6) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "fox"):
        (root / "train" / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(40 + i, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / name / f"{i}.jpg")


def test_image_folder_splits_and_transforms(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    datamodule = ImageFolderDataModule(
        tmp_path, image_size=32, batch_size=4, val_fraction=0.25, num_workers=0
    )
    assert datamodule.num_classes == 3 and datamodule.class_names == ["cat", "dog", "fox"]
    datamodule.setup()
    assert len(datamodule.data_train) + len(datamodule.data_val) == 18
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    image, _ = datamodule.mining_dataset()[0]
    torch.testing.assert_close(image, datamodule.mining_dataset()[0][0])  # no augmentation


def test_image_folder_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(VebiError, match="no .*train folder"):
        ImageFolderDataModule(tmp_path).setup()
    _write_folder(tmp_path, per_class=2)
    (tmp_path / "train" / "dog" / "1.jpg").write_bytes(b"garbage")
    datamodule = ImageFolderDataModule(tmp_path, image_size=16, num_workers=0, val_fraction=0.5)
    datamodule.setup()
    with pytest.raises(VebiError, match="cannot read image .*dog/1.jpg"):
        [datamodule.mining_dataset()[i] for i in range(len(datamodule.mining_dataset()))]
        [datamodule.data_val[i] for i in range(len(datamodule.data_val))]

    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(VebiError, match="empty"):
        ImageFolderDataModule(tmp_path, num_workers=0).setup()


@pytest.mark.parametrize("architecture", ["vgg11", "resnet18"])
def test_torchvision_classifier_takes_unit_images(architecture: str) -> None:
    torch.manual_seed(0)
    model = TorchvisionClassifier(architecture, num_classes=5).eval()
    images = torch.rand(2, 3, 64, 64)
    assert model(images).shape == (2, 5)
    layer = "net.layer3.0.relu" if architecture == "resnet18" else "net.features.8"
    signal = backprop_feature(model, images, layer, 1)
    assert signal.shape == images.shape and torch.isfinite(signal).all()


def test_pretrained_weights_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self, *args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(VebiError, match="could not get the pretrained resnet18 weights"):
        TorchvisionClassifier("resnet18", num_classes=3, pretrained=True)
    with pytest.warns(UserWarning, match="random weights"):
        model = TorchvisionClassifier(
            "resnet18", num_classes=3, pretrained=True, allow_random_init=True
        )
    assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(VebiError, match="unknown architecture"):
        TorchvisionClassifier("alexnet")
