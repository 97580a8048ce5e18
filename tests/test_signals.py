"""SIGTERM and SIGINT sent to real train.py / mine.py / explain.py / evaluate.py processes:
each stops within seconds with a non-zero status and one line saying what was finished; no
half-written file stays, training leaves a checkpoint that ``ckpt_path=`` resumes, mining a
cache that the same command resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import MNIST

from tests.conftest import REPO_ROOT

#: How long a job may take to stop after the signal.
STOP_SECONDS = 20


class Job:
    """A CLI process whose merged stdout/stderr is collected by a thread."""

    def __init__(self, script: str, *args: str) -> None:
        env = {**os.environ, "HYDRA_FULL_ERROR": "0", "HDF5_USE_FILE_LOCKING": "FALSE"}
        self.process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / script), *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    @property
    def text(self) -> str:
        return "".join(self.output)

    def wait_for(self, ready: Callable[[], bool], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None:
                self.reader.join(5)
                pytest.fail(f"the job ended before it was ready:\n{self.text[-3000:]}")
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"the job was not ready after {timeout} s:\n{self.text[-3000:]}")
            time.sleep(0.05)

    def stop(self, signum: int) -> tuple[int, float]:
        """Send ``signum``; (exit status, seconds until the process ended)."""
        sent = time.monotonic()
        self.process.send_signal(signum)
        try:
            status = self.process.wait(STOP_SECONDS + 40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.reader.join(10)
            pytest.fail(
                f"still running {STOP_SECONDS + 40} s after the signal:\n{self.text[-3000:]}"
            )
        self.reader.join(10)
        return status, time.monotonic() - sent


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def no_temporary_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow  # two training runs (about 40 s): make acceptance
def test_sigterm_during_training_saves_a_checkpoint_that_resumes(
    mnist_root: Path, tmp_path: Path
) -> None:
    """Lightning's own SIGTERMException used to end train.py with status 0 and no word."""
    logs = tmp_path / "logs"
    common = [
        "experiment=mnist",
        f"paths.data_dir={mnist_root}",
        f"paths.log_dir={logs}",
        "logger=none",
        "data.train_subset=2000",
        "trainer.accelerator=cpu",
        "~callbacks.feature_mining",
    ]
    job = Job("train.py", *common, "trainer.max_epochs=30")
    job.wait_for(lambda: any(logs.glob("train/mnist/*/checkpoints/best.ckpt")))  # epoch 0 done
    status, seconds = job.stop(signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, job.text[-3000:]
    assert seconds < STOP_SECONDS
    (line,) = error_lines(job.text)
    assert (
        "train.py interrupted by SIGTERM" in line and "not finished: training (stopped at" in line
    )
    assert "test" in line.split("not finished:")[1]
    (saved,) = logs.glob("train/mnist/*/checkpoints/interrupted.ckpt")
    assert f"ckpt_path={saved}" in line
    assert no_temporary_files(logs) == []
    stopped_at = torch.load(saved, map_location="cpu", weights_only=True)
    assert stopped_at["epoch"] >= 1 and stopped_at["global_step"] > 0

    # resume: the loops go on from the saved step, training ends, the test runs
    resumed = Job(
        "train.py", *common, f"trainer.max_epochs={stopped_at['epoch'] + 1}", f"ckpt_path={saved}"
    )
    assert resumed.process.wait(300) == 0, resumed.text[-3000:]
    resumed.reader.join(10)
    assert "Restored all states from the checkpoint" in resumed.text
    assert "test acc:" in resumed.text


@pytest.mark.slow  # an explain.py run (20 s); the lost-signal unit test stays: make acceptance
def test_sigint_stops_explain_at_once_without_half_written_files(
    short_run: dict, mnist_root: Path, tmp_path: Path
) -> None:
    """explain.py on a folder used to ignore SIGTERM (Lightning's predict loop only noted it);
    Ctrl-C (SIGINT) and SIGTERM now stop it within seconds."""
    folder = tmp_path / "digits"
    folder.mkdir()
    digits = MNIST(str(mnist_root), train=False, download=False).data
    for n in range(600):
        Image.fromarray(np.asarray(digits[n % len(digits)])).save(folder / f"digit{n:04d}.png")
    logs = tmp_path / "logs"
    for signum in (signal.SIGINT, signal.SIGTERM):
        job = Job(
            "explain.py",
            f"ckpt_path={short_run['best_checkpoint']}",
            f"paths.data_dir={mnist_root}",
            f"paths.log_dir={logs / signum.name}",
            "logger=none",
            f"input={folder}",
            "batch_size=4",
        )
        job.wait_for(lambda s=signum: len(list((logs / s.name).rglob("digit*.png"))) >= 2)
        status, seconds = job.stop(signum)
        assert status == 128 + signum, job.text[-3000:]
        assert seconds < STOP_SECONDS
        (line,) = error_lines(job.text)
        assert f"explain.py interrupted by {signum.name}" in line
        assert "not finished: explaining, explanations.json" in line
        assert list((logs / signum.name).rglob("explanations.json")) == []
        assert no_temporary_files(logs) == []
        overlays = list((logs / signum.name).rglob("digit*.png"))
        assert 2 <= len(overlays) < 600
        for overlay in overlays:  # every overlay left is a complete PNG
            with Image.open(overlay) as image:
                image.load()


def complete_rows(cache_dir: Path) -> int:
    """Rows the (partial) activation cache has marked complete, read without its lock."""
    for path in cache_dir.glob("*.h5.partial"):
        try:
            with h5py.File(path, "r") as handle:
                return int(handle.attrs.get("complete_rows", 0))
        except (OSError, KeyError):
            return 0
    return 0


@pytest.mark.slow  # two mining runs on 20,000 digits (about 40 s): make acceptance
def test_sigterm_during_mining_keeps_the_cache_and_the_next_run_resumes(
    short_run: dict, mnist_root: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    args = [
        f"ckpt_path={short_run['best_checkpoint']}",
        f"paths.data_dir={mnist_root}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"mining.cache_dir={cache}",
        "logger=none",
        "data.train_subset=20000",
        "mining.chunk_rows=500",
        "mining.batch_size=100",
        "mining.progress=false",
        "interpretation.galleries=false",
    ]
    job = Job("mine.py", *args)
    job.wait_for(lambda: complete_rows(cache) >= 500)
    status, seconds = job.stop(signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, job.text[-3000:]
    assert seconds < STOP_SECONDS
    (line,) = error_lines(job.text)
    assert "mine.py interrupted by SIGTERM; finished: nothing; not finished: mining" in line
    assert "run the same command again to resume" in line
    kept = complete_rows(cache)
    assert kept >= 500
    assert list((tmp_path / "logs").rglob("relevant_features.h5")) == []
    assert no_temporary_files(tmp_path) == []

    resumed = Job("mine.py", *args)
    assert resumed.process.wait(300) == 0, resumed.text[-3000:]
    resumed.reader.join(10)
    assert f"Resuming activation extraction at row {kept} of 20000" in resumed.text
    assert len(list((tmp_path / "logs").rglob("relevant_features.h5"))) == 1


@pytest.mark.slow  # end to end through processes: make acceptance
def test_sigterm_during_evaluation_writes_no_results(
    short_run: dict, mnist_root: Path, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    job = Job(
        "evaluate.py",
        f"ckpt_path={short_run['best_checkpoint']}",
        f"paths.data_dir={mnist_root}",
        f"paths.log_dir={logs}",
        "logger=none",
        "evaluation.ablation.draws=200",
    )
    job.wait_for(lambda: "Ablation:" in job.text)
    status, seconds = job.stop(signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, job.text[-3000:]
    assert seconds < STOP_SECONDS
    (line,) = error_lines(job.text)
    assert "evaluate.py interrupted by SIGTERM; finished: test, features" in line
    assert "not finished: sparse" not in line and "ablation" in line.split("not finished:")[1]
    assert list(logs.rglob("results.json")) == [] and no_temporary_files(logs) == []


class _SignalsItselfWhenCollected:
    """Sends SIGINT to this process from its ``__del__`` and runs on, so that the handler's
    exception is raised inside the finaliser, where Python ignores it (as in matplotlib's
    ``WeakKeyDictionary`` callbacks while explain.py draws an overlay)."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # the handler runs at one of these bytecode boundaries
            pass


def test_a_signal_whose_exception_a_finaliser_ignored_is_delivered_again() -> None:
    from vebi.utils.signals import JobInterrupted, pending_signal, stop_on_signals

    ignored: list[BaseException] = []
    outer_hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: ignored.append(unraisable.exc_value)
    try:
        with pytest.raises(JobInterrupted) as stopped, stop_on_signals():
            _SignalsItselfWhenCollected()  # collected at once: __del__ swallows the first raise
            time.sleep(5)  # the signal sent again is raised here
            pytest.fail("the ignored interruption was not delivered again")
    finally:
        sys.unraisablehook = outer_hook
    assert stopped.value.signum == signal.SIGINT
    assert pending_signal() is None  # a job run in-process later does not see this signal
    assert ignored == []  # the hook of stop_on_signals handled it; no other hook saw it
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
