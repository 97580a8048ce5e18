"""A pretrained model taken as it is (no checkpoint) on ILSVRC-style data: a tiny generated
folder in the ILSVRC layout and random weights stand in for ImageNet and its downloads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli
from vebi.data import ImageNetDataModule
from vebi.errors import VebiError

#: 1000 made-up wnids in sorted order; the folder holds three of them
WNIDS = [f"n{i:08d}" for i in range(0, 3000, 3)]
CHOSEN = [WNIDS[7], WNIDS[281], WNIDS[999]]


def write_ilsvrc(root: Path, train: int = 5, val: int = 2) -> Path:
    """``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` for CHOSEN (each class a
    colour, plus noise), and a synsets file listing all 1000 wnids; returns its path."""
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(CHOSEN):
        for split, count in (("train", train), ("val", val)):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, size=(48 + 4 * i, 56, 3), dtype=np.uint8)
                pixels[..., c] += 150
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG")
    synsets = root / "LOC_synset_mapping.txt"
    synsets.write_text("".join(f"{w} class {i}, made up\n" for i, w in enumerate(WNIDS)))
    return synsets


def test_labels_follow_the_imagenet_heads(tmp_path: Path) -> None:
    synsets = write_ilsvrc(tmp_path)
    data = ImageNetDataModule(tmp_path, synsets=synsets, image_size=32, num_workers=0)
    assert data.num_classes == 1000 and data.class_names[0] == "tench"  # torchvision's names
    data.setup()
    labels = sorted({label for _, label in data.data_train.samples})
    assert labels == [7, 281, 999]  # the wnids' positions among the 1000
    image, label = data.mining_dataset()[0]
    assert image.shape == (3, 32, 32) and label == 7
    assert len(data.data_test) == 6 and data.data_test is data.data_val


def test_subset_labels_class_choice_and_cap(tmp_path: Path) -> None:
    write_ilsvrc(tmp_path)
    data = ImageNetDataModule(
        tmp_path,
        classes=[CHOSEN[2], CHOSEN[0]],
        label_space="subset",
        images_per_class=2,
        image_size=32,
        num_workers=0,
    )
    assert data.class_names == [CHOSEN[0], CHOSEN[2]]
    data.setup()
    samples = data.data_train.samples
    assert [(Path(p).name, label) for p, label in samples] == [
        (f"{CHOSEN[0]}_0.JPEG", 0),
        (f"{CHOSEN[0]}_1.JPEG", 0),
        (f"{CHOSEN[2]}_0.JPEG", 1),
        (f"{CHOSEN[2]}_1.JPEG", 1),
    ]
    assert len(data.data_val) == 4  # the cap is for training/mining images only


def test_imagenet_data_errors_say_what_to_do(tmp_path: Path) -> None:
    write_ilsvrc(tmp_path)
    with pytest.raises(VebiError, match="needs the 1000 ILSVRC wnids.*data.synsets"):
        ImageNetDataModule(tmp_path, num_workers=0).setup()
    with pytest.raises(VebiError, match="no folder for class"):
        ImageNetDataModule(
            tmp_path, classes=[WNIDS[5]], synsets=tmp_path / "LOC_synset_mapping.txt"
        ).setup()
    with pytest.raises(VebiError, match="not ILSVRC classes"):
        ImageNetDataModule(
            tmp_path, classes=["n99999999"], synsets=tmp_path / "LOC_synset_mapping.txt"
        ).setup()
    with pytest.raises(VebiError, match="label_space must be"):
        ImageNetDataModule(tmp_path, label_space="coco")


def _common(tmp_path: Path, synsets: Path) -> list[str]:
    return [
        "experiment=imagenet",
        "model=resnet18",
        "model_source.allow_random_init=true",
        "model.net.pretrained=false",
        f"data.root={tmp_path / 'ilsvrc'}",
        f"data.synsets={synsets}",
        "data.image_size=64",
        "data.num_workers=0",
        f"paths.log_dir={tmp_path / 'logs'}",
        "logger=none",
        "trainer.accelerator=cpu",
    ]


@pytest.mark.slow  # end to end through processes: make acceptance
def test_mine_and_explain_a_model_without_checkpoint(tmp_path: Path) -> None:
    """mine.py and explain.py on a 1000-class torchvision ResNet-18 built from its config
    (random weights, offline), on three ILSVRC classes: no training, no checkpoint."""
    synsets = write_ilsvrc(tmp_path / "ilsvrc")
    common = _common(tmp_path, synsets)
    mined = run_cli("mine.py", *common, "mining.progress=false", "interpretation.top_n=2")
    assert mined.returncode == 0, mined.stderr[-3000:]
    assert "no checkpoint" in mined.stdout and "random weights" in mined.stdout
    # one view per tensor: the stem's relu, its max pool, 8 blocks (2688 and 13 with every view)
    assert "Mining 2048 features of 10 layers for 1000 classes" in mined.stdout
    features = sorted((tmp_path / "logs").glob("mine/imagenet/*/relevant_features.h5"))
    assert len(features) == 1
    summary = json.loads(features[0].with_suffix(".json").read_text())
    assert summary["mu"] == 10.0 and summary["class_counts"][7] == 5
    galleries = sorted(p.name for p in features[0].parent.glob("galleries/class_*.png"))
    assert [name.split("_")[1] for name in galleries if not name.endswith("_top.png")] == [
        "281",
        "7",
        "999",
    ]
    assert sum(name.endswith("_top.png") for name in galleries) == 3
    explained = run_cli(
        "explain.py", *common, f"relevant_features={features[0]}", "num_images=2", "target=281"
    )
    assert explained.returncode == 0, explained.stderr[-3000:]
    records = json.loads(
        next(
            (tmp_path / "logs").glob("explain/imagenet/*/explanations/explanations.json")
        ).read_text()
    )
    assert records["checkpoint"] is None and "resnet18" in records["model"]
    assert [r["class_id"] for r in records["explanations"]] == [281, 281]


def test_random_weights_need_consent_and_state_dicts_load(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from vebi.models import TorchvisionClassifier
    from vebi.pipelines.common import load_model

    cfg = OmegaConf.create(
        {
            "model_source": {"from": "config", "state_dict": None, "allow_random_init": False},
            "model": {
                "num_classes": 3,
                "class_names": None,
                "net": {
                    "_target_": "vebi.models.TorchvisionClassifier",
                    "architecture": "resnet18",
                    "num_classes": 3,
                    "pretrained": False,
                },
            },
        }
    )
    with pytest.raises(VebiError, match="random weights.*allow_random_init=true"):
        load_model(cfg)
    torch.manual_seed(1)
    saved = TorchvisionClassifier("resnet18", num_classes=3)
    # a torchvision state_dict (no vebi wrapper) fits the network inside the wrapper
    torch.save(saved.net.state_dict(), tmp_path / "resnet18.pth")
    cfg.model_source.state_dict = str(tmp_path / "resnet18.pth")
    model = load_model(cfg)
    assert model.ckpt_path is None and "weights from" in model.source
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(model.net.state_dict()[name], value)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    cfg.model_source.state_dict = str(tmp_path / "other.pth")
    with pytest.raises(VebiError, match="does not fit model.net"):
        load_model(cfg)
    cfg.model_source["from"] = "nowhere"
    with pytest.raises(VebiError, match="model_source.from must be"):
        load_model(cfg)


@pytest.mark.parametrize("config_name", ["mine", "explain", "evaluate"])
def test_imagenet_experiment_takes_the_model_from_its_config(compose_cfg, config_name) -> None:
    cfg = compose_cfg(config_name, ["experiment=imagenet"])
    assert cfg.model_source["from"] == "config" and cfg.model.net.pretrained is True
    assert cfg.data.label_space == "imagenet" and cfg.model.num_classes == 1000
    default = compose_cfg(config_name, [])
    assert default.model_source["from"] == "checkpoint"
