"""Training job: fit a classifier, keep the best checkpoint, test it, log to W&B."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from vebi.checkpoint import read_checkpoint
from vebi.data.base import lightning_data
from vebi.errors import VebiError
from vebi.explain.rules import Rules, check_rule_coverage
from vebi.mining.callback import FeatureMiningCallback, mining_datasets
from vebi.modules.classifier import ClassifierModule
from vebi.pipelines.common import (
    NO_GALLERIES,
    instantiate_data,
    make_galleries,
    rule_probe,
    run_settings,
)
from vebi.pipelines.report import report_run
from vebi.utils.instantiate import (
    instantiate_callbacks,
    instantiate_trainer,
)
from vebi.utils.io import atomic_path, strict_json
from vebi.utils.log import get_logger
from vebi.utils.signals import InterruptCheckpoint, JobProgress, interrupted_training
from vebi.utils.task import task

log = get_logger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit ``cfg.model`` on ``cfg.data``, then test the best checkpoint on the test split.

    Returns the final metrics plus ``best_checkpoint``, ``output_dir`` and ``wandb_dir``.
    """
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs is not None and max_epochs < 1 and (cfg.trainer.get("max_steps") or -1) < 1:
        raise VebiError(
            f"trainer.max_epochs must be >= 1, got {max_epochs} (Lightning reads -1 as 'train "
            "forever'); to train by steps add +trainer.max_steps=<steps> instead"
        )
    resume = cfg.get("ckpt_path")
    if resume:
        # the project's safe reader first (weights_only=True, whatever the environment says):
        # a resume file with code in it is refused before Lightning opens it
        read_checkpoint(resume)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate_data(cfg.data)
    model = instantiate(cfg.model)  # its optimiser and scheduler are torch classes
    if not isinstance(model, ClassifierModule):
        raise VebiError(
            f"model: _target_ {cfg.model.get('_target_')!r} made a {type(model).__name__}, not "
            "a vebi.modules.ClassifierModule: wrap the network as model.net of one"
        )
    if datamodule.num_classes != model.hparams.num_classes:
        raise VebiError(
            f"the data has {datamodule.num_classes} classes but model.num_classes is "
            f"{model.hparams.num_classes}"
        )
    model.run_settings = run_settings(cfg, datamodule)  # stored in its checkpoints
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    interrupt = InterruptCheckpoint(Path(cfg.paths.output_dir) / "checkpoints")
    callbacks.append(interrupt)  # a signal during the training loop saves a resumable one
    galleries = (cfg.get("interpretation") or {}).get("galleries", True)
    mining = next((c for c in callbacks if isinstance(c, FeatureMiningCallback)), None)
    rules = Rules.from_config(cfg.get("rules"))  # the galleries' backward rules
    if galleries and mining:
        probe = rule_probe(model.net, datamodule)
        check_rule_coverage(model.net, rules, hint=NO_GALLERIES, images=probe)
    planned = ["training", *(["mining"] if mining else []), *(["test"] if cfg.get("test") else [])]
    planned += ["galleries"] if mining and galleries else []
    with task(cfg, "train.py", planned) as run:
        trainer: L.Trainer = instantiate_trainer(
            cfg.trainer, callbacks=callbacks, logger=run.loggers or False
        )
        started = time.perf_counter()
        _fit(trainer, model, lightning_data(datamodule), resume, interrupt, run.progress)
        train_seconds = time.perf_counter() - started
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        best = _best_checkpoint(trainer)
        if mining and mining.report:
            run.progress.done("mining", str(mining.artefact_path))
        if cfg.get("test"):
            trainer.test(
                model,
                datamodule=lightning_data(datamodule),
                ckpt_path=best or None,
                weights_only=True,
            )
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
            run.progress.done("test")
        metrics["train_seconds"] = train_seconds
        for logger in run.loggers:
            logger.log_metrics({"train_seconds": train_seconds})
        if mining and mining.report:  # every process: galleries rank all shards' images
            make_galleries(
                cfg,
                model.net,
                mining.report,
                mining_datasets(datamodule)[0],
                mining.output_dir / "galleries",
                run.loggers,
                datamodule,
                rules,
            )
            mining.miner.release(mining.report)
            run.progress.done("galleries")
        result: dict[str, Any] = {
            **metrics,
            "relevant_features": str(mining.artefact_path)
            if mining and mining.artefact_path
            else None,
            "best_checkpoint": best,
            "output_dir": str(Path(cfg.paths.output_dir)),
            "wandb_dir": run.wandb_dir,
        }
        if trainer.is_global_zero:
            with atomic_path(Path(cfg.paths.output_dir) / "summary.json") as tmp:
                tmp.write_text(strict_json(result)[0])
        result["report"] = report_run(cfg.paths.output_dir, run.loggers)
    _print_summary(result)
    return result


def _fit(
    trainer: L.Trainer,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    resume: str | None,
    interrupt: InterruptCheckpoint,
    progress: JobProgress,
) -> None:
    """``trainer.fit`` (training, then the mining callback); a signal becomes
    :class:`JobInterrupted` (Lightning's ``SIGTERMException`` would exit with status 0) with
    the resumable checkpoint it saved and the command that resumes it."""
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except BaseException as error:
        stopped = interrupted_training(error)
        if stopped is None:
            raise
        if interrupt.training_finished:
            progress.done("training")
        else:
            progress.stopped_in(
                "training", f"stopped at epoch {trainer.current_epoch}, step {trainer.global_step}"
            )
        if interrupt.saved is not None:
            progress.keep(
                f"resumable checkpoint {interrupt.saved}: resume with `python train.py "
                f"{' '.join(_overrides_without_ckpt())} ckpt_path={interrupt.saved}`"
            )
        raise stopped from None
    best = _best_checkpoint(trainer)
    progress.done("training", f"best checkpoint {best}" if best else None)


def _best_checkpoint(trainer: L.Trainer) -> str:
    # "" without a checkpoint callback (best_model_path: ModelCheckpoint's, not Checkpoint's)
    return getattr(trainer.checkpoint_callback, "best_model_path", "")


def _overrides_without_ckpt() -> list[str]:
    """The job's command-line overrides, less ``ckpt_path`` (for the resume command)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]


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
    if result.get("report"):
        lines.append(f"  report:           {result['report']}")
    log.info("\n".join(lines))
