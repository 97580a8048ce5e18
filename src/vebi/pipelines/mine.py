"""Mining job: relevant features of an existing checkpoint, without training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from vebi.checkpoint import load_classifier
from vebi.explain.interpretation import interpret_and_log
from vebi.mining.callback import mining_datasets
from vebi.mining.reporting import console_summary, save_and_log
from vebi.pipelines.common import resolve_checkpoint
from vebi.utils.cli import finish_loggers, wandb_run_dir
from vebi.utils.instantiate import device_for, flat_config, instantiate_loggers

log = logging.getLogger(__name__)


def mine(cfg: DictConfig) -> dict[str, Any]:
    """Load the checkpoint, mine on the data's training split, save and log the artefact."""
    ckpt_path = resolve_checkpoint(cfg)
    module = load_classifier(ckpt_path)
    module = module.to(device_for(cfg.trainer))
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    miner = instantiate(cfg.mining)
    loggers = instantiate_loggers(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams({**flat_config(cfg), "ckpt_path": str(ckpt_path)})
    failed = True
    try:
        dataset, val_dataset = mining_datasets(datamodule)
        report = miner.mine(module.net, dataset, val_dataset, module.class_names)
        path = save_and_log(report, Path(cfg.paths.output_dir), loggers)
        if cfg.get("galleries", True) and report.cache_path is not None:
            interpret_and_log(
                module.net,
                report.relevant,
                dataset,
                report.cache_path,
                Path(cfg.paths.output_dir) / "galleries",
                loggers,
                cfg.get("gallery_top_n", 20),
            )
        wandb_dir = wandb_run_dir(loggers)
        failed = False
    finally:
        finish_loggers(loggers, failed=failed)
    print("\n" + console_summary(report.relevant), flush=True)
    print(f"\n  relevant features: {path}\n  W&B run: {wandb_dir}", flush=True)
    return {"relevant_features": str(path), "timings": report.timings}
