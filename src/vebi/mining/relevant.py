"""RelevantFeatures: the mined weights W and the class-relevant features they select."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from vebi.errors import VebiError
from vebi.mining.features import AGGREGATIONS, FeatureExtractor, FeatureIndex
from vebi.models.hooks import capture_outputs, eval_mode
from vebi.utils.io import atomic_path

FORMAT_VERSION = 1
#: Where the regression targets of the mu-lasso come from.
LABEL_SOURCES = ("ground_truth", "predicted")
#: The metadata keys a relevant-features file holds, no more and no fewer.
META_KEYS = (
    "layers",
    "channels",
    "class_names",
    "mu",
    "aggregation",
    "normalize_layers",
    "normalize_global",
    "nonnegative",
    "label_source",
    "tolerance",
    "class_counts",
    "fingerprint",
    "metrics",
)


def _bad_entry(path: Path, entry: str, problem: str) -> VebiError:
    return VebiError(
        f"{path}: the entry {entry!r} {problem}: the file is damaged or was not written by "
        "vebi; mine the features again"
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _checked_meta(path: Path, meta: dict[str, Any]) -> FeatureIndex:
    """Check the types and values of a file's metadata; pop layers and channels into the
    :class:`FeatureIndex` they describe."""

    def number(entry: str, low: float, inclusive: bool) -> None:
        value = meta[entry]
        ok = _is_number(value) and math.isfinite(value)
        if not ok or not (value >= low if inclusive else value > low):
            allowed = f"a finite number {'>=' if inclusive else '>'} {low:g}"
            raise _bad_entry(path, entry, f"must be {allowed}, is {value!r}")

    def listed(entry: str, check: Any, what: str) -> list[Any]:
        value = meta[entry]
        if not isinstance(value, list) or not all(check(item) for item in value):
            raise _bad_entry(path, entry, f"must be a list of {what}, is {value!r:.200}")
        return value

    layers = listed("layers", lambda v: isinstance(v, str) and v, "layer names")
    channels = listed("channels", lambda v: _is_int(v) and v >= 1, "channel counts >= 1")
    if not layers or len(layers) != len(channels) or len(set(layers)) != len(layers):
        raise _bad_entry(
            path, "layers", f"must name distinct layers, one per channel count ({channels})"
        )
    if not listed("class_names", lambda v: isinstance(v, str), "strings"):
        raise _bad_entry(path, "class_names", "must name at least one class")
    number("mu", 0, inclusive=False)
    number("tolerance", 0, inclusive=True)
    for entry in ("normalize_layers", "normalize_global", "nonnegative"):
        if not isinstance(meta[entry], bool):
            raise _bad_entry(path, entry, f"must be true or false, is {meta[entry]!r}")
    if not isinstance(meta["aggregation"], str) or meta["aggregation"] not in AGGREGATIONS:
        raise _bad_entry(path, "aggregation", f"must be one of {sorted(AGGREGATIONS)}")
    if meta["label_source"] not in LABEL_SOURCES:
        raise _bad_entry(path, "label_source", f"must be one of {list(LABEL_SOURCES)}")
    counts = listed("class_counts", lambda v: _is_int(v) and v >= 0, "image counts >= 0")
    if counts and len(counts) != len(meta["class_names"]):
        raise _bad_entry(
            path, "class_counts", f"has {len(counts)} counts for {len(meta['class_names'])} classes"
        )
    for entry, check, what in (
        ("fingerprint", lambda v: isinstance(v, str), "strings"),
        ("metrics", _is_number, "numbers"),
    ):
        value = meta[entry]
        if not isinstance(value, dict) or not all(check(v) for v in value.values()):
            raise _bad_entry(path, entry, f"must map names to {what}, is {value!r:.200}")
    meta.pop("layers"), meta.pop("channels")
    return FeatureIndex(tuple(layers), tuple(channels))


def _check_weights_dataset(path: Path, dataset: Any, shape: tuple[int, int]) -> None:
    """The ``weights`` dataset is real floating point, of ``shape`` and fully stored (checked
    on its header: nothing is read)."""
    if not isinstance(dataset, h5py.Dataset):
        raise _bad_entry(path, "weights", f"must be a dataset, is a {type(dataset).__name__}")
    if dataset.dtype.kind != "f":
        raise _bad_entry(
            path, "weights", f"must hold real floating-point numbers, holds {dataset.dtype}"
        )
    if dataset.shape != shape:
        raise _bad_entry(
            path,
            "weights",
            f"has shape {dataset.shape}, but the metadata describe {shape[0]} features "
            f"(the sum of 'channels') x {shape[1]} classes ('class_names')",
        )
    unfiltered = dataset.id.get_create_plist().get_nfilters() == 0  # stored size = array size
    if unfiltered and dataset.id.get_storage_size() < dataset.size * dataset.dtype.itemsize:
        raise _bad_entry(path, "weights", "stores less data than its shape declares")


@dataclass(frozen=True)
class RelevantFeature:
    """One relevant feature of a class: channel ``channel`` of layer ``layer``, weight w_c[f]."""

    feature_id: int
    layer: str
    channel: int
    weight: float
    rank: int


@dataclass
class RelevantFeatures:
    """W (m x C) of the mu-lasso and the settings that produced it.

    Relevant features of class c are those with ``W[f, c] > tolerance``, ranked by weight.
    ``fingerprint`` identifies the checkpoint weights and data set they were mined from.
    """

    weights: np.ndarray
    index: FeatureIndex
    class_names: list[str]
    mu: float
    aggregation: str = "energy"
    normalize_layers: bool = True
    normalize_global: bool = True
    nonnegative: bool = True
    label_source: str = "ground_truth"
    tolerance: float = 1e-6
    class_counts: list[int] = field(default_factory=list)
    fingerprint: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.weights = np.asarray(self.weights, dtype=np.float64)
        if self.weights.shape != (self.index.size, len(self.class_names)):
            raise VebiError(
                f"weights {self.weights.shape} do not match {self.index.size} features x "
                f"{len(self.class_names)} classes"
            )
        if not np.isfinite(self.weights).all():
            bad = int((~np.isfinite(self.weights)).sum())
            raise VebiError(f"the weights hold {bad} NaN/Inf value(s): mine the features again")

    def extractor(self, model: nn.Module) -> FeatureExtractor:
        """A :class:`FeatureExtractor` computing x as these features were mined (same layers,
        aggregation and normalisations)."""
        return FeatureExtractor(
            model, self.layers, self.aggregation, self.normalize_layers, self.normalize_global
        )

    def check_model(self, model: nn.Module, images: torch.Tensor) -> None:
        """Refuse features whose layers ``model`` lacks or whose channel counts differ from what
        its layers output on ``images`` (one small forward pass, no gradients)."""
        with (
            eval_mode(model),
            capture_outputs(model, self.index.layers) as outputs,
            torch.no_grad(),
        ):
            model(images[:1])
        wrong = [
            f"{layer}: {expected} in the file, {outputs[layer].shape[1]} in the network"
            for layer, expected in zip(self.index.layers, self.index.channels, strict=True)
            if layer in outputs and outputs[layer].shape[1] != expected
        ]
        missing = [layer for layer in self.index.layers if layer not in outputs]
        if missing:
            wrong.append(f"layers {missing} did not run in the forward pass")
        if wrong:
            raise VebiError(
                "these relevant features do not belong to this network ("
                + "; ".join(wrong)
                + "): pass the relevant_features.h5 mined from it, or mine again"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def layers(self) -> tuple[str, ...]:
        return self.index.layers

    def relevant(self, class_id: int) -> list[RelevantFeature]:
        """The relevant features of ``class_id``, highest weight first."""
        column = self.weights[:, class_id]
        chosen = np.flatnonzero(column > self.tolerance)
        chosen = chosen[np.argsort(-column[chosen], kind="stable")]
        return [
            RelevantFeature(int(f), *self.index.locate(int(f)), float(column[f]), rank)
            for rank, f in enumerate(chosen)
        ]

    def relevant_mask(self) -> np.ndarray:
        """Boolean (m, C): feature f is relevant for class c."""
        return self.weights > self.tolerance

    def per_layer_counts(self) -> dict[str, list[int]]:
        """Number of relevant features of each class in each layer."""
        mask = self.relevant_mask()
        counts = {}
        for layer, offset, size in zip(
            self.index.layers, self.index.offsets, self.index.channels, strict=True
        ):
            counts[layer] = mask[offset : offset + size].sum(axis=0).astype(int).tolist()
        return counts

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The sparse classifier argmax_c x^T w_c for features (N, m)."""
        return np.argmax(np.asarray(features) @ self.weights, axis=1)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (HDF5) and ``<stem>.json`` / ``<stem>.md`` summaries, each atomically."""
        path = Path(path)
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
            handle.create_dataset("weights", data=self.weights)
            handle.attrs["format_version"] = FORMAT_VERSION
            handle.attrs["meta"] = json.dumps(self._meta())
        with atomic_path(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(self.summary(), indent=2))
        with atomic_path(path.with_suffix(".md")) as tmp:
            tmp.write_text(self.markdown())
        return path

    def _meta(self) -> dict[str, Any]:
        return {
            "layers": list(self.index.layers),
            "channels": list(self.index.channels),
            "class_names": list(self.class_names),
            "mu": self.mu,
            "aggregation": self.aggregation,
            "normalize_layers": self.normalize_layers,
            "normalize_global": self.normalize_global,
            "nonnegative": self.nonnegative,
            "label_source": self.label_source,
            "tolerance": self.tolerance,
            "class_counts": list(self.class_counts),
            "fingerprint": dict(self.fingerprint),
            "metrics": dict(self.metrics),
        }

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RelevantFeatures:
        """Read a relevant-features file written by :meth:`save`.

        The metadata (types and values) and the ``weights`` dataset's dtype (real floating
        point), shape ((sum of channels) x (number of classes)) and stored size are checked
        before the array is read, so a damaged or crafted file is a :class:`VebiError` naming
        the file and the entry, never a huge allocation or a silently wrong relevant set.
        """
        path = Path(path)
        if not path.is_file():
            raise VebiError(
                f"no relevant-features file at {path}: mine them first (python mine.py ...)"
            )
        try:
            with h5py.File(path, "r") as handle:
                meta = json.loads(handle.attrs["meta"])
                expected = set(META_KEYS)
                keys = set(meta) if isinstance(meta, dict) else set()
                if keys != expected:
                    raise VebiError(
                        f"{path} has unexpected metadata (missing: {sorted(expected - keys)}, "
                        f"unknown: {sorted(keys - expected)}): it was not written by this "
                        "version of vebi; mine the features again"
                    )
                index = _checked_meta(path, meta)
                dataset = handle["weights"]
                _check_weights_dataset(path, dataset, (index.size, len(meta["class_names"])))
                weights = dataset[...]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
            raise VebiError(f"{path} is not a readable relevant-features file: {error}") from error
        try:
            return cls(weights=weights, index=index, **meta)
        except VebiError as error:
            raise VebiError(f"{path}: {error}") from error

    def summary(self) -> dict[str, Any]:
        meta = self._meta()
        meta["relevant"] = {
            name: [
                {"layer": f.layer, "channel": f.channel, "weight": round(f.weight, 6)}
                for f in self.relevant(c)
            ]
            for c, name in enumerate(self.class_names)
        }
        meta["per_layer_counts"] = self.per_layer_counts()
        return meta

    def markdown(self, top: int = 10) -> str:
        lines = [
            "# Relevant features",
            "",
            f"mu = {self.mu}, aggregation = {self.aggregation}, {self.index.size} features in "
            f"{len(self.index.layers)} layers ({', '.join(self.index.layers)}).",
            "",
        ]
        if self.metrics:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in self.metrics.items()]
            lines.append("")
        lines += [
            f"| class | # relevant | top features (layer/channel: weight, up to {top}) |",
            "|---|---|---|",
        ]
        for c, name in enumerate(self.class_names):
            features = self.relevant(c)
            shown = ", ".join(f"{f.layer}/{f.channel}: {f.weight:.3f}" for f in features[:top])
            lines.append(f"| {name} | {len(features)} | {shown} |")
        lines += ["", "| layer | " + " | ".join(self.class_names) + " |"]
        lines.append("|---" * (len(self.class_names) + 1) + "|")
        for layer, counts in self.per_layer_counts().items():
            lines.append(f"| {layer} | " + " | ".join(str(n) for n in counts) + " |")
        return "\n".join(lines) + "\n"
