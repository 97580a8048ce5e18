"""The README's main job, end to end: train.py experiment=mnist, then evaluate.py (slow)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.wandb_offline import logged_values
from vebi import load_classifier
from vebi.checkpoint import newest_checkpoint
from vebi.data import MNISTDataModule


def _percent(pattern: str, text: str) -> float:
    match = re.search(pattern + r"\s+([0-9.]+)%", text)
    assert match, f"no {pattern!r} line in:\n{text[-3000:]}"
    return float(match.group(1))


@pytest.mark.slow
def test_mnist_experiment_reaches_99_percent(mnist_root: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    common = [f"paths.data_dir={mnist_root}", f"paths.log_dir={logs}"]
    common += [f"mining.cache_dir={tmp_path / 'cache'}"]
    trained = run_cli("train.py", "experiment=mnist", *common, timeout=1800)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert _percent("test acc:", trained.stdout) >= 99.0

    checkpoint = newest_checkpoint(logs / "train" / "mnist")
    assert f"best checkpoint:  {checkpoint}" in trained.stdout
    (wandb_dir,) = (checkpoint.parent.parent / "wandb").glob("offline-run-*")
    assert logged_values(wandb_dir)["test/acc"][-1] >= 0.99

    evaluated = run_cli("evaluate.py", "experiment=mnist", *common, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert str(checkpoint) in evaluated.stdout
    assert _percent("test acc:", evaluated.stdout) >= 99.0
    # the run ends with the mined features per class, reloaded from the training run's artefact
    assert "Relevant features (mu = 10, 640 features)" in evaluated.stdout  # one view per tensor
    assert all(f"class {digit}:" in evaluated.stdout for digit in range(10))
    assert (checkpoint.parent.parent / "mining" / "relevant_features.h5").is_file()
    (results,) = (logs / "evaluate" / "mnist").glob("*/results.json")
    evaluation = json.loads(results.read_text())
    assert evaluation["metrics"]["test/acc"] >= 0.99
    # the mined features matter: zeroing them costs their class several times what random sets
    # of the same size and layers cost (recorded: 0.98 vs 0.09 points), the others little
    ablation = evaluation["ablation"]["average"]
    assert ablation["drop_own"] > 3 * ablation["random_drop_own_mean"] + 0.003
    assert ablation["drop_others"] < 0.01
    # and our maps remove the evidence faster than random ones
    methods = evaluation["heatmaps"]["methods"]
    assert methods["vebi"]["deletion_auc"] < methods["uniform_random"]["deletion_auc"]

    # the public loader on plain [0, 1] images of the 10k real test digits
    model = load_classifier(checkpoint)
    datamodule = MNISTDataModule(data_dir=mnist_root)
    datamodule.setup()
    images, labels = datamodule.data_test.tensors
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert len(labels) == 10000 and accuracy >= 0.99


@pytest.mark.slow
def test_an8flower_double_generates_data_and_reaches_95_percent(tmp_path: Path) -> None:
    """Generation on first use, training, mining: the an8Flower acceptance run."""
    result = run_cli(
        "train.py",
        "experiment=an8flower_double",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"mining.cache_dir={tmp_path / 'cache'}",
        "logger=csv",
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _percent("test acc:", result.stdout) >= 95.0
    images = tmp_path / "data" / "an8flower_double"
    assert len(list(images.iterdir())) == 12
    assert len(list((tmp_path / "data" / "an8flower_double_MASK").rglob("*.png"))) == 3600
    (artefact,) = (tmp_path / "logs" / "train" / "an8flower_double").glob(
        "*/mining/relevant_features.h5"
    )
    assert artefact.is_file()
    # the checkpoint carries its settings: explain.py needs no experiment= to read 3 x 112 px
    # photos and files its run under the checkpoint's experiment
    (checkpoint,) = (tmp_path / "logs" / "train" / "an8flower_double").glob(
        "*/checkpoints/best.ckpt"
    )
    photo = next(images.rglob("*.png"))
    result = run_cli(
        "explain.py",
        f"ckpt_path={checkpoint}",
        f"input={photo}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "logger=none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "was trained with experiment=an8flower_double" in result.stderr
    (record,) = (tmp_path / "logs" / "explain" / "an8flower_double").glob(
        "*/explanations/explanations.json"
    )
    assert json.loads(record.read_text())["explanations"][0]["image"] == photo.name
