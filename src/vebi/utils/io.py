"""Small file helpers: atomic writes and checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

#: What opening and decoding an image file can raise (a decompression bomb is no OSError).
IMAGE_READ_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def image_error_reason(error: BaseException) -> str:
    """Why an image file could not be read, with what to do for a decompression bomb."""
    if isinstance(error, Image.DecompressionBombError):
        return (
            f"{error} (PIL refuses images this large as a possible decompression bomb; shrink "
            "it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file)"
        )
    return str(error)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only on success.

    Readers therefore never see a half-written file: either the old file (or none) or the
    complete new one. On error the temporary file is removed and the exception re-raised.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # the name is chosen before the file exists, so that a signal arriving anywhere (even
    # while the file is being created) leaves nothing behind: the ``finally`` knows the name
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def strict_json(value: Any, indent: int = 2) -> tuple[str, list[str]]:
    """``value`` as JSON that strict parsers accept, and the paths (``a/b/0``) of the NaN and
    Inf floats that were written as ``null`` (plain ``json.dumps`` writes ``NaN`` tokens)."""
    undefined: list[str] = []

    def clean(node: Any, path: str) -> Any:
        if isinstance(node, float) and not math.isfinite(node):
            undefined.append(path or "/")
            return None
        if isinstance(node, dict):
            return {k: clean(v, f"{path}/{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [clean(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(node)]
        return node

    cleaned = clean(value, "")
    return json.dumps(cleaned, indent=indent, allow_nan=False), undefined


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
