"""Training job: fit a classifier, keep the best checkpoint, test it, log to W&B."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from vebi.checkpoint import read_checkpoint
from vebi.errors import VebiError
from vebi.explain.rules import check_rule_coverage
from vebi.mining.callback import FeatureMiningCallback, mining_datasets
from vebi.pipelines.common import NO_GALLERIES, make_galleries, run_settings
from vebi.utils.cli import finish_loggers, wandb_run_dir
from vebi.utils.instantiate import (
    flat_config,
    instantiate_callbacks,
    instantiate_checked,
    instantiate_loggers,
    instantiate_trainer,
)
from vebi.utils.log import get_logger

log = get_logger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit ``cfg.model`` on ``cfg.data``, then test the best checkpoint on the test split.

    Returns the final metrics plus ``best_checkpoint``, ``output_dir`` and ``wandb_dir``.
    """
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs is not None and max_epochs < 1 and (cfg.trainer.get("max_steps") or -1) < 1:
        raise VebiError(
            f"trainer.max_epochs must be >= 1, got {max_epochs} (Lightning reads -1 as 'train "
            "forever'); to train by steps set trainer.max_steps instead"
        )
    resume = cfg.get("ckpt_path")
    if resume:
        # the project's safe reader first (weights_only=True, whatever the environment says):
        # a resume file with code in it is refused before Lightning opens it
        read_checkpoint(resume)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate_checked(cfg.data, L.LightningDataModule, "data")
    model = instantiate(cfg.model)
    if getattr(datamodule, "num_classes", model.hparams.num_classes) != model.hparams.num_classes:
        raise VebiError(
            f"the data has {datamodule.num_classes} classes but model.num_classes is "
            f"{model.hparams.num_classes}"
        )
    model.run_settings = run_settings(cfg, datamodule)  # stored in its checkpoints
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    galleries = (cfg.get("interpretation") or {}).get("galleries", True)
    if galleries and any(isinstance(c, FeatureMiningCallback) for c in callbacks):
        check_rule_coverage(model.net, hint=NO_GALLERIES)  # galleries need backward rules
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = instantiate_trainer(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    for logger in loggers:
        logger.log_hyperparams(flat_config(cfg))

    failed = True
    try:
        started = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
        train_seconds = time.perf_counter() - started
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if cfg.get("test"):
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        metrics["train_seconds"] = train_seconds
        for logger in loggers:
            logger.log_metrics({"train_seconds": train_seconds})
        mining = next((c for c in callbacks if isinstance(c, FeatureMiningCallback)), None)
        if mining and mining.report:  # every process: galleries rank all shards' images
            make_galleries(
                cfg,
                model.net,
                mining.report,
                mining_datasets(datamodule)[0],
                mining.output_dir / "galleries",
                loggers,
            )
            mining.miner.release(mining.report)
        result = {
            **metrics,
            "relevant_features": str(mining.artefact_path)
            if mining and mining.artefact_path
            else None,
            "best_checkpoint": best,
            "output_dir": str(Path(cfg.paths.output_dir)),
            "wandb_dir": wandb_run_dir(loggers),
        }
        failed = False
    finally:
        finish_loggers(loggers, failed=failed)
    _print_summary(result)
    return result


def _print_summary(result: dict[str, Any]) -> None:
    lines = ["", "Training finished"]
    lines.append(f"  time:             {result['train_seconds']:.0f} s")
    if "val/acc_best" in result:
        lines.append(f"  best val acc:     {100 * result['val/acc_best']:.2f}%")
    if "test/acc" in result:
        lines.append(f"  test acc:         {100 * result['test/acc']:.2f}%")
    lines.append(f"  best checkpoint:  {result['best_checkpoint'] or '(none saved)'}")
    if result.get("relevant_features"):
        lines.append(f"  mined features:   {result['relevant_features']}")
    lines.append(f"  run files:        {result['output_dir']}")
    if result["wandb_dir"]:
        lines.append(f"  W&B run:          {result['wandb_dir']}")
    log.info("\n".join(lines))
