"""FeatureMiner: extraction -> sufficient statistics -> mu-lasso -> RelevantFeatures."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from vebi.errors import VebiError, require_number
from vebi.mining.cache import ActivationCache
from vebi.mining.features import VIEWS, FeatureExtractor, FeatureIndex, select_feature_layers
from vebi.mining.relevant import LABEL_SOURCES, RelevantFeatures
from vebi.mining.solver import (
    DEFAULT_SOLVERS,
    DenseGram,
    GramOperator,
    LassoSolution,
    SolverFailedError,
    merge_solutions,
    mu_lasso,
)
from vebi.mining.statistics import GramStatistics, StreamedGram
from vebi.models.hooks import eval_mode, network_of
from vebi.utils.distributed import all_reduce_sum, gather_objects, world
from vebi.utils.log import get_logger
from vebi.utils.torch_api import dataset_size

log = get_logger(__name__)
GRAM_MODES = ("auto", "dense", "streamed")
CACHE_MODES = ("auto", "on", "off")
#: Activation-cache dtypes (HDF5 has no bfloat16; float16 halves the disk and the reads).
CACHE_DTYPES: dict[str, type[np.floating]] = {"float32": np.float32, "float16": np.float16}
#: With ``cache=auto`` and G dense, the cache is kept when it takes at most this share of the
#: free disk of ``cache_dir`` (else skipped: the solve does not read it).
CACHE_DISK_SHARE = 0.25
#: Bytes of float32 features per activation-cache chunk (what one read or write holds in RAM).
CHUNK_BYTES = 64 * 2**20


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_fingerprint(dataset: Dataset) -> str:
    """SHA-256 of what identifies ``dataset`` completely, so that a changed data set never
    reuses old activations:

    * ``Subset``: its indices, then the data set under it;
    * data held in memory (tensors or arrays among the data set's attributes, e.g.
      ``TensorDataset``): their full contents;
    * image files (``samples`` / ``imgs`` / ``paths`` lists, e.g. ``ImageFolder``): every path
      with its size and modification time, and the labels;
    * the ``transform``'s description (another resize or crop gives other activations);
    * :data:`SAMPLED_ITEMS` items as the data set returns them, transformed: what no
      description covers (two ``transforms.Lambda`` or closures print alike) still changes
      the key; a data set whose items change from one read to the next (random
      augmentation) gets a key of its own every time, so its cache is never reused (said);
    * anything else: every item, read once (a pass over the data without the network).
    """
    digest = hashlib.sha256(f"{type(dataset).__qualname__}|{dataset_size(dataset)}".encode())
    _fingerprint_into(digest, dataset)
    positions = np.unique(np.linspace(0, dataset_size(dataset) - 1, SAMPLED_ITEMS).astype(int))
    sampled = [_item_bytes(dataset, position) for position in positions.tolist()]
    for item in sampled:
        digest.update(item)
    if sampled and _item_bytes(dataset, int(positions[0])) != sampled[0]:
        log.warning(
            "%s returns other values each time an item is read (random transforms?): its "
            "activation cache will not be reused; mine on data without augmentation",
            type(dataset).__name__,
        )
        digest.update(os.urandom(16))
    return digest.hexdigest()


#: Transformed items that every data set fingerprint reads (:func:`dataset_fingerprint`).
SAMPLED_ITEMS = 8


def _item_bytes(dataset: Dataset, position: int) -> bytes:
    """The image and label of ``dataset[position]`` as bytes (dtype and shape included)."""
    parts = []
    for part in dataset[position][:2]:
        try:
            value = torch.as_tensor(part if torch.is_tensor(part) else np.array(part))
        except (TypeError, ValueError, RuntimeError):  # e.g. a string label: checked later
            parts.append(repr(part).encode())
            continue
        value = value.detach().cpu().contiguous()
        parts.append(f"{value.dtype}|{tuple(value.shape)}|".encode())
        parts.append(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return b"".join(parts)


def _fingerprint_into(digest: Any, dataset: Dataset) -> None:
    if isinstance(dataset, Subset):
        digest.update(np.asarray(dataset.indices, dtype=np.int64).tobytes())
        digest.update(f"|{type(dataset.dataset).__qualname__}|".encode())
        _fingerprint_into(digest, dataset.dataset)
        return
    described = False
    for name, value in sorted(vars(dataset).items()):
        arrays = value if isinstance(value, list | tuple) else [value]
        if arrays and all(isinstance(a, torch.Tensor | np.ndarray) for a in arrays):
            for array in arrays:
                data = torch.as_tensor(array).detach().cpu().contiguous()
                digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
                digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
            described = True
    files = next(
        (getattr(dataset, n) for n in ("samples", "imgs", "paths") if hasattr(dataset, n)), None
    )
    if files is not None:
        for entry in files:
            path = Path(entry[0] if isinstance(entry, list | tuple) else entry)
            try:
                stat = path.stat()
                size, mtime = stat.st_size, stat.st_mtime_ns
            except OSError:  # missing: the loader will say so
                size, mtime = -1, -1
            digest.update(
                f"{path}|{size}|{mtime}|{entry[1:] if isinstance(entry, tuple) else ''}".encode()
            )
        described = True
    # object addresses ("<function <lambda> at 0x7f...>") differ between runs: left out
    transform = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(getattr(dataset, "transform", None)))
    digest.update(f"transform|{transform}".encode())
    if not described:
        log.info(
            "Fingerprinting the %d items of %s one by one",
            dataset_size(dataset),
            type(dataset).__name__,
        )
        for position in range(dataset_size(dataset)):
            for part in dataset[position][:2]:
                digest.update(torch.as_tensor(part).contiguous().numpy().tobytes())


def _images(batch: Any) -> Any:
    """The images of a loader batch of (image, label[, ...]) items."""
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise VebiError("mining needs a data set of (image, label[, ...]) items")
    return batch[0]


def _images_labels(
    batch: Any, num_classes: int | None = None, where: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of a loader batch; the labels checked to be one integer class id
    per image (int64, on the CPU), in 0..num_classes-1 when ``num_classes`` is given (a few
    comparisons per batch)."""
    images = _images(batch)
    count = len(images) if isinstance(images, torch.Tensor) and images.ndim else -1
    return images, _check_labels(batch[1], count, num_classes, where)


