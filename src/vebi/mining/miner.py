"""FeatureMiner: extraction -> sufficient statistics -> mu-lasso -> RelevantFeatures."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from vebi.errors import VebiError
from vebi.mining.cache import ActivationCache
from vebi.mining.features import FeatureExtractor, default_feature_layers, eval_mode
from vebi.mining.relevant import RelevantFeatures
from vebi.mining.solver import DEFAULT_SOLVERS, LassoSolution, mu_lasso
from vebi.mining.statistics import GramStatistics

log = logging.getLogger(__name__)
LABEL_SOURCES = ("ground_truth", "predicted")


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def dataset_fingerprint(dataset: Dataset, samples: int = 64) -> str:
    """SHA-256 of the length and of ``samples`` evenly spaced items (images and labels)."""
    length = len(dataset)
    digest = hashlib.sha256(str(length).encode())
    for position in np.linspace(0, length - 1, num=min(samples, length), dtype=int):
        item = dataset[int(position)]
        for part in item[:2]:
            digest.update(torch.as_tensor(part).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _images_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise VebiError("mining needs a data set of (image, label[, ...]) items")
    return batch[0], torch.as_tensor(batch[1])


@dataclass
class MiningReport:
    """What a mining run produced and how long each stage took."""

    relevant: RelevantFeatures
    solution: LassoSolution
    cache_path: Path | None
    timings: dict[str, float] = field(default_factory=dict)
    mu_path: list[dict[str, float]] = field(default_factory=list)


class FeatureMiner:
    """Mines class-relevant features of a trained classifier (METHOD.md sections 1-2).

    Args:
        mu: the L1 bound of the mu-lasso (> 0).
        layers: module names to read; ``None`` = every layer output up to the logits.
        aggregation: ``energy`` (default), ``mean`` or ``max`` per channel.
        nonnegative: constrain the weights to w >= 0.
        labels: ``ground_truth`` or ``predicted`` labels as the regression targets.
        tolerance: weights above it make a feature relevant.
        solvers / solver_options: cvxpy solvers tried in order, and their options.
        mu_candidates: if given, mu is picked among them by the held-out accuracy of the
            sparse classifier argmax(x^T W) (needs a validation set).
        batch_size: images per forward pass; chunk_rows: rows per resumable cache chunk.
        cache_dir: folder of the activation caches (named by fingerprint); ``None`` keeps
            none after the run.
        progress: show progress bars.
    """

    def __init__(
        self,
        mu: float = 10.0,
        layers: Sequence[str] | None = None,
        aggregation: str = "energy",
        normalize_layers: bool = True,
        normalize_global: bool = True,
        nonnegative: bool = True,
        labels: str = "ground_truth",
        tolerance: float = 1e-6,
        solvers: Sequence[str] = DEFAULT_SOLVERS,
        solver_options: dict[str, dict[str, Any]] | None = None,
        mu_candidates: Sequence[float] | None = None,
        batch_size: int = 500,
        chunk_rows: int = 8192,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        for value in [mu, *(mu_candidates or [])]:
            if not np.isfinite(value) or value <= 0:
                raise VebiError(f"mu must be a positive number, got {value}")
        if labels not in LABEL_SOURCES:
            raise VebiError(f"labels must be one of {LABEL_SOURCES}, got {labels!r}")
        if batch_size < 1 or chunk_rows < 1:
            raise VebiError("batch_size and chunk_rows must be >= 1")
        self.mu = float(mu)
        self.layers = list(layers) if layers else None
        self.aggregation = aggregation
        self.normalize_layers = normalize_layers
        self.normalize_global = normalize_global
        self.nonnegative = nonnegative
        self.labels = labels
        self.tolerance = tolerance
        self.solvers = tuple(solvers)
        self.solver_options = {k: dict(v) for k, v in (solver_options or {}).items()}
        self.mu_candidates = [float(v) for v in mu_candidates] if mu_candidates else None
        self.batch_size = batch_size
        self.chunk_rows = chunk_rows
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.progress = progress

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

    def _loader(self, dataset: Dataset, indices: Sequence[int]) -> DataLoader:
        return DataLoader(Subset(dataset, list(indices)), batch_size=self.batch_size, shuffle=False)

    def _targets(self, labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
        return labels if self.labels == "ground_truth" else predictions

    # ------------------------------------------------------------------ stages
    def _extract_to_cache(
        self, model: nn.Module, layers: Sequence[str], dataset: Dataset, indices: np.ndarray,
        cache: ActivationCache, device: torch.device, description: str,
    ) -> None:  # fmt: skip
        with self._extractor(model, layers) as extractor:
            probe, _ = _images_labels(next(iter(self._loader(dataset, indices[:1]))))
            extractor(probe.to(device))
            done = cache.resume_or_create(len(indices), extractor.index, self.chunk_rows)
            pending: list[dict[str, np.ndarray]] = []
            pending_rows, position = 0, done
            bar = tqdm(total=len(indices), initial=done, desc=description, unit="img",
                       disable=not self.progress, dynamic_ncols=True)  # fmt: skip
            with bar:
                for number, batch in enumerate(self._loader(dataset, indices[done:])):
                    images, labels = _images_labels(batch)
                    first = done + number * self.batch_size
                    rows = f"data rows {first}..{first + len(images) - 1}"
                    x, logits = extractor(images.to(device), f" in batch {number} ({rows})")
                    pending.append({
                        "features": x.cpu().numpy(),
                        "labels": labels.numpy().astype(np.int64),
                        "predictions": logits.argmax(1).cpu().numpy().astype(np.int64),
                        "indices": indices[first : first + len(images)].astype(np.int64),
                    })  # fmt: skip
                    pending_rows += len(images)
                    bar.update(len(images))
                    if pending_rows >= self.chunk_rows:
                        position = cache.write_rows(position, pending)
                        pending, pending_rows = [], 0
                if pending:
                    cache.write_rows(position, pending)
        cache.finish()

    def _extract_in_memory(
        self, model: nn.Module, layers: Sequence[str], dataset: Dataset, device: torch.device
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        xs, labels, predictions = [], [], []
        with self._extractor(model, layers) as extractor:
            loader = self._loader(dataset, range(len(dataset)))
            for number, batch in enumerate(
                tqdm(loader, desc="features (val)", disable=not self.progress)
            ):
                images, y = _images_labels(batch)
                x, logits = extractor(
                    images.to(device), batch_label=f" in validation batch {number}"
                )
                xs.append(x.cpu().numpy())
                labels.append(y.numpy())
                predictions.append(logits.argmax(1).cpu().numpy())
        return np.concatenate(xs), np.concatenate(labels), np.concatenate(predictions)

    def _statistics(
        self, cache: ActivationCache, num_classes: int, device: torch.device
    ) -> dict[str, np.ndarray]:
        index = cache.feature_index()
        stats = GramStatistics(index.size, num_classes).to(device)
        for block in cache.iter_chunks(rows=self.chunk_rows):
            targets = self._targets(block["labels"], block["predictions"])
            stats.update(
                torch.from_numpy(block["features"]).to(device), torch.from_numpy(targets).to(device)
            )
        return {name: value.cpu().numpy() for name, value in stats.compute().items()}

    def _solve(self, statistics: dict[str, np.ndarray], mu: float) -> LassoSolution:
        solution = mu_lasso(
            statistics["gram"], statistics["cross"], mu, self.nonnegative, self.solvers,
            self.solver_options,
        )  # fmt: skip
        for failure in solution.failures:
            log.warning("mu-lasso solver fallback: %s", failure)
        return solution

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
        statistics are all-reduced, so every process returns the same W.
        """
        if len(dataset) == 0:
            raise VebiError("the mining data set is empty")
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        device = next(model.parameters()).device
        timings: dict[str, float] = {}
        with eval_mode(model):
            probe, _ = _images_labels(next(iter(self._loader(dataset, [0]))))
            probe = probe.to(device)
            layers = self.layers or default_feature_layers(model, probe)
            with self._extractor(model, layers) as extractor, torch.no_grad():
                num_classes = int(extractor(probe)[1].shape[1])
            names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
            if len(names) != num_classes:
                raise VebiError(f"{len(names)} class names for a model with {num_classes} outputs")
            fingerprint = {
                "model": model_fingerprint(model),
                "data": dataset_fingerprint(dataset),
                "settings": hashlib.sha256(
                    json.dumps({"layers": list(layers), **self._settings()}).encode()
                ).hexdigest(),
            }
            cache_key = hashlib.sha256(json.dumps([fingerprint, rank, world]).encode()).hexdigest()
            cache_dir = self.cache_dir or Path(_temporary_dir())
            suffix = f"-rank{rank}of{world}" if world > 1 else ""
            cache = ActivationCache(
                cache_dir / f"activations-{cache_key[:16]}{suffix}.h5", cache_key
            )

            started = time.perf_counter()
            indices = np.arange(rank, len(dataset), world)
            if cache.is_complete():
                log.info("Reusing activation cache %s", cache.path)
            else:
                self._extract_to_cache(
                    model, layers, dataset, indices, cache, device, "features (train)"
                )
            timings["extract_seconds"] = time.perf_counter() - started

            started = time.perf_counter()
            statistics = self._statistics(cache, num_classes, device)
            timings["statistics_seconds"] = time.perf_counter() - started
            counts = statistics["class_counts"].astype(int)
            for c in np.flatnonzero(counts == 0):
                warnings.warn(
                    f"class {names[c]!r} has no samples: its relevant set is empty", stacklevel=2
                )

            val = (
                self._extract_in_memory(model, layers, val_dataset, device)
                if val_dataset is not None
                else None
            )

        mu_path: list[dict[str, float]] = []
        mu = self.mu
        started = time.perf_counter()
        if self.mu_candidates:
            if val is None:
                raise VebiError("choosing mu from mu_candidates needs a validation set")
            best = None
            for candidate in self.mu_candidates:
                solution = self._solve(statistics, candidate)
                accuracy = float(
                    np.mean(
                        np.argmax(val[0] @ solution.weights, 1) == self._targets(val[1], val[2])
                    )
                )
                mu_path.append({"mu": candidate, "sparse_accuracy": accuracy})
                if best is None or accuracy > best[0]:
                    best = (accuracy, candidate, solution)
            _, mu, solution = best
            log.info("Chose mu = %g by held-out sparse accuracy: %s", mu, mu_path)
        else:
            solution = self._solve(statistics, mu)
        timings["solve_seconds"] = time.perf_counter() - started

        metrics = {"solve_seconds": timings["solve_seconds"], "mu": mu}
        if val is not None:
            x_eval, labels_eval, predictions_eval = val
            split = "val"
        else:
            x_eval, labels_eval, predictions_eval = (
                cache.read(n) for n in ("features", "labels", "predictions")
            )
            split = "train"
        metrics[f"sparse_accuracy_{split}"] = float(
            np.mean(np.argmax(x_eval @ solution.weights, 1) == labels_eval)
        )
        metrics[f"network_accuracy_{split}"] = float(np.mean(predictions_eval == labels_eval))
        relevant = RelevantFeatures(
            weights=solution.weights, index=cache.feature_index(), class_names=names, mu=mu,
            nonnegative=self.nonnegative, label_source=self.labels, tolerance=self.tolerance,
            class_counts=counts.tolist(), fingerprint=fingerprint, metrics=metrics,
            **self._settings(),
        )  # fmt: skip
        kept = cache.path if self.cache_dir else None
        if self.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
        return MiningReport(relevant, solution, kept, timings, mu_path)


def _temporary_dir() -> str:
    return tempfile.mkdtemp(prefix="vebi-activations-")
