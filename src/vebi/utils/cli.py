"""Shared plumbing of the command-line entry points (train.py, evaluate.py)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lightning.pytorch.loggers import Logger, WandbLogger

from vebi.errors import VebiError
from vebi.utils.log import get_logger

log = get_logger(__name__)
T = TypeVar("T")


def report_user_errors(task: Callable[..., T]) -> Callable[..., T]:
    """Turn a :class:`VebiError` into one logged error (``error: ...`` on stderr) and exit 1.

    Bugs (any other exception) keep their traceback.
    """

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return task(*args, **kwargs)
        except VebiError as error:
            log.error("%s", error)
            raise SystemExit(1) from None

    return wrapper


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