def _check_labels(labels: Any, count: int, num_classes: int | None, where: str) -> torch.Tensor:
    """``labels`` as an int64 CPU tensor of shape (count,), else a VebiError that says which
    labels were found and that they must be integer class ids 0..C-1."""
    ids = "integer class ids" + (f" 0..{num_classes - 1}" if num_classes else "")
    if num_classes:
        ids += f" (the model has {num_classes} outputs)"
    if isinstance(labels, torch.Tensor):
        tensor = labels.detach().cpu()
    else:  # strings and other objects are collated into lists
        try:
            array = np.asarray(labels)
        except (TypeError, ValueError):
            array = np.asarray(labels, dtype=object)
        if array.dtype.kind not in "iu":
            found = list(dict.fromkeys(np.ravel(array).tolist()))[:5]
            kinds = sorted({type(value).__name__ for value in found})
            raise VebiError(
                f"labels must be {ids}, but the data set yields {'/'.join(kinds)} labels{where} "
                f"(e.g. {found}): make it return class ids (e.g. map each name to its index "
                "in class_names)"
            )
        tensor = torch.from_numpy(array)
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        found = torch.unique(tensor.reshape(-1))[:5].tolist()
        raise VebiError(
            f"labels must be {ids}, but the data set yields {tensor.dtype} labels{where} "
            f"(e.g. {found}): make it return integer class ids (e.g. label.long() when they "
            "are whole numbers)"
        )
    if tensor.ndim != 1 or (count >= 0 and len(tensor) != count):
        raise VebiError(
            f"labels must be one of the {ids} per image, but {count} image(s){where} come with "
            f"labels of shape {tuple(tensor.shape)}: give one id per image (one-hot or soft "
            "labels: their argmax)"
        )
    tensor = tensor.long()
    if num_classes and len(tensor) and (tensor.min() < 0 or tensor.max() >= num_classes):
        outside = tensor[(tensor < 0) | (tensor >= num_classes)]
        raise VebiError(
            f"labels must be {ids}, but the data set yields labels{where} outside that range: "
            f"{torch.unique(outside)[:5].tolist()}: relabel the data or pass the model with "
            "as many outputs as the data has classes"
        )
    return tensor


