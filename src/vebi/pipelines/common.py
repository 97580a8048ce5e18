"""What the jobs share: finding a checkpoint and its mined features, making galleries."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from vebi.checkpoint import newest_checkpoint
from vebi.errors import VebiError
from vebi.explain.interpretation import interpret_and_log
from vebi.mining.miner import MiningReport
from vebi.mining.reporting import ARTEFACT_NAME
from vebi.utils.log import get_logger

log = get_logger(__name__)


def resolve_checkpoint(cfg: DictConfig) -> Path:
    """``cfg.ckpt_path`` if given, else the newest best checkpoint of ``cfg.experiment_name``."""
    if cfg.get("ckpt_path"):
        return Path(cfg.ckpt_path)
    runs = Path(cfg.paths.log_dir) / "train" / cfg.experiment_name
    path = newest_checkpoint(runs)
    log.info("Using the newest checkpoint of experiment %r: %s", cfg.experiment_name, path)
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


#: How to go on when the model has layers that the galleries' backward rules do not cover.
NO_GALLERIES = "; or go on without the interpretation galleries: interpretation.galleries=false"


def make_galleries(
    cfg: DictConfig,
    net: nn.Module,
    report: MiningReport,
    dataset: Dataset,
    folder: Path,
    loggers: list[Logger],
) -> list[Path]:
    """The interpretation galleries of a mining run when ``interpretation.galleries`` is on
    (and the activation cache that ranks the images was kept); their paths."""
    settings = cfg.get("interpretation") or {}
    if not settings.get("galleries", True) or report.cache_path is None:
        return []
    paths = interpret_and_log(
        net,
        report.relevant,
        dataset,
        report.cache_path,
        folder,
        loggers,
        int(settings.get("top_n", 20)),
    )
    log.info("Interpretation galleries: %s", folder)
    return paths
