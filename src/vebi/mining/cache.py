"""Activation cache: the aggregated responses X of a data set, in HDF5, resumable.

Datasets: ``features`` (N x m float32, chunked by rows), ``labels``, ``predictions`` and
``indices`` (position in the data set), all length N. Attributes: ``fingerprint`` (model
weights + data + extraction settings), ``complete_rows``, ``layers``, ``channels``.

While being written the file is ``<name>.partial``; rows are written a chunk at a time and
``complete_rows`` is advanced only after a chunk is flushed, so an interrupted extraction
resumes from the last complete chunk. The finished file is renamed to ``<name>``: a cache at
the final path is always complete. A file whose fingerprint differs is never reused.

Two jobs that mine the same model on the same data share one cache: :meth:`exclusive` holds
``<name>.lock`` (an OS file lock, released when the holder ends, even by a crash) while a job
checks and writes the cache, so the second job waits for the first and then reuses its cache.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from vebi.errors import VebiError
from vebi.mining.features import FeatureIndex
from vebi.utils.log import get_logger

log = get_logger(__name__)

try:  # POSIX file locks; elsewhere caches are not shared between concurrent jobs
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]  # the module is absent here


class CacheDiskFullError(VebiError):
    """No space left on the disk of the activation cache while writing it."""


def _disk_full(error: OSError, path: Path) -> bool:
    """Whether ``error`` (from h5py, which often sets no errno) means the disk is full."""
    if error.errno == errno.ENOSPC or "No space left" in str(error):
        return True
    try:
        return shutil.disk_usage(path.parent).free < 2**20
    except OSError:
        return False


class ActivationCache:
    """Reader/writer of one cache file (see module doc)."""

    def __init__(self, path: str | os.PathLike[str], fingerprint: str) -> None:
        self.path = Path(path)
        self.partial_path = self.path.with_name(self.path.name + ".partial")
        self.fingerprint = fingerprint

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold this cache's lock file for the ``with`` block; wait while another process holds
        it (saying which)."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as handle:
            if fcntl is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    owner = handle.read().strip() or "?"
                    log.warning(
                        "Activation cache %s is being written by process %s: waiting for it to "
                        "finish, then reusing it",
                        self.path,
                        owner,
                    )
                    fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    # ---------------------------------------------------------------- reading
    def is_complete(self) -> bool:
        """True when a finished cache with this fingerprint exists."""
        return self._matches(self.path, require_complete=True)

    def _matches(self, path: Path, require_complete: bool) -> bool:
        if not path.is_file():
            return False
        try:
            with h5py.File(path, "r") as handle:
                if handle.attrs.get("fingerprint") != self.fingerprint:
                    return False
                done = int(handle.attrs["complete_rows"])
                return not require_complete or done == handle["features"].shape[0]
        except (OSError, KeyError) as error:
            log.warning("Ignoring unreadable activation cache %s (%s)", path, error)
            return False

    def feature_index(self) -> FeatureIndex:
        with h5py.File(self.path, "r") as handle:
            return FeatureIndex(
                tuple(str(s) for s in handle.attrs["layers"]),
                tuple(int(c) for c in handle.attrs["channels"]),
            )

    def __len__(self) -> int:
        with h5py.File(self.path, "r") as handle:
            return int(handle["features"].shape[0])

    def iter_chunks(
        self,
        rows: int | None = None,
        partial: bool = False,
        fields: Sequence[str] = ("features", "labels", "predictions", "indices"),
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield blocks ``{features, labels, predictions, indices}`` (or the chosen ``fields``)
        of the finished cache, or of the complete rows of the partial file (``partial=True``)."""
        path = self.partial_path if partial else self.path
        with h5py.File(path, "r") as handle:
            features = handle["features"]
            total = int(handle.attrs["complete_rows"])
            step = rows or features.chunks[0]
            for start in range(0, total, step):
                stop = min(start + step, total)
                yield {name: handle[name][start:stop] for name in fields}

    def read(self, name: str) -> np.ndarray:
        with h5py.File(self.path, "r") as handle:
            return handle[name][...]

    # ---------------------------------------------------------------- writing
    def resume_or_create(
        self,
        num_rows: int,
        index: FeatureIndex,
        chunk_rows: int,
        dtype: type[np.floating] = np.float32,
    ) -> int:
        """Open the partial file for writing (features stored as ``dtype``); return the number
        of rows already complete."""
        if self._matches(self.partial_path, require_complete=False):
            with h5py.File(self.partial_path, "r") as handle:
                features = handle["features"]
                if features.shape == (num_rows, index.size) and features.dtype == dtype:
                    done = int(handle.attrs["complete_rows"])
                    log.info("Resuming activation extraction at row %d of %d", done, num_rows)
                    return done
        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        self.partial_path.unlink(missing_ok=True)
        with h5py.File(self.partial_path, "w") as handle:
            chunk = (min(chunk_rows, max(num_rows, 1)), index.size)
            handle.create_dataset("features", (num_rows, index.size), dtype, chunks=chunk)
            for name in ("labels", "predictions", "indices"):
                handle.create_dataset(name, (num_rows,), np.int64)
            handle.attrs["fingerprint"] = self.fingerprint
            handle.attrs["complete_rows"] = 0
            handle.attrs["layers"] = list(index.layers)
            handle.attrs["channels"] = list(index.channels)
        return 0

    def write_rows(self, start: int, blocks: Sequence[dict[str, np.ndarray]]) -> int:
        """Write consecutive rows from ``start``, flush, then mark them complete. A full disk
        is a :class:`CacheDiskFullError` that leaves the rows before ``start`` complete (the
        next run resumes there)."""
        rows = {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}
        stop = start + len(rows["labels"])
        try:
            with h5py.File(self.partial_path, "r+") as handle:
                for name, values in rows.items():
                    handle[name][start:stop] = values
                handle.flush()
                handle.attrs["complete_rows"] = stop
        except OSError as error:
            if not _disk_full(error, self.partial_path):
                raise
            raise CacheDiskFullError(
                f"the disk of the activation cache {self.partial_path} is full (writing rows "
                f"{start}..{stop - 1}): the rows before {start} are kept, and a rerun resumes "
                "there once space is freed; or point mining.cache_dir at a larger disk, set "
                "mining.cache_dtype=float16 (half the size), or mining.cache=off (G in memory)"
            ) from None
        return stop

    def finish(self) -> None:
        os.replace(self.partial_path, self.path)
