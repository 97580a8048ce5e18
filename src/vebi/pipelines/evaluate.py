"""Evaluation job: test a trained checkpoint and record the results in the run dir and W&B."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from vebi.checkpoint import load_classifier, newest_checkpoint
from vebi.errors import VebiError
from vebi.mining.miner import model_fingerprint
from vebi.mining.relevant import RelevantFeatures
from vebi.mining.reporting import ARTEFACT_NAME, console_summary
from vebi.modules.classifier import ClassifierModule
from vebi.utils.cli import finish_loggers, wandb_run_dir
from vebi.utils.instantiate import flat_config, instantiate_loggers
from vebi.utils.io import atomic_path

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


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test the checkpoint on the test split; write ``results.json`` and ``results.md``."""
    ckpt_path = resolve_checkpoint(cfg)
    model = load_classifier(ckpt_path)
    datamodule = instantiate(cfg.data)
    data_classes = getattr(datamodule, "num_classes", None)
    if data_classes is not None and data_classes != model.hparams.num_classes:
        raise VebiError(
            f"{ckpt_path} predicts {model.hparams.num_classes} classes but the data "
            f"({cfg.data._target_}) has {data_classes}: pick the matching experiment=..."
        )
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[])
    for logger in loggers:
        logger.log_hyperparams({**flat_config(cfg), "ckpt_path": str(ckpt_path)})
    failed = True
    try:
        (metrics,) = trainer.test(model, datamodule=datamodule)
        num_test = len(datamodule.test_dataloader().dataset)
        if num_test == 0:
            raise VebiError("the test split is empty: nothing to evaluate")
        wandb_dir = wandb_run_dir(loggers)
        failed = False
    finally:
        finish_loggers(loggers, failed=failed)
    result = {
        "checkpoint": str(ckpt_path),
        "num_test_images": num_test,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "output_dir": str(Path(cfg.paths.output_dir)),
        "wandb_dir": wandb_dir,
    }
    _write_results(result, Path(cfg.paths.output_dir))
    acc = result["metrics"].get("test/acc")
    print(
        "\nEvaluation finished\n"
        f"  checkpoint:  {ckpt_path}\n"
        + (
            f"  test acc:    {100 * acc:.2f}% on {num_test} test images\n"
            if acc is not None
            else ""
        )
        + f"  run files:   {result['output_dir']}\n"
        + (f"  W&B run:     {result['wandb_dir']}\n" if result["wandb_dir"] else ""),
        flush=True,
    )
    _report_mined_features(ckpt_path, model)
    return result


def _report_mined_features(ckpt_path: Path, model: ClassifierModule) -> None:
    """Reload and print the relevant features mined in the checkpoint's training run, if any."""
    path = ckpt_path.parent.parent / "mining" / ARTEFACT_NAME
    if not path.is_file():
        return
    relevant = RelevantFeatures.load(path)
    print(console_summary(relevant), flush=True)
    print(f"  (reloaded from {path})", flush=True)
    if relevant.fingerprint.get("model") != model_fingerprint(model.net):
        print("  warning: these features were mined from different weights", flush=True)


def _write_results(result: dict[str, Any], output_dir: Path) -> None:
    with atomic_path(output_dir / "results.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in result["metrics"].items())
    table = (
        f"# Evaluation of `{result['checkpoint']}`\n\n"
        f"{result['num_test_images']} test images.\n\n| metric | value |\n|---|---|\n{rows}\n"
    )
    with atomic_path(output_dir / "results.md") as tmp:
        tmp.write_text(table)
