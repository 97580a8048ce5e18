"""One logging path for every job: rank-zero-aware loggers and the console format.

Jobs log through :func:`get_logger`; Hydra's ``job_logging`` (``configs/hydra/default.yaml``)
sends records to the console (plain messages; warnings and errors prefixed and errors on
stderr) and, with timestamps, to ``<task>.log`` in the run dir. Under DDP only the global rank
0 process logs, so a summary is printed once; errors are logged on every rank.
"""

from __future__ import annotations

import logging
import re
from collections.abc import MutableMapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_only


class RankZeroLogger(logging.LoggerAdapter):
    """A logger whose records below ERROR are emitted by the global rank 0 process only."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return msg, kwargs

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level < logging.ERROR and getattr(rank_zero_only, "rank", 0) != 0:
            return
        super().log(level, msg, *args, **kwargs)


def get_logger(name: str) -> RankZeroLogger:
    """``logging.getLogger(name)`` that stays quiet on ranks other than 0 (errors aside)."""
    return RankZeroLogger(logging.getLogger(name))


#: Control characters (ANSI escapes, carriage returns, bells...) other than newline and tab.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters written as escapes (``\x1b``), so that names from the
    data (class folders, file names) cannot move the cursor or recolour the terminal."""
    escaped = CONTROL_CHARACTERS.sub(lambda m: m.group().encode("unicode_escape").decode(), text)
    # lone surrogates (undecodable file names, JSON escapes) cannot be printed: escape them
    return escaped.encode("utf-8", "backslashreplace").decode("utf-8")


class ConsoleFormatter(logging.Formatter):
    """The message alone, control characters escaped (:func:`printable`); ``warning: `` /
    ``error: `` before records of those levels."""

    def format(self, record: logging.LogRecord) -> str:
        message = printable(super().format(record))
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


class MaxLevelFilter(logging.Filter):
    """Lets through records below ``level`` (the console handler leaves errors to stderr)."""

    def __init__(self, level: int | str = logging.ERROR) -> None:
        super().__init__()
        self.level = logging.getLevelName(level) if isinstance(level, str) else level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


__all__ = ["ConsoleFormatter", "MaxLevelFilter", "get_logger"]
