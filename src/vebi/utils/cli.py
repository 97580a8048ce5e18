"""Shared plumbing of the command-line entry points (train.py, evaluate.py, ...)."""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from vebi.errors import VebiError
from vebi.utils.log import get_logger
from vebi.utils.signals import JobInterrupted, stop_on_signals

log = get_logger(__name__)
T = TypeVar("T")

#: OS errors that describe the machine (disk full, no permission, a file where a folder
#: should be, ...) rather than a bug: reported as one line, not a traceback.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.EEXIST,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENOENT,
    errno.ENAMETOOLONG,
}


def describe_os_error(error: OSError) -> str:
    """``cannot write to <path>: <reason>`` (what to do for a full disk)."""
    where = error.filename or "a file"
    reason = error.strerror or str(error)
    advice = (
        "; free some space or point the paths elsewhere"
        if error.errno
        in (
            errno.ENOSPC,
            errno.EDQUOT,
        )
        else ""
    )
    return f"cannot write to {where}: {reason}{advice}"


def report_user_errors(task: Callable[..., T]) -> Callable[..., T]:
    """Turn a :class:`VebiError`, or an OS error about the machine (disk full, permissions, a
    file in place of a folder), into one logged error (``error: ...`` on stderr) and exit 1;
    SIGTERM and SIGINT stop the task with one line saying what was finished and exit status
    128 + the signal number (:mod:`vebi.utils.signals`).

    Bugs (any other exception) keep their traceback. Nothing is left half-written: files are
    written to a temporary name and renamed (:func:`vebi.utils.io.atomic_path`).
    """

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            with stop_on_signals():
                return task(*args, **kwargs)
        except JobInterrupted as error:
            log.error("%s", error.describe())
            raise SystemExit(error.exit_code) from None
        except VebiError as error:
            log.error("%s", error)
            raise SystemExit(1) from None
        except OSError as error:
            if error.errno not in ENVIRONMENT_ERRNOS:
                raise
            log.error("%s", describe_os_error(error))
            raise SystemExit(1) from None

    return wrapper


class RunDirCheck(HydraCallback):
    """Hydra callback: create the run (or sweep) dir before Hydra does, and turn a failure
    (a log dir under /proc, on a file, without permission) into one ``error:`` line on stderr
    and exit status 1 instead of Hydra's traceback."""

    def _check(self, config: DictConfig, key: str) -> None:
        HydraConfig.instance().set_config(config)
        folder = OmegaConf.select(config, key)
        try:
            Path(str(folder)).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            print(
                f"error: {describe_os_error(error)} (the run dir, from paths.log_dir)",
                file=sys.stderr,
            )
            raise SystemExit(1) from None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")


class SweepSummary(HydraCallback):
    """Hydra callback: at the end of a multirun, one table of the jobs that wrote a
    ``results.json`` (evaluate.py sweeps): ``sweep_summary.md`` and ``sweep_summary.json`` in
    the sweep dir, a row per job with its overrides and its headline numbers."""

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)
        self.sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_dir is not None:
            summarise_sweep(self.sweep_dir)


def _headline(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one evaluation that a sweep table shows."""
    row: dict[str, Any] = {"mu": results.get("mu"), "k": results.get("k")}
    row.update(results.get("metrics", {}))
    for key, value in (results.get("ablation") or {}).get("average", {}).items():
        row[f"ablation/{key}"] = value
    for method, scores in ((results.get("heatmaps") or {}).get("methods") or {}).items():
        for key, value in scores.items():
            if isinstance(value, int | float):
                row[f"{method}/{key}"] = value
    return row


def summarise_sweep(sweep_dir: Path) -> Path | None:
    """Write the sweep's table (module doc of :class:`SweepSummary`); None without results."""
    import json

    import yaml

    from vebi.utils.io import atomic_path, strict_json

    rows = []
    for path in sorted(sweep_dir.glob("*/results.json"), key=lambda p: p.parent.name):
        overrides_file = path.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        swept = [o for o in overrides if not o.startswith(("paths.", "ckpt_path", "mining.cache"))]
        results = json.loads(path.read_text())
        rows.append({"job": path.parent.name, "overrides": " ".join(swept), **_headline(results)})
    if not rows:
        return None
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(sweep_dir / "sweep_summary.json") as tmp:
        tmp.write_text(strict_json(rows)[0])

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [
        f"# Sweep: {len(rows)} jobs",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows),
    ]
    with atomic_path(sweep_dir / "sweep_summary.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    log.info("Sweep summary of %d jobs: %s", len(rows), sweep_dir / "sweep_summary.md")
    return sweep_dir / "sweep_summary.md"
