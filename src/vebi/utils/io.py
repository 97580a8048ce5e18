"""Small file helpers: atomic writes and checksums."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only on success.

    Readers therefore never see a half-written file: either the old file (or none) or the
    complete new one. On error the temporary file is removed and the exception re-raised.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def md5_of_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_of_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def safe_file_name(name: str, max_length: int = 40) -> str:
    """``name`` with every character but letters, digits, ``-`` and ``_`` replaced by ``_``."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:max_length]


def unique_file_names(names: Sequence[str], max_length: int = 80) -> list[str]:
    """A distinct file-safe name (no suffix) for each of ``names``, in order: ``a.png`` and
    ``a.jpg`` become ``a_png`` and ``a_jpg``; names equal after cleaning get ``-2``, ``-3``..."""
    chosen: list[str] = []
    taken: set[str] = set()
    for name in names:
        base = safe_file_name(name, max_length) or "image"
        candidate, number = base, 1
        while candidate in taken:
            number += 1
            candidate = f"{base}-{number}"
        taken.add(candidate)
        chosen.append(candidate)
    return chosen