def _positive_mu(value: object, where: str) -> float:
    """``value`` as a float when it is a finite real number > 0, else a VebiError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise VebiError(
            f"mu must be a positive number (the L1 bound of the mu-lasso, e.g. 10), got "
            f"{value!r} ({type(value).__name__}){where}"
        )
    return float(value)


def _warn_user(message: str) -> None:
    """``message`` as a UserWarning attributed to the first caller outside vebi (shown once
    per place in the user's code, not once per process at a line of vebi), and logged."""
    package = os.path.dirname(os.path.abspath(__file__)).rsplit(os.sep, 1)[0] + os.sep
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        package
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
    log.warning(message)


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: ``torch.cuda.mem_get_info`` on a GPU (plus
    what torch's caching allocator holds unused), else the machine's available RAM
    (``MemAvailable`` of /proc/meminfo; the free physical pages elsewhere)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _gigabytes(size: float) -> str:
    return f"{size / 2**30:.2f} GB" if size >= 2**28 else f"{size / 2**20:.0f} MB"


def statistics_device(device: torch.device) -> torch.device:
    """Where G and B are summed: the model's device, unless it has no float64 (MPS)."""
    return torch.device("cpu") if device.type == "mps" else device


@dataclass
class MiningReport:
    """What a mining run produced and how long each stage took.

    ``rows`` yields the rows of X again (``iter_chunks``, as :class:`ActivationCache`): the
    cache when one was kept, else a second forward pass (``mining.cache=off``); None once a
    temporary cache is gone. ``gram``: ``dense`` or ``streamed``, and why.
    """

    relevant: RelevantFeatures
    solution: LassoSolution
    cache_path: Path | None
    timings: dict[str, float] = field(default_factory=dict)
    mu_path: list[dict[str, float]] = field(default_factory=list)
    rows: Any = None
    gram: str = ""
    gram_reason: str = ""


@dataclass
class _Run:
    """State shared by the stages of one mining run."""

    model: nn.Module
    layers: list[str]
    num_classes: int
    device: torch.device
    cache: ActivationCache
    fingerprint: dict[str, str]
    index: FeatureIndex
    dense: bool  # G summed in memory (else streamed from the cache)
    gram_reason: str
    write_cache: bool
    dataset: Dataset  # the mining images, and this process's share of their positions
    indices: np.ndarray


class ForwardRows:
    """The rows of X of a data set's images computed again by a forward pass, block by
    block, in the layout of :meth:`ActivationCache.iter_chunks` (``mining.cache=off``: the
    galleries rank the images on them; one pass per call)."""

    def __init__(self, miner: FeatureMiner, run: _Run) -> None:
        self.miner, self.run = miner, run

    def iter_chunks(
        self,
        rows: int | None = None,
        fields: Sequence[str] = ("features", "labels", "predictions", "indices"),
    ) -> Iterable[dict[str, np.ndarray]]:
        run = self.run
        with eval_mode(run.model):
            for block in self.miner._forward_blocks(run, run.dataset, run.indices, None, "gallery"):
                features = self.miner._rounded(torch.from_numpy(block["features"]))
                block["features"] = features.numpy()
                yield {name: block[name] for name in fields}


class FeatureMiner:
    """Mines class-relevant features of a trained classifier (docs/method.md, sections 1-2).

    One pass over the data computes the aggregated responses x (written to a resumable
    activation cache) and accumulates G = X^T X and B = X^T Y; the mu-lasso is then solved on
    G and B alone. A finished cache with the same fingerprint is reused without a forward pass.

    Args:
        mu: the L1 bound of the mu-lasso (> 0).
        layers: module names, globs (``net.layer4.*``) or types (``type:Conv2d``) to read;
            ``None`` = the defaults of :func:`~vebi.mining.features.default_feature_layers`
            (every layer output up to the logits; a residual, inverted-residual, dense or
            inception block counts as one layer).
        feature_blocks: more block types for the defaults, by qualified class name.
        views: with the default layers, ``one`` (default) view per tensor (a conv, its batch
            norm and its activation are one layer, the activation's; a global pooling of a
            layer is left out) or ``every`` one (the paper's every-layer choice).
        aggregation: ``energy`` (default), ``mean`` or ``max`` per channel.
        nonnegative: constrain the weights to w >= 0.
        labels: ``ground_truth`` or ``predicted`` labels as the regression targets. The data
            set's labels must be integer class ids (every batch is checked); with
            ``ground_truth`` they must also lie in 0..C-1 (C = the model's outputs).
        tolerance: weights above it make a feature relevant (a finite number >= 0).
        solvers / solver_options: cvxpy solvers tried in order, and their options.
        mu_candidates: if given, mu is picked among them by the held-out accuracy of the
            sparse classifier argmax(x^T W) (needs a validation set): the smallest mu whose
            accuracy is within ``mu_tolerance`` of the best one. Accuracy grows with mu (more
            features per class), so the largest would always win; a small tolerance keeps the
            relevant sets small, which is what interpretation wants.
        gram: how the solver gets G = X^T X (m x m, float64): ``dense`` accumulates it on the
            model's device during the forward pass (8 m^2 bytes; no second read of
            anything); ``streamed`` never forms it and streams its slices from the activation
            cache, two passes per working-set round (memory O(mC), see
            :mod:`vebi.mining.statistics`); ``auto`` (default) is dense when G takes at most
            ``memory_share`` of the device's free memory (a GPU's, or the machine's available
            RAM), streamed otherwise. The choice and why are logged.
        memory_share: the share of free device memory G may take with ``gram=auto`` (0-1).
        cache: ``on`` writes the activation cache (N x m; reused by later runs, resumable,
            read by the streamed passes and the galleries); ``off`` writes none (G must be
            dense; the galleries take a second forward pass; an interrupted run starts
            again); ``auto`` (default) is on unless G is dense and the cache would take more
            than a quarter of the free disk of ``cache_dir``.
        cache_dtype: ``float32`` (default) or ``float16`` (half the disk and the reads; the
            features are rounded to it before anything uses them, so dense and streamed
            solves see the same X).
        batch_size: images per forward pass; chunk_rows: rows per resumable cache chunk (at
            most 64 MB of features: fewer rows for large m).
        cache_dir: folder of the activation caches (named by fingerprint); ``None`` keeps
            none after the run.
        keep_cache: ``False`` lets the jobs delete this run's cache once they are done with
            it (after the interpretation galleries, which rank images from it): :meth:`release`.
        progress: show progress bars.
    """

    def __init__(
        self,
        mu: float = 10.0,
        layers: Sequence[str] | None = None,
        feature_blocks: Sequence[str] = (),
        views: str = "one",
        aggregation: str = "energy",
        normalize_layers: bool = True,
        normalize_global: bool = True,
        nonnegative: bool = True,
        labels: str = "ground_truth",
        tolerance: float = 1e-6,
        solvers: Sequence[str] = DEFAULT_SOLVERS,
        solver_options: dict[str, dict[str, Any]] | None = None,
        mu_candidates: Sequence[float] | None = None,
        mu_tolerance: float = 0.01,
        gram: str = "auto",
        memory_share: float = 0.5,
        batch_size: int = 500,
        chunk_rows: int = 4096,
        cache_dir: str | Path | None = None,
        progress: bool = True,
        keep_cache: bool = True,
        cache: str = "auto",
        cache_dtype: str = "float32",
    ) -> None:
        self.mu = _positive_mu(mu, "")
        if mu_candidates is not None and (
            isinstance(mu_candidates, str | bytes | dict) or not isinstance(mu_candidates, Iterable)
        ):
            raise VebiError(
                f"mu_candidates must be a list of positive numbers, got {mu_candidates!r}"
            )
        candidates = list(mu_candidates) if mu_candidates is not None else []
        self.mu_candidates = [_positive_mu(v, " in mu_candidates") for v in candidates] or None
        self.tolerance = require_number(
            "tolerance",
            tolerance,
            0,
            hint="weights above it make a feature relevant (the default is 1e-6)",
        )
        self.mu_tolerance = require_number(
            "mu_tolerance", mu_tolerance, 0, hint="accuracy points in [0, 1), e.g. 0.01"
        )
        if not self.mu_tolerance < 1:
            raise VebiError(f"mu_tolerance must be in [0, 1) (accuracy points), got {mu_tolerance}")
        if labels not in LABEL_SOURCES:
            raise VebiError(f"labels must be one of {LABEL_SOURCES}, got {labels!r}")
        if gram not in GRAM_MODES:
            raise VebiError(f"gram must be one of {GRAM_MODES}, got {gram!r}")
        self.gram = gram
        self.memory_share = require_number(
            "memory_share", memory_share, 0, hint="a share of free memory in (0, 1], e.g. 0.5"
        )
        if not 0 < self.memory_share <= 1:
            raise VebiError(f"memory_share must be in (0, 1], got {memory_share}")
        if cache not in CACHE_MODES:
            raise VebiError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        if cache == "off" and gram == "streamed":
            raise VebiError(
                "mining.cache=off with mining.gram=streamed: the streamed solve reads the "
                "activation cache; use mining.cache=auto (or on), or mining.gram=auto|dense"
            )
        if cache_dtype not in CACHE_DTYPES:
            raise VebiError(
                f"cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {cache_dtype!r}"
                + (
                    " (HDF5 stores no bfloat16; float16 halves the cache as well)"
                    if str(cache_dtype) == "bfloat16"
                    else ""
                )
            )
        self.cache = cache
        self.cache_dtype = cache_dtype
        if batch_size < 1 or chunk_rows < 1:
            raise VebiError("batch_size and chunk_rows must be >= 1")
        self.layers = list(layers) if layers else None
        self.feature_blocks = tuple(str(block) for block in feature_blocks or ())
        if views not in VIEWS:
            raise VebiError(f"mining.views must be one of {list(VIEWS)}, got {views!r}")
        self.views = views
        self.aggregation = aggregation
        self.normalize_layers = normalize_layers
        self.normalize_global = normalize_global
        self.nonnegative = nonnegative
        self.labels = labels
        self.solvers = tuple(solvers)
        self.solver_options = {k: dict(v) for k, v in (solver_options or {}).items()}
        self.batch_size = batch_size
        self.chunk_rows = chunk_rows
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.progress = progress
        self.keep_cache = keep_cache

    # ------------------------------------------------------------------ helpers
    def _extractor(self, model: nn.Module, layers: Sequence[str]) -> FeatureExtractor:
        return FeatureExtractor(
            model, layers, self.aggregation, self.normalize_layers, self.normalize_global
        )

    def _settings(self) -> dict[str, Any]:
        return {
            "aggregation": self.aggregation,
            "normalize_layers": self.normalize_layers,
            "normalize_global": self.normalize_global,
        }

    def _loader(self, dataset: Dataset, indices: Sequence[int] | np.ndarray) -> DataLoader:
        return DataLoader(Subset(dataset, list(indices)), batch_size=self.batch_size, shuffle=False)

    def _label_range(self, num_classes: int) -> int | None:
        """The number of classes the labels are checked against: the model's outputs when the
        labels are the regression targets; none with ``labels="predicted"`` (the data set's
        labels then only score the network, and unlabelled data may carry e.g. -1)."""
        return num_classes if self.labels == "ground_truth" else None

    def _targets(self, labels: Any, predictions: Any) -> Any:
        return labels if self.labels == "ground_truth" else predictions

    def gram_choice(self, num_features: int, device: torch.device) -> tuple[bool, str]:
        """(dense?, why) for G of ``num_features`` features summed on ``device``: dense when
        asked, or with ``gram=auto`` when its 8 m^2 bytes take at most ``memory_share`` of
        the device's free memory (under torch.distributed: on every process's device, so
        that all choose alike; every process must call it). A G that does not fit where
        ``gram=dense`` asks for it, or with ``cache=off``, is refused with what it needs."""
        device = statistics_device(device)
        need = 8 * num_features**2
        if self.gram == "streamed":
            return False, "mining.gram=streamed"
        free = available_memory(device)
        fits = need <= self.memory_share * free
        where = f"{_gigabytes(need)} of float64 against {_gigabytes(free)} free on {device}"
        if world()[1] > 1:  # every process must choose alike: dense only if it fits on all
            short = all_reduce_sum(torch.tensor([0.0 if fits else 1.0], device=device))
            if fits and short.item() > 0:
                fits = False
                where += f" here, but too little on {int(short.item())} other process(es)"
        if fits:
            return True, f"G = {where} (at most {self.memory_share:.0%} of it)"
        reduce = (
            "mining.layers can reduce m (e.g. the last blocks only), or a device with more "
            "memory takes it"
        )
        if self.gram == "dense" or self.cache == "off":
            asked = "mining.gram=dense" if self.gram == "dense" else "mining.cache=off"
            raise VebiError(
                f"{asked} needs G in memory, but G of {num_features} features needs {where}, "
                f"more than mining.memory_share={self.memory_share:g} of it: use "
                "mining.gram=auto with mining.cache=auto (G is then streamed from the "
                f"activation cache); {reduce}"
            )
        return False, f"G would need {where}, more than {self.memory_share:.0%} of it ({reduce})"

    def _dense(self, num_features: int, device: torch.device | str = "cpu") -> bool:
        """Whether G is accumulated in memory for ``num_features`` features on ``device``."""
        return self.gram_choice(num_features, torch.device(device))[0]

    def cache_choice(self, rows: int, num_features: int, dense: bool, folder: Path) -> bool:
        """Whether this run writes the activation cache (``cache`` option, logged): ``auto``
        keeps it unless G is dense and rows x m values would take more than a quarter of the
        free disk under ``folder``. A cache that cannot fit on that disk is refused when the
        streamed solve needs it."""
        if self.cache == "off":
            log.info("No activation cache (mining.cache=off): the galleries take a second pass")
            return False
        size = rows * num_features * np.dtype(CACHE_DTYPES[self.cache_dtype]).itemsize
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        if size > free and not dense:
            raise VebiError(
                f"the activation cache needs {_gigabytes(size)} ({rows} images x "
                f"{num_features} {self.cache_dtype} features), but {folder} has "
                f"{_gigabytes(free)} free: free space, point mining.cache_dir at a larger "
                "disk, set mining.cache_dtype=float16 (half the size), or reduce m with "
                "mining.layers"
            )
        if self.cache == "auto" and dense and size > CACHE_DISK_SHARE * free:
            log.info(
                "No activation cache (mining.cache=auto): it would take %s of the %s free in "
                "%s, and the dense solve does not read it; the galleries take a second forward "
                "pass (mining.cache=on keeps it)",
                _gigabytes(size),
                _gigabytes(free),
                folder,
            )
            return False
        return True

    def _chunk_rows(self, num_features: int) -> int:
        return max(1, min(self.chunk_rows, CHUNK_BYTES // (4 * max(num_features, 1))))

    def _rounded(self, x: torch.Tensor) -> torch.Tensor:
        """The features as the cache stores them (float16 rounding when asked)."""
        return x if self.cache_dtype == "float32" else x.half().float()

    def _accumulate(self, stats: GramStatistics, block: dict[str, np.ndarray]) -> None:
        targets = self._targets(block["labels"], block["predictions"])
        stats.update(torch.from_numpy(block["features"]), torch.from_numpy(targets))

    def feature_layers(self, model: nn.Module, dataset: Dataset) -> list[str]:
        """The layers this miner reads on ``model`` (its ``layers``, or the defaults with its
        ``feature_blocks`` and ``views``), traced on the first image of ``dataset``."""
        device = next(model.parameters()).device
        probe = _images(next(iter(self._loader(dataset, [0])))).to(device)
        return select_feature_layers(model, probe, self.layers, self.feature_blocks, self.views)

    # ------------------------------------------------------------------ stages
    def _prepare(
        self, model: nn.Module, dataset: Dataset, world: tuple[int, int], cache_dir: Path
    ) -> _Run:
        device = next(model.parameters()).device
        first = next(iter(self._loader(dataset, [0])))
        probe = _images(first)
        probe = probe.to(device)
        layers = select_feature_layers(model, probe, self.layers, self.feature_blocks, self.views)
        with self._extractor(model, layers) as extractor:
            num_classes = int(extractor(probe, " in the first image")[1].shape[1])
            index = extractor.index
            assert index is not None  # set by the first call
        _images_labels(first, self._label_range(num_classes), " in item 0")  # before a long pass
        dense, why = self.gram_choice(index.size, device)
        log.info(
            "Mining %d features of %d layers for %d classes (G %s: %s):\n%s",
            index.size,
            len(index.layers),
            num_classes,
            f"in memory on {statistics_device(device)}"
            if dense
            else "streamed from the activation cache",
            why,
            "\n".join(
                f"  {layer:<32} {count:6d}"
                for layer, count in zip(index.layers, index.channels, strict=True)
            ),
        )
        fingerprint = {
            "model": model_fingerprint(model),
            "data": dataset_fingerprint(dataset),
            "settings": json.dumps({"layers": list(layers), **self._settings()}),
        }
        keyed: list[Any] = [fingerprint, *world]
        if self.cache_dtype != "float32":  # (float32 caches keep the keys they had)
            keyed.append(self.cache_dtype)
        key = hashlib.sha256(json.dumps(keyed).encode()).hexdigest()
        suffix = f"-rank{world[0]}of{world[1]}" if world[1] > 1 else ""
        if self.cache_dir is not None and self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise VebiError(
                f"mining.cache_dir={self.cache_dir} is a file, not a folder: point it at a "
                "folder (it is created when missing)"
            )
        cache = ActivationCache(cache_dir / f"activations-{key[:16]}{suffix}.h5", key)
        indices = np.arange(world[0], dataset_size(dataset), world[1])
        write = cache.is_complete() or self.cache_choice(len(indices), index.size, dense, cache_dir)
        return _Run(
            model,
            list(layers),
            num_classes,
            device,
            cache,
            fingerprint,
            index,
            dense,
            why,
            write,
            dataset,
            indices,
        )

    def _extract(self, run: _Run) -> GramStatistics:
        """Forward the images, write the cache chunk by chunk (resumable), accumulate G, B."""
        cache, dataset, indices = run.cache, run.dataset, run.indices
        with self._extractor(run.model, run.layers) as extractor, ThreadPoolExecutor(1) as writer:
            probe = _images(next(iter(self._loader(dataset, indices[:1]))))
            extractor(probe.to(run.device), " in the first image")
            index = extractor.index
            assert index is not None  # set by the first call
            size = index.size
            chunk_rows = self._chunk_rows(size)
            stats = GramStatistics(size, run.num_classes, with_gram=run.dense)
            stats = stats.to(statistics_device(run.device))
            dtype = CACHE_DTYPES[self.cache_dtype]
            done = (
                cache.resume_or_create(len(indices), index, chunk_rows, dtype)
                if run.write_cache
                else 0
            )
            if done:  # replay the complete rows batch by batch: the same sums, bit for bit
                for block in cache.iter_chunks(self.batch_size, partial=True):
                    self._accumulate(stats, block)
            pending: list[dict[str, np.ndarray]] = []
            pending_rows, position = 0, done
            writing: Future | None = None
            bar = tqdm(
                total=len(indices),
                initial=done,
                desc="mining features",
                unit="img",
                disable=not self.progress,
                dynamic_ncols=True,
            )
            with bar:
                for number, batch in enumerate(self._loader(dataset, indices[done:])):
                    first = done + number * self.batch_size
                    rows = f"data rows {first}..{first + len(batch[0]) - 1}"
                    images, labels = _images_labels(
                        batch, self._label_range(run.num_classes), f" in batch {number} ({rows})"
                    )
                    x, logits = extractor(images.to(run.device), f" in batch {number} ({rows})")
                    x = self._rounded(x)
                    predictions = logits.argmax(1)
                    stats.update(x, self._targets(labels.to(run.device), predictions))
                    bar.update(len(images))
                    if not run.write_cache:
                        continue
                    pending.append(
                        {
                            "features": x.cpu().numpy().astype(dtype),
                            "labels": labels.numpy().astype(np.int64),
                            "predictions": predictions.cpu().numpy().astype(np.int64),
                            "indices": indices[first : first + len(images)].astype(np.int64),
                        }
                    )
                    pending_rows += len(images)
                    if pending_rows >= chunk_rows:  # write in the background, in order
                        if writing is not None:
                            writing.result()
                        writing = writer.submit(cache.write_rows, position, pending)
                        position, pending, pending_rows = position + pending_rows, [], 0
                if writing is not None:
                    writing.result()
                if pending:
                    cache.write_rows(position, pending)
        if not run.write_cache:
            return stats
        cache.finish()
        megabytes = cache.path.stat().st_size / 2**20
        log.info(
            "Activation cache: %.0f MB in %s (%s)",
            megabytes,
            cache.path,
            "reused by later runs on the same weights and data; delete it freely, or set "
            "mining.keep_cache=false"
            if self.cache_dir is not None
            else "temporary: removed when this mining run ends",
        )
        return stats

    def _statistics_from_cache(self, run: _Run) -> GramStatistics:
        index = run.cache.feature_index()
        stats = GramStatistics(index.size, run.num_classes, with_gram=run.dense)
        stats = stats.to(statistics_device(run.device))
        for block in run.cache.iter_chunks(self.batch_size):  # as extracted: the same sums
            self._accumulate(stats, block)
        return stats

    def _forward_blocks(
        self,
        run: _Run,
        dataset: Dataset,
        indices: np.ndarray,
        label_range: int | None,
        what: str,
    ) -> Iterable[dict[str, np.ndarray]]:
        """One forward pass over ``dataset[indices]``: per batch, the features x, labels
        (checked against ``label_range``), predictions and data-set positions."""
        with self._extractor(run.model, run.layers) as extractor:
            loader = self._loader(dataset, indices)
            for number, batch in enumerate(
                tqdm(loader, desc=f"{what} features", disable=not self.progress, unit="batch")
            ):
                where = f" in {what} batch {number}"
                images, labels = _images_labels(batch, label_range, where)
                x, logits = extractor(images.to(run.device), where)
                first = number * self.batch_size
                yield {
                    "features": x.cpu().numpy(),
                    "labels": labels.numpy().astype(np.int64),
                    "predictions": logits.argmax(1).cpu().numpy().astype(np.int64),
                    "indices": indices[first : first + len(images)].astype(np.int64),
                }

    def _features_in_memory(self, run: _Run, dataset: Dataset) -> dict[str, np.ndarray]:
        indices = np.arange(dataset_size(dataset))
        label_range = self._label_range(run.num_classes)
        blocks = list(self._forward_blocks(run, dataset, indices, label_range, "validation"))
        return {
            name: np.concatenate([block[name] for block in blocks])
            for name in ("features", "labels", "predictions")
        }

    def _gram(self, run: _Run, gram: torch.Tensor | None, size: int) -> GramOperator:
        """G in memory (where it was summed), or streamed from this process's activation
        cache with the products on the model's device."""
        if gram is not None:
            return DenseGram(gram)
        rows = self._chunk_rows(size)
        return StreamedGram(
            lambda: (b["features"] for b in run.cache.iter_chunks(rows, fields=("features",))),
            size,
            statistics_device(run.device),
        )

    def _solve(
        self, statistics: dict[str, np.ndarray], mu: float, gram: GramOperator
    ) -> LassoSolution:
        """The mu-lasso of every class. With G dense under torch.distributed every process
        holds the same G and B, so each solves every world-size-th class and the solutions
        are gathered (the cvxpy work, which does not shrink with more images, is shared);
        a streamed G's passes are collective, so there every process solves every class."""
        cross = statistics["cross"]
        rank, size = world()
        shared = size > 1 and isinstance(gram, DenseGram)
        columns = np.arange(rank, cross.shape[1], size) if shared else np.arange(cross.shape[1])
        part: LassoSolution | None = None
        failed = ""
        try:
            part = mu_lasso(
                gram,
                cross[:, columns],
                mu,
                self.nonnegative,
                self.solvers,
                self.solver_options,
            )
        except SolverFailedError as error:
            failed = str(error)
        if shared:  # every process learns of a failure anywhere, so none waits forever
            parts = gather_objects((columns, part, failed))
            failed = next((f for _, _, f in parts if f), "")
            if not failed:
                part = merge_solutions(
                    [(c, p) for c, p, _ in parts if p is not None], cross.shape[0], cross.shape[1]
                )
        if failed or part is None:
            raise VebiError(
                f"the mu-lasso with mu={mu:g} could not be solved ({failed}). The weights of a "
                "class sum to at most mu; a mu far above that scale leaves the bound inactive "
                "and the problem an ill-conditioned least squares. Try mining.mu between 1 "
                "and 100 (the default is 10), or let mining.mu_candidates=[1,2,5,10,20] choose "
                "one (with mining.cache_dir set, the rerun reuses the activation cache)"
            )
        solution = part
        for failure, count in Counter(solution.failures).items():
            log.warning(
                "mu-lasso solver fallback: %s%s", failure, f" ({count} times)" if count > 1 else ""
            )
        return solution

    def _check_relevant(self, weights: np.ndarray, mu: float, counts: np.ndarray) -> None:
        """Refuse a W in which no class with samples has a relevant feature (mu too small
        for the tolerance); warn for the classes with samples but no relevant feature."""
        empty = (weights <= self.tolerance).all(axis=0) & (counts > 0)
        if empty.all():
            raise VebiError(
                f"mu={mu:g} leaves no class a relevant feature: the largest weight is "
                f"{weights.max():.3g}, at or below the tolerance {self.tolerance:g}. The weights "
                "of a class sum to at most mu, so mu must be far above the tolerance: try "
                "mining.mu=10 (the default) or mining.mu_candidates=[1,2,5,10,20] (with "
                "mining.cache_dir set, the rerun reuses the activation cache)"
            )
        if empty.any():
            log.warning(
                "%d class(es) with samples have no relevant feature at mu=%g (class ids %s): "
                "a larger mu gives them some",
                int(empty.sum()),
                mu,
                np.flatnonzero(empty)[:10].tolist(),
            )

    def _accuracies(self, blocks: Any, weights: np.ndarray) -> tuple[float, float]:
        """(sparse classifier accuracy, network accuracy) over blocks of cached features."""
        weights32 = weights.astype(np.float32)
        total = sparse = network = 0
        for block in blocks:
            sparse += int(np.sum(np.argmax(block["features"] @ weights32, 1) == block["labels"]))
            network += int(np.sum(block["predictions"] == block["labels"]))
            total += len(block["labels"])
        return sparse / max(total, 1), network / max(total, 1)

    def _choose_mu(
        self,
        statistics: dict[str, np.ndarray],
        gram: GramOperator,
        val: dict[str, np.ndarray] | None,
    ) -> tuple[float, LassoSolution, list[dict[str, float]]]:
        if not self.mu_candidates:
            return self.mu, self._solve(statistics, self.mu, gram), []
        if val is None:
            raise VebiError("choosing mu from mu_candidates needs a validation set")
        path, solutions = [], {}
        targets = self._targets(val["labels"], val["predictions"])
        for candidate in sorted(set(self.mu_candidates)):
            solution = self._solve(statistics, candidate, gram)
            accuracy = float(np.mean(np.argmax(val["features"] @ solution.weights, 1) == targets))
            relevant = int((solution.weights > self.tolerance).sum())
            path.append({"mu": candidate, "sparse_accuracy": accuracy, "relevant": relevant})
            solutions[candidate] = solution
        best = max(row["sparse_accuracy"] for row in path)
        chosen = min(
            row["mu"] for row in path if row["sparse_accuracy"] >= best - self.mu_tolerance
        )
        table = "\n".join(
            f"  {row['mu']:>8g} {100 * row['sparse_accuracy']:9.2f}% {row['relevant']:9d}"
            + ("   <- chosen" if row["mu"] == chosen else "")
            for row in path
        )
        log.info(
            "mu chosen by held-out sparse accuracy: the smallest within %.1f points of the best "
            "(%.2f%%)\n  %8s %10s %9s\n%s",
            100 * self.mu_tolerance,
            100 * best,
            "mu",
            "accuracy",
            "relevant",
            table,
        )
        return chosen, solutions[chosen], path

    def release(self, report: MiningReport) -> None:
        """Delete the run's activation cache unless ``keep_cache`` (call when done with it)."""
        if self.keep_cache or report.cache_path is None:
            return
        path = Path(report.cache_path)
        size = path.stat().st_size / 2**20 if path.exists() else 0.0
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".lock").unlink(missing_ok=True)
        log.info("Deleted the activation cache %s (%.0f MB; mining.keep_cache=false)", path, size)

    # ------------------------------------------------------------------ main
    def mine(
        self,
        model: nn.Module,
        dataset: Dataset,
        val_dataset: Dataset | None = None,
        class_names: Sequence[str] | None = None,
    ) -> MiningReport:
        """Mine the relevant features of ``model`` (any [0, 1]-image classifier) on ``dataset``.

        Under ``torch.distributed`` each process extracts every world_size-th image and the
        statistics are all-reduced, so every process returns the same W. Without
        ``cache_dir`` the activation cache lives in a temporary folder, removed afterwards
        (also when mining fails or is interrupted).
        """
        if self.cache_dir is not None:
            return self._mine(model, dataset, val_dataset, class_names, self.cache_dir)
        temporary = Path(tempfile.mkdtemp(prefix="vebi-activations-"))
        try:
            return self._mine(model, dataset, val_dataset, class_names, temporary)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)

    def _mine(
        self,
        model: nn.Module,
        dataset: Dataset,
        val_dataset: Dataset | None,
        class_names: Sequence[str] | None,
        cache_dir: Path,
    ) -> MiningReport:
        model = network_of(model)
        if dataset_size(dataset) == 0:
            raise VebiError("the mining data set is empty")
        world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        timings: dict[str, float] = {}
        with eval_mode(model):
            run = self._prepare(model, dataset, world, cache_dir)
            given = class_names is not None and len(class_names) > 0
            names = [
                str(n)
                for n in (
                    class_names if given and class_names is not None else range(run.num_classes)
                )
            ]
            if len(names) != run.num_classes:
                raise VebiError(
                    f"{len(names)} class names for a model with {run.num_classes} outputs"
                )
            started = time.perf_counter()
            with run.cache.exclusive() if run.write_cache else contextlib.nullcontext():
                if run.cache.is_complete():
                    log.info("Reusing activation cache %s", run.cache.path)
                    stats = self._statistics_from_cache(run)
                else:
                    stats = self._extract(run)
            statistics = {name: value.cpu().numpy() for name, value in stats.compute().items()}
            gram_matrix = stats.gram_matrix() if run.dense else None  # stays on its device
            del stats
            timings["extract_seconds"] = time.perf_counter() - started
            val = self._features_in_memory(run, val_dataset) if val_dataset is not None else None

        counts = statistics["class_counts"].astype(int)
        empty = [names[c] for c in np.flatnonzero(counts == 0)]
        why = f"no image is {'labelled' if self.labels == 'ground_truth' else 'predicted'} so"
        if len(empty) == 1:
            _warn_user(
                f"class {empty[0]!r} has no samples ({why}): its relevant set is empty; "
                "add images of it to the mining data to explain it"
            )
        elif empty:  # e.g. a subset of ImageNet's classes mined on the 1000-class head
            _warn_user(
                f"{len(empty)} of {len(names)} classes have no samples ({why}; e.g. "
                f"{empty[:3]}): their relevant sets are empty; add images of them to the "
                "mining data to explain them"
            )
        started = time.perf_counter()
        gram = self._gram(run, gram_matrix, int(statistics["cross"].shape[0]))
        mu, solution, mu_path = self._choose_mu(statistics, gram, val)
        self._check_relevant(solution.weights, mu, counts)
        timings["solve_seconds"] = time.perf_counter() - started
        timings["passes"] = float(getattr(gram, "passes", 0))
        timings["pass_seconds"] = float(getattr(gram, "seconds", 0.0))
        del gram, gram_matrix  # G's memory back before the galleries

        split = "val" if val is not None else "train"
        chunk_rows = self._chunk_rows(solution.weights.shape[0])
        metrics = {"mu": mu, "solve_seconds": timings["solve_seconds"]}
        if val is not None or run.write_cache:  # (no cache: no second pass for a metric)
            blocks = [val] if val is not None else run.cache.iter_chunks(chunk_rows)
            sparse, network = self._accuracies(blocks, solution.weights)
            metrics[f"sparse_accuracy_{split}"] = sparse
            metrics[f"network_accuracy_{split}"] = network
        relevant = RelevantFeatures(
            weights=solution.weights,
            index=run.index,
            class_names=names,
            mu=mu,
            nonnegative=self.nonnegative,
            label_source=self.labels,
            tolerance=self.tolerance,
            class_counts=counts.tolist(),
            fingerprint=run.fingerprint,
            metrics=metrics,
            **self._settings(),
        )
        kept = run.cache.path if self.cache_dir and run.write_cache else None
        rows: Any = ActivationCache(kept, "") if kept is not None else None
        if not run.write_cache:
            rows = ForwardRows(self, run)
        gram_mode = "dense" if run.dense else "streamed"
        return MiningReport(
            relevant, solution, kept, timings, mu_path, rows, gram_mode, run.gram_reason
        )


def mine_features(
    model: nn.Module,
    dataset: Dataset,
    mu: float = 10.0,
    val_dataset: Dataset | None = None,
    class_names: Sequence[str] | None = None,
    **options: Any,
) -> RelevantFeatures:
    """The relevant features of ``model`` on ``dataset`` in one call (the Python API):
    ``FeatureMiner(mu=mu, **options).mine(model, dataset, val_dataset, class_names).relevant``.

    ``model`` maps [0, 1] images (N, C, H, W) to logits (or is a LightningModule with such a
    ``net``); ``dataset`` yields (image, label) pairs. Without ``cache_dir`` in ``options``
    the activation cache is a temporary folder, deleted afterwards.
    """
    return FeatureMiner(mu=mu, **options).mine(model, dataset, val_dataset, class_names).relevant
