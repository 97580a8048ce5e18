"""Mining job: relevant features of an existing checkpoint, without training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from vebi.explain.rules import Rules, check_rule_coverage
from vebi.mining.callback import mining_datasets
from vebi.mining.miner import FeatureMiner
from vebi.mining.reporting import console_summary, save_and_log
from vebi.pipelines.common import NO_GALLERIES, load_model, make_galleries, rule_probe
from vebi.pipelines.report import report_run
from vebi.utils.cli import finish_loggers, wandb_run_dir
from vebi.utils.instantiate import (
    device_for,
    flat_config,
    instantiate_checked,
    instantiate_loggers,
)
from vebi.utils.log import get_logger
from vebi.utils.signals import JobProgress

log = get_logger(__name__)


def mine(cfg: DictConfig) -> dict[str, Any]:
    """Load the network (checkpoint or config), mine on the data's training split, save and log
    the artefact."""
    datamodule = instantiate_checked(cfg.data, L.LightningDataModule, "data")
    model = load_model(cfg, datamodule)
    module = model.module.to(device_for(cfg.trainer))
    datamodule.prepare_data()
    datamodule.setup("fit")
    miner = instantiate_checked(cfg.mining, FeatureMiner, "mining")
    loggers = instantiate_loggers(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams({**flat_config(cfg), "model": model.source})
    galleries = (cfg.get("interpretation") or {}).get("galleries", True)
    planned = ["mining", "saving the relevant features", *(["galleries"] if galleries else [])]
    failed = True
    progress = JobProgress("mine.py", planned)
    try:
        dataset, val_dataset = mining_datasets(datamodule)
        rules = Rules.from_config(cfg.get("rules"))  # the galleries' backward rules
        if galleries:
            check_rule_coverage(
                module.net, rules, hint=NO_GALLERIES, images=rule_probe(module.net, datamodule)
            )
        if miner.cache_dir is not None:
            progress.keep(
                f"the activation cache keeps its complete chunks in {miner.cache_dir}: run "
                "the same command again to resume"
            )
        report = miner.mine(module.net, dataset, val_dataset, module.class_names)
        progress.done("mining")
        path = save_and_log(report, Path(cfg.paths.output_dir), loggers)
        progress.done("saving the relevant features", str(path))
        make_galleries(
            cfg,
            module.net,
            report,
            dataset,
            Path(cfg.paths.output_dir) / "galleries",
            loggers,
            datamodule,
            rules,
        )
        progress.done("galleries")
        miner.release(report)
        page = report_run(cfg.paths.output_dir, loggers)
        wandb_dir = wandb_run_dir(loggers)
        failed = False
    finally:
        finish_loggers(loggers, failed=failed)
    log.info(
        "\n%s\n\n  relevant features: %s\n  report: %s\n  W&B run: %s",
        console_summary(report.relevant),
        path,
        page,
        wandb_dir,
    )
    return {"relevant_features": str(path), "timings": report.timings}
