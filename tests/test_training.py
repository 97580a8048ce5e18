"""Training through Hydra + Lightning on real MNIST digits, W&B offline, checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.payloads import TouchOnLoad
from tests.wandb_offline import logged_values
from vebi import load_classifier
from vebi.checkpoint import build_network
from vebi.data import MNISTDataModule
from vebi.errors import CheckpointError
from vebi.pipelines.train import train


def test_fast_dev_run_on_small_subset(compose_cfg, mnist_root: Path) -> None:
    cfg = compose_cfg(
        "train",
        [
            "experiment=mnist",
            f"paths.data_dir={mnist_root}",
            "data.train_subset=256",
            "data.batch_size=32",
            "+trainer.fast_dev_run=true",
            "logger=csv",
        ],
    )
    result = train(cfg)
    assert torch.isfinite(torch.tensor(result["train/loss_epoch"]))
    assert 0.0 <= result["test/acc"] <= 1.0


def test_short_training_learns_and_checkpoints(short_run: dict) -> None:
    assert short_run["test/acc"] > 0.9  # one epoch on 4k digits; chance is 0.1
    assert Path(short_run["best_checkpoint"]).is_file()
    assert Path(short_run["best_checkpoint"]).parent.parent == Path(short_run["output_dir"])


def test_wandb_offline_run_holds_test_accuracy(short_run: dict) -> None:
    run_dir = Path(short_run["wandb_dir"])
    assert run_dir.is_dir() and run_dir.name.startswith("offline-run-")
    assert run_dir.parent.parent == Path(short_run["output_dir"])
    values = logged_values(run_dir)
    assert values["test/acc"][-1] == pytest.approx(short_run["test/acc"], abs=1e-6)
    for key in ("train/loss_epoch", "val/acc", "val/acc_best", "test/loss"):
        assert key in values


def test_load_classifier_matches_trained_model(short_run: dict, mnist_root: Path) -> None:
    model = load_classifier(short_run["best_checkpoint"])
    assert not model.training
    datamodule = MNISTDataModule(data_dir=mnist_root)
    datamodule.setup()
    images, labels = datamodule.data_test.tensors
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    # the same checkpoint tested inside the training run
    assert accuracy == pytest.approx(short_run["test/acc"], abs=1e-6)
    assert images.min() >= 0 and images.max() <= 1  # plain [0, 1] images, no preprocessing


def test_checkpoint_cannot_run_code(short_run: dict, tmp_path: Path) -> None:
    checkpoint = torch.load(short_run["best_checkpoint"], weights_only=True)
    marker = tmp_path / "code-ran"
    checkpoint["payload"] = TouchOnLoad(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(checkpoint, evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_classifier(evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # sanity: a plain load does run the payload
    assert marker.exists()


def test_checkpoint_architecture_must_be_trusted(short_run: dict, tmp_path: Path) -> None:
    checkpoint = torch.load(short_run["best_checkpoint"], weights_only=True)
    checkpoint["vebi"]["architecture"] = {"_target_": "os.system", "command": "echo pwned"}
    bad = tmp_path / "bad.ckpt"
    torch.save(checkpoint, bad)
    with pytest.raises(CheckpointError, match="outside the trusted packages"):
        load_classifier(bad)
    with pytest.raises(CheckpointError, match="interpolation"):
        build_network({"_target_": "vebi.models.LeNet", "num_classes": "${oc.env:HOME}"})
    with pytest.raises(CheckpointError, match="not a nn.Module"):
        build_network({"_target_": "torch.nn.functional.relu"})


def test_missing_or_broken_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_classifier(tmp_path / "nope.ckpt")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read|refusing"):
        load_classifier(broken)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        torch.save({"weights": torch.zeros(1)}, broken)
        load_classifier(broken)


def test_module_built_from_configs_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    """A ClassifierModule made outside train.py, from the network's config, stores that config:
    load_classifier rebuilds the same network from the checkpoint alone."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from vebi.modules import ClassifierModule

    module = ClassifierModule(
        net={"_target_": "vebi.models.LeNet", "num_classes": 10},
        num_classes=10,
        optimizer={"_target_": "torch.optim.SGD", "lr": 0.01},
    )
    assert module.architecture == {"_target_": "vebi.models.LeNet", "num_classes": 10}
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(16, 1, 28, 28, generator=generator)
    data = DataLoader(TensorDataset(images, torch.arange(16) % 10), batch_size=8)
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, train_dataloaders=data)
    path = tmp_path / "made_anywhere.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_classifier(path)
    with torch.no_grad():
        assert torch.equal(loaded(images), module.eval()(images))
