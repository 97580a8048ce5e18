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
from vebi.pipelines.common import (
    NO_GALLERIES,
    check_class_count,
    instantiate_data,
    load_model,
    make_galleries,
    rule_probe,
)
from vebi.pipelines.report import report_run
from vebi.utils.instantiate import device_for, instantiate_checked
from vebi.utils.log import get_logger
from vebi.utils.task import task

log = get_logger(__name__)


def mine(cfg: DictConfig) -> dict[str, Any]:
    """Load the network (checkpoint or config), mine on the data's training split, save and log
    the artefact."""
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    datamodule = instantiate_data(cfg.data)
    model = load_model(cfg, datamodule)
    module = model.module.to(device_for(cfg.trainer))
    datamodule.prepare_data()
    datamodule.setup("fit")
    check_class_count(module, datamodule, model.source)  # the folders are read now
    miner = instantiate_checked(cfg.mining, FeatureMiner, "mining")
    galleries = (cfg.get("interpretation") or {}).get("galleries", True)
    planned = ["mining", "saving the relevant features", *(["galleries"] if galleries else [])]
    with task(cfg, "mine.py", planned, model=model.source) as run:
        dataset, val_dataset = mining_datasets(datamodule)
        rules = Rules.from_config(cfg.get("rules"))  # the galleries' backward rules
        if galleries:
            check_rule_coverage(
                module.net, rules, hint=NO_GALLERIES, images=rule_probe(module.net, datamodule)
            )
        if miner.cache_dir is not None:
            run.progress.keep(
                f"the activation cache keeps its complete chunks in {miner.cache_dir}: run "
                "the same command again to resume"
            )
        report = miner.mine(module.net, dataset, val_dataset, module.class_names)
        run.progress.done("mining")
        path = save_and_log(report, Path(cfg.paths.output_dir), run.loggers)
        run.progress.done("saving the relevant features", str(path))
        make_galleries(
            cfg,
            module.net,
            report,
            dataset,
            Path(cfg.paths.output_dir) / "galleries",
            run.loggers,
            datamodule,
            rules,
        )
        run.progress.done("galleries")
        miner.release(report)
        page = report_run(cfg.paths.output_dir, run.loggers)
        wandb_dir = run.wandb_dir
    log.info(
        "\n%s\n\n  relevant features: %s\n  report: %s\n  W&B run: %s",
        console_summary(report.relevant),
        path,
        page,
        wandb_dir,
    )
    return {"relevant_features": str(path), "timings": report.timings}
