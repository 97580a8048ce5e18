"""Stopping a job on SIGTERM or SIGINT: within seconds, with a non-zero exit status, one line
that says what was finished and what was not, finished artefacts intact and none half-written.

* Outside ``Trainer.fit``'s training loop the first signal raises :class:`JobInterrupted` in the
  main thread at once; files are written to a temporary name and renamed
  (:func:`vebi.utils.io.atomic_path`), and the activation cache keeps its complete chunks, so
  whatever was finished stays and nothing half-written is left.
* Inside the training loop the signal is left to Lightning's own SIGTERM handling: its handler
  (which calls ours too) sets ``trainer.received_sigterm`` and the loop raises
  ``SIGTERMException`` at the next step boundary; :class:`InterruptCheckpoint` (Lightning's
  ``OnExceptionCheckpoint``) then saves a resumable checkpoint. SIGINT (Ctrl-C) is turned into
  the same SIGTERM, so both stop the same way; a second signal stops at once.
* The entry points (:func:`vebi.utils.cli.report_user_errors`) print
  :meth:`JobInterrupted.describe` and exit with 128 + the signal number (143 for SIGTERM, 130
  for SIGINT), as a shell reports a process ended by that signal.
* Python ignores an exception raised where nothing can catch it: in a ``__del__``, a weakref
  callback or the garbage collector (matplotlib drops figures through ``WeakKeyDictionary``
  callbacks, so about one signal in six sent while an overlay was drawn used to be lost and the
  job ran on). Such an exception reaches ``sys.unraisablehook``; ours sends the same signal
  again, so that it is raised at the next point of ordinary code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

#: The signals a job stops on.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Delay before a signal whose exception a finaliser ignored is sent again.
REDELIVER_SECONDS = 0.05


class JobInterrupted(BaseException):
    """The job was stopped by ``signum``. A ``BaseException`` (like ``KeyboardInterrupt``),
    so that no ``except Exception`` on the way turns it into a different error."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.progress: JobProgress | None = _handler.progress

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def describe(self) -> str:
        name = signal.Signals(self.signum).name
        if self.progress is None:
            return f"interrupted by {name} while setting up: nothing finished"
        return self.progress.describe(name)


class JobProgress:
    """What a job has finished, for the line printed when a signal stops it.

    ``progress = JobProgress("train.py", ["training", "test", ...])`` when the job's work
    starts (the newest one is the one a signal reports); ``progress.done(stage)`` after each
    stage, ``progress.keep(note)`` for what stays usable (a resumable checkpoint, a partial
    cache that the next run resumes)."""

    def __init__(self, job: str, planned: Sequence[str]) -> None:
        self.job = job
        self.planned = list(planned)
        self.finished: list[str] = []
        self.kept: list[str] = []
        _handler.progress = self

    def done(self, stage: str, detail: str | None = None) -> None:
        self.finished.append(f"{stage} ({detail})" if detail else stage)
        if stage in self.planned:
            self.planned.remove(stage)

    def stopped_in(self, stage: str, detail: str) -> None:
        """Say where in ``stage`` (still planned) the job stopped."""
        self.planned = [f"{stage} ({detail})" if p == stage else p for p in self.planned]

    def keep(self, note: str) -> None:
        self.kept.append(note)

    def describe(self, signal_name: str) -> str:
        parts = [
            f"{self.job} interrupted by {signal_name}",
            f"finished: {', '.join(self.finished) or 'nothing'}",
            f"not finished: {', '.join(self.planned) or 'nothing'}",
            *self.kept,
        ]
        return "; ".join(parts)


class _Handler:
    """The process's SIGTERM/SIGINT handler while a job runs (see the module doc)."""

    def __init__(self) -> None:
        self.deferred = False  # inside the training loop: Lightning stops at a step boundary
        self.pending: int | None = None
        self.forwarded = False  # a SIGTERM sent to ourselves for Lightning's handler
        self.progress: JobProgress | None = None  # what the running job has finished

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.forwarded and signum == signal.SIGTERM:
            self.forwarded = False
            return
        if self.pending is not None or not self.deferred:
            self.pending = self.pending or signum
            raise JobInterrupted(self.pending)
        self.pending = signum
        if signum != signal.SIGTERM:  # Lightning's handler acts on SIGTERM: send it one
            self.forwarded = True
            os.kill(os.getpid(), signal.SIGTERM)


_handler = _Handler()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Install the handler for the ``with`` block (the main thread only); restore after."""
    if not _in_main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    _handler.deferred, _handler.pending, _handler.forwarded = False, None, False
    _handler.progress = None
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handler)
    previous_hook = sys.unraisablehook

    def deliver_again(unraisable: Any) -> None:
        """A :class:`JobInterrupted` raised inside a finaliser was ignored: send the signal
        again from another thread a moment later, once this hook (where a raise would be
        ignored too) has returned; if it lands in a finaliser again, this runs again."""
        error = unraisable.exc_value
        if isinstance(error, JobInterrupted):
            resend = threading.Timer(REDELIVER_SECONDS, os.kill, (os.getpid(), error.signum))
            resend.daemon = True
            resend.start()
        else:
            previous_hook(unraisable)

    sys.unraisablehook = deliver_again
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        # nothing of this job reaches code run later in the process (a job called in-process)
        _handler.deferred, _handler.pending, _handler.forwarded = False, None, False
        _handler.progress = None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def pending_signal() -> int | None:
    """The signal that asked the job to stop, if one did."""
    return _handler.pending


def interrupted_training(error: BaseException) -> JobInterrupted | None:
    """The :class:`JobInterrupted` that Lightning's ``SIGTERMException`` stands for (a
    ``SystemExit`` with status 0, which would end the run as a success), else None."""
    if isinstance(error, JobInterrupted):
        return error
    if isinstance(error, SIGTERMException):
        return JobInterrupted(pending_signal() or signal.SIGTERM)
    return None


class InterruptCheckpoint(OnExceptionCheckpoint):
    """Lightning's ``OnExceptionCheckpoint`` for signals: while the training loop runs, a
    signal stops it at the next step boundary (Lightning's SIGTERM handling) and a resumable
    checkpoint (weights, optimiser, loops, callbacks) is saved as ``<dirpath>/interrupted.ckpt``
    (written to a temporary name, then renamed); ``train.py ckpt_path=<it>`` resumes.
    Other exceptions save nothing. Removed when training ends normally (Lightning's teardown)."""

    def __init__(self, dirpath: str | Path, filename: str = "interrupted") -> None:
        super().__init__(dirpath, filename)
        self.saved: Path | None = None
        self.training_finished = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _handler.deferred = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _handler.deferred = False
        self.training_finished = True
        if _handler.pending is not None:  # came after the last step: stop now
            raise JobInterrupted(_handler.pending)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        _handler.deferred = False
        if not isinstance(exception, SIGTERMException):
            return
        final = Path(self.ckpt_path)
        partial = final.with_name(f".{final.name}.partial")
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            os.replace(partial, final)
        self.saved = final
