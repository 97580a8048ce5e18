"""The life cycle every job shares (the lightning-hydra-template's ``task_wrapper``): its
loggers are made from ``cfg.logger`` and given the flat config, what it finishes is told to a
:class:`~vebi.utils.signals.JobProgress` (the line a signal prints), and the loggers are always
closed, W&B runs marked failed when the job raised. The exception itself propagates unchanged:
:func:`vebi.utils.cli.report_user_errors` reports it once (one line for a user's error, a
traceback for a bug)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig

from vebi.utils.instantiate import flat_config, instantiate_loggers
from vebi.utils.signals import JobProgress


@dataclass
class Task:
    """A running job: its loggers and what it has finished."""

    loggers: list[Logger]
    progress: JobProgress

    @property
    def wandb_dir(self) -> str | None:
        """The local folder of the W&B run, if one is logged to."""
        return wandb_run_dir(self.loggers)


@contextlib.contextmanager
def task(
    cfg: DictConfig, job: str, planned: Sequence[str], **hyperparameters: Any
) -> Iterator[Task]:
    """Run the ``with`` block as job ``job`` (e.g. ``"mine.py"``) whose stages are ``planned``:
    loggers of ``cfg.logger`` with the flat config and ``hyperparameters`` logged, closed on
    the way out whatever happens."""
    loggers = instantiate_loggers(cfg.get("logger"))
    failed = True
    try:
        for logger in loggers:
            logger.log_hyperparams({**flat_config(cfg), **hyperparameters})
        yield Task(loggers, JobProgress(job, planned))
        failed = False
    finally:
        finish_loggers(loggers, failed=failed)


def wandb_run_dir(loggers: list[Logger]) -> str | None:
    """The local folder of the W&B run (offline runs sync from there), if a W&B logger is used."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            return str(Path(logger.experiment.dir).parent)
    return None


def finish_loggers(loggers: list[Logger], failed: bool = False) -> None:
    """Flush and close loggers; W&B runs are marked failed when the job failed."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=1 if failed else 0)
        else:
            logger.finalize("failed" if failed else "success")
