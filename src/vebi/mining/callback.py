"""A Lightning callback that mines the relevant features once training has finished."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from vebi.checkpoint import read_checkpoint
from vebi.errors import VebiError
from vebi.mining.miner import FeatureMiner, MiningReport
from vebi.mining.reporting import console_summary, save_and_log
from vebi.utils.log import get_logger

log = get_logger(__name__)


def mining_datasets(datamodule: object) -> tuple[torch.utils.data.Dataset, Any]:
    """(training images without augmentation, validation images or None) of a data module.

    Data modules provide ``mining_dataset()`` (training split, eval transforms); as a fallback
    ``data_train`` is used. The validation set is ``data_val`` when present.
    """
    if hasattr(datamodule, "mining_dataset"):
        dataset = datamodule.mining_dataset()
    elif (data_train := getattr(datamodule, "data_train", None)) is not None:
        dataset = data_train
    else:
        raise VebiError(
            f"{type(datamodule).__name__} offers no mining_dataset() or data_train to mine on"
        )
    return dataset, getattr(datamodule, "data_val", None)


class FeatureMiningCallback(Callback):
    """After ``fit``: mine relevant features with ``miner``; save and log them (rank 0).

    With ``use_best_checkpoint`` the weights of the best checkpoint are loaded first, so the
    mined features belong to the model that is tested and shipped. The report stays on
    ``self.report`` (and the saved file on ``self.artefact_path``) for the training job, which
    makes the interpretation galleries from it. Skipped under ``fast_dev_run``.
    """

    def __init__(
        self, miner: FeatureMiner, output_dir: str, use_best_checkpoint: bool = True
    ) -> None:
        self.miner = miner
        self.output_dir = Path(output_dir)
        self.use_best_checkpoint = use_best_checkpoint
        self.report: MiningReport | None = None
        self.artefact_path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # set on the Trainer by Lightning's connectors, which its annotations do not declare
        if getattr(trainer, "fast_dev_run", False):
            log.info("fast_dev_run: feature mining skipped")
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if self.use_best_checkpoint and best:
            pl_module.load_state_dict(read_checkpoint(best, pl_module.device)["state_dict"])
        dataset, val_dataset = mining_datasets(getattr(trainer, "datamodule", None))
        model = getattr(pl_module, "net", pl_module)
        self.report = self.miner.mine(
            model, dataset, val_dataset, getattr(pl_module, "class_names", None)
        )
        if trainer.is_global_zero:
            self.artefact_path = save_and_log(self.report, self.output_dir, list(trainer.loggers))
            log.info("\n%s", console_summary(self.report.relevant))
