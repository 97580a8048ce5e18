"""A checkpoint is data: its stored run settings cannot run code, touch files or redirect a
run's outputs (mine.py / explain.py / evaluate.py append them to Hydra's overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import run_cli
from vebi.checkpoint import check_data_override, check_settings
from vebi.errors import CheckpointError, VebiError
from vebi.explain.rules import Rules
from vebi.models import LeNet
from vebi.pipelines.common import with_checkpoint_settings
from vebi.utils.instantiate import check_target

GOOD = {
    "experiment": "mnist",
    "data": "mnist",
    "data_overrides": ["data.train_subset=4000"],
    "experiment_name": "mnist",
    "image_shape": [1, 28, 28],
}


def lenet_checkpoint(path: Path, settings: Any) -> Path:
    """A vebi checkpoint of a (random) LeNet whose ``vebi.settings`` entry is ``settings``."""
    state = {f"net.{name}": value for name, value in LeNet().state_dict().items()}
    meta = {
        "num_classes": 10,
        "architecture": {"_target_": "vebi.models.LeNet", "num_classes": 10},
        "settings": settings,
    }
    torch.save({"state_dict": state, "vebi": meta}, path)
    return path


def hostile(victim: Path) -> dict[str, Any]:
    """Settings entries that each tried to run code, write elsewhere or escape the run dir."""
    return {
        "hydra callback that deletes a file": {
            **GOOD,
            "data_overrides": [
                "+hydra.callbacks.evil._target_=pathlib.Path.unlink",
                f"+hydra.callbacks.evil._args_=[{victim}]",
            ],
        },
        "run dir moved": {**GOOD, "data_overrides": [f"hydra.run.dir={victim.parent}/out"]},
        "data target replaced": {**GOOD, "data_overrides": ["data._target_=pathlib.Path.touch"]},
        "interpolation": {**GOOD, "data_overrides": ["data.data_dir=${oc.env:HOME}"]},
        "deletion": {**GOOD, "data_overrides": ["~data.batch_size"]},
        "sweep": {**GOOD, "data_overrides": ["data.batch_size=choice(1,2)"]},
        "unknown data key": {**GOOD, "data_overrides": ["data.evil=1"]},
        "non-string override": {**GOOD, "data_overrides": [{"_target_": "os.system"}]},
        "experiment path": {**GOOD, "experiment": "../../../tmp/evil"},
        "experiment with spaces": {**GOOD, "experiment": "mnist hydra.run.dir=/tmp"},
        "experiment that does not exist": {**GOOD, "experiment": "nonexistent"},
        "data config that does not exist": {**GOOD, "data": "evil"},
        "experiment name outside the log dir": {**GOOD, "experiment_name": "../../../../tmp/x"},
        "unknown settings key": {**GOOD, "hydra": {"run": {"dir": "/tmp"}}},
        "negative image shape": {**GOOD, "image_shape": [1, -28, 28]},
        "image shape of strings": {**GOOD, "image_shape": ["1", "28", "28"]},
        "settings not a mapping": ["+hydra.callbacks.evil._target_=os.system"],
    }


def test_valid_settings_pass_and_plain_overrides_parse() -> None:
    assert check_settings(GOOD, "x.ckpt") == GOOD
    assert check_settings(None, "x.ckpt") is None
    assert check_data_override("data.classes=[a,b]") == ("data.classes", ["a", "b"])
    assert check_data_override("data.batch_size=32") == ("data.batch_size", 32)


def test_every_hostile_setting_is_refused_before_anything_is_composed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for name, settings in hostile(victim).items():
        ckpt = lenet_checkpoint(tmp_path / "hostile.ckpt", settings)
        with pytest.raises(CheckpointError) as raised:
            with_checkpoint_settings(["mine.py", f"ckpt_path={ckpt}"])
        message = str(raised.value)
        assert str(ckpt) in message and "refusing its stored settings" in message, name
        assert victim.read_text() == "keep me"


@pytest.mark.slow  # end to end through processes: make acceptance
def test_hostile_checkpoint_through_the_cli_touches_nothing(tmp_path: Path) -> None:
    """The issue's attack, as a user would run it: mine.py and evaluate.py given the
    checkpoint exit 1 with one error line; the file is still there and nothing was written
    (not even the run dir)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    logs = tmp_path / "logs"
    attacks = hostile(victim)
    for script, attack in (
        ("mine.py", "hydra callback that deletes a file"),
        ("evaluate.py", "experiment name outside the log dir"),
    ):
        ckpt = lenet_checkpoint(tmp_path / f"{script}.ckpt", attacks[attack])
        result = run_cli(script, f"ckpt_path={ckpt}", f"paths.log_dir={logs}", "logger=none")
        assert result.returncode == 1, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(ckpt) in errors[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert victim.read_text() == "keep me"
        assert not logs.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "evaluate.py.ckpt",
        "mine.py.ckpt",
        "victim.txt",
    ]


def test_rule_and_metric_targets_are_checked_before_they_run(tmp_path: Path) -> None:
    """``rules.conv={_target_: pathlib.Path.touch, ...}`` used to create the file and then be
    refused as "not a vebi Rule": now nothing is called."""
    made = tmp_path / "made.txt"
    touch = {"_target_": "pathlib.Path.touch", "_args_": [str(made)]}
    with pytest.raises(VebiError, match="not a vebi.explain.rules.Rule class"):
        Rules.from_config({"conv": touch})
    with pytest.raises(VebiError, match="rules.extra"):
        Rules.from_config({"extra": [touch]})
    from vebi.evaluation.metric_base import HeatmapMetric

    with pytest.raises(VebiError, match="evaluation.metrics.evil"):
        check_target(touch, HeatmapMetric, "evaluation.metrics.evil")
    nested = {"_target_": "vebi.explain.rules.ZPlusConv", "epsilon": touch}
    with pytest.raises(VebiError, match="nested _target_"):
        Rules.from_config({"conv": nested})
    assert not made.exists()
    assert Rules.from_config({"conv": {"_target_": "vebi.explain.rules.ZPlusConv"}}).conv
