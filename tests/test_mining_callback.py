"""Mining inside training (the callback), mine.py on a checkpoint, and what reaches W&B."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.wandb_offline import logged_artifacts, logged_values
from vebi import load_classifier
from vebi.mining import RelevantFeatures
from vebi.mining.miner import model_fingerprint


def test_training_mines_the_best_checkpoint(short_run: dict) -> None:
    path = Path(short_run["relevant_features"])
    assert path == Path(short_run["output_dir"]) / "mining" / "relevant_features.h5"
    relevant = RelevantFeatures.load(path)
    assert relevant.layers == ("conv1", "pool1", "conv2", "pool2", "relu3")  # one view per tensor
    assert relevant.index.size == 640 and relevant.mu == 10.0  # 1140 with every view
    model = load_classifier(short_run["best_checkpoint"])
    assert relevant.fingerprint["model"] == model_fingerprint(model.net)
    for c in range(10):
        assert relevant.relevant(c), f"class {c} has no relevant feature"
    # the sparse classifier is a real classifier, next to the network's accuracy
    assert relevant.metrics["sparse_accuracy_val"] > 0.5
    assert relevant.metrics["network_accuracy_val"] > 0.9


def test_mining_reaches_wandb(short_run: dict) -> None:
    run_dir = Path(short_run["wandb_dir"])
    values = logged_values(run_dir)
    for key in (
        "mining/sparse_accuracy_val",
        "mining/network_accuracy_val",
        "mining/solve_seconds",
        "mining/extract_seconds",
    ):
        assert key in values, key
    relevant = RelevantFeatures.load(short_run["relevant_features"])
    # the per-class table holds one row per relevant feature; the per-layer table one per layer
    assert values["mining/relevant_features/_type"][-1] == "table-file"
    assert values["mining/relevant_features/nrows"][-1] == int(relevant.relevant_mask().sum())
    assert values["mining/per_layer/nrows"][-1] == len(relevant.layers)
    table = json.loads(
        (run_dir / "files" / values["mining/relevant_features/path"][-1]).read_text()
    )
    assert table["columns"] == ["class", "rank", "layer", "channel", "weight"]
    top = relevant.relevant(0)[0]
    assert ["0", 0, top.layer, top.channel, pytest.approx(top.weight)] in table["data"]
    assert values["mining/sparse_accuracy_val"][-1] == pytest.approx(
        relevant.metrics["sparse_accuracy_val"]
    )
    artifacts = logged_artifacts(run_dir)
    (name,) = [n for n, (kind, _) in artifacts.items() if kind == "relevant-features"]
    assert sorted(artifacts[name][1]) == [
        "relevant_features.h5",
        "relevant_features.json",
        "relevant_features.md",
    ]


@pytest.mark.slow  # end to end through processes: make acceptance
def test_mine_cli_on_existing_checkpoint(short_run: dict, mnist_root: Path, tmp_path: Path) -> None:
    result = run_cli(
        "mine.py",
        f"ckpt_path={short_run['best_checkpoint']}",
        f"paths.data_dir={mnist_root}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"mining.cache_dir={tmp_path / 'cache'}",
        "mining.progress=false",
        "data.train_subset=1000",
        "logger=csv",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Relevant features (mu = 10" in result.stdout and "class 9:" in result.stdout
    (artefact,) = (tmp_path / "logs" / "mine" / "mnist").glob("*/relevant_features.h5")
    relevant = RelevantFeatures.load(artefact)
    assert relevant.class_counts and sum(relevant.class_counts) == 1000
    assert np.isfinite(relevant.weights).all()


@pytest.mark.slow  # end to end through processes: make acceptance
def test_mine_cli_bad_settings_exit_nonzero(short_run: dict, tmp_path: Path) -> None:
    common = [
        f"ckpt_path={short_run['best_checkpoint']}",
        f"paths.log_dir={tmp_path}",
        "logger=none",
    ]
    result = run_cli("mine.py", *common, "mining.mu=0")
    assert result.returncode == 1 and "mu must be a positive number" in result.stderr
    result = run_cli("mine.py", *common, "mining.layers=[conv1,conv7]")
    assert result.returncode == 1 and "unknown layer(s) ['conv7']" in result.stderr
    assert "conv1, pool1, conv2" in result.stderr


def test_a_runs_features_are_mined_again_when_the_layer_settings_differ(
    short_run: dict, mnist_root: Path, tmp_path: Path, caplog
) -> None:
    """The training run's file is reused when this run's mining settings read the same layers
    (and mu); with mining.views=every (other layers) it is mined again, said so."""
    import logging

    from vebi.data import MNISTDataModule
    from vebi.mining import FeatureMiner
    from vebi.mining.reuse import load_or_mine

    saved = Path(short_run["relevant_features"])
    net = load_classifier(short_run["best_checkpoint"]).net
    names = [str(c) for c in range(10)]

    def obtain(**options):
        miner = FeatureMiner(mu=10.0, cache_dir=tmp_path / "cache", progress=False, **options)
        data = MNISTDataModule(data_dir=mnist_root, train_subset=600, val_size=200)
        return load_or_mine(miner, net, names, data, saved, False, tmp_path / "out")

    relevant, path, how = obtain()
    assert how == "loaded" and path == saved
    with caplog.at_level(logging.INFO):
        relevant, path, how = obtain(views="every")
    assert how == "mined" and path == tmp_path / "out" / "relevant_features.h5"
    assert relevant.index.size == 1140 and "relu3" in relevant.layers
    assert "this run's mining settings" in caplog.text and "mining again" in caplog.text
