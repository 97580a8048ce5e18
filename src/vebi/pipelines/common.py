"""What the jobs that start from a trained checkpoint share: finding it and its mined features."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from vebi.checkpoint import newest_checkpoint
from vebi.errors import VebiError
from vebi.mining.reporting import ARTEFACT_NAME

log = logging.getLogger(__name__)


def resolve_checkpoint(cfg: DictConfig) -> Path:
    """``cfg.ckpt_path`` if given, else the newest best checkpoint of ``cfg.experiment_name``."""
    if cfg.get("ckpt_path"):
        return Path(cfg.ckpt_path)
    runs = Path(cfg.paths.log_dir) / "train" / cfg.experiment_name
    path = newest_checkpoint(runs)
    log.info("No ckpt_path given: using the newest checkpoint of %r", cfg.experiment_name)
    print(f"Using the newest checkpoint of experiment {cfg.experiment_name!r}: {path}", flush=True)
    return path


def mined_features_path(ckpt_path: Path) -> Path:
    """Where the training run of ``ckpt_path`` saved its relevant features."""
    return ckpt_path.parent.parent / "mining" / ARTEFACT_NAME


def relevant_features_for(ckpt_path: Path, explicit: str | None) -> Path:
    """The RelevantFeatures file: ``explicit``, else the one mined in the checkpoint's run."""
    path = Path(explicit) if explicit else mined_features_path(ckpt_path)
    if not path.is_file():
        raise VebiError(
            f"no relevant features at {path}: mine them first with "
            f"`python mine.py ckpt_path={ckpt_path}` and pass relevant_features=<its output>"
        )
    return path
