"""Interpretation: average visualisations of the relevant features (docs/method.md, section 3)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from vebi.explain.backprop import backprop_feature
from vebi.explain.figures import gallery_figure, save_figure, top_images_figure
from vebi.explain.heatmaps import signal_to_heatmap
from vebi.explain.rules import Rules
from vebi.mining.cache import ActivationCache
from vebi.mining.relevant import RelevantFeatures
from vebi.utils.distributed import gather_objects, is_main_process, world
from vebi.utils.io import safe_file_name
from vebi.utils.wandb_media import log_figures


class FeatureRows(Protocol):
    """Row blocks of X in the layout of :meth:`ActivationCache.iter_chunks`."""

    def iter_chunks(
        self, rows: int | None = None, *, fields: Sequence[str] = ...
    ) -> Iterable[dict[str, np.ndarray]]: ...


@dataclass
class FeatureVisualisation:
    """The average visualisation of one relevant feature of one class."""

    class_id: int
    layer: str
    channel: int
    weight: float
    average_map: torch.Tensor  # (H, W) in [0, 1]
    average_image: torch.Tensor  # (C, H, W)
    dataset_indices: list[int]  # the top-N images it averages


def top_images_per_feature(
    relevant: RelevantFeatures, cache: FeatureRows, top_n: int
) -> dict[tuple[int, int], list[int]]:
    """For each class c and relevant feature f of c: the data-set indices of the ``top_n``
    images of class c with the largest x[f], largest first (ties: the smaller index first).

    ``cache``: the activation cache, or any source of its row blocks (a mining run's
    ``report.rows``: a second forward pass when no cache was written). One streamed pass
    over it, reading only the relevant features' columns and keeping
    a running top-N per (class, feature): memory O(C k N_top), not N x m. Under
    torch.distributed each process's cache holds its shard of the images: every process ranks
    its shard, the shards' top-N are gathered and merged, and every process gets the ranking
    of all images (that of one process).
    """
    wanted = {c: [f.feature_id for f in relevant.relevant(c)] for c in range(relevant.num_classes)}
    columns = sorted({f for ids in wanted.values() for f in ids})
    if not columns:
        return {}
    position = {f: j for j, f in enumerate(columns)}
    # running best: per class, values (k, f) and data-set indices (k, f), sorted best first
    best: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for chunk in cache.iter_chunks(fields=("features", "labels", "indices")):
        values = chunk["features"][:, columns]
        for class_id, ids in wanted.items():
            rows = np.flatnonzero(chunk["labels"] == class_id)
            if not ids or len(rows) == 0:
                continue
            new_values = values[np.ix_(rows, np.array([position[f] for f in ids]))]
            new_indices = np.broadcast_to(chunk["indices"][rows][:, None], new_values.shape)
            best[class_id] = _best(best.get(class_id), (new_values, new_indices), top_n)
    if world()[1] > 1:  # merge the shards' rankings
        merged: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for shard in gather_objects(best):
            for class_id, candidates in shard.items():
                merged[class_id] = _best(merged.get(class_id), candidates, top_n)
        best = merged
    ranked = {}
    for class_id, (_, indices) in sorted(best.items()):
        for j, feature_id in enumerate(wanted[class_id]):
            ranked[(class_id, feature_id)] = indices[:, j].tolist()
    return ranked


def _best(
    kept: tuple[np.ndarray, np.ndarray] | None,
    new: tuple[np.ndarray, np.ndarray],
    top_n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_n`` rows of (values, data-set indices) per column, by value descending, then
    by index ascending."""
    values, indices = new
    if kept is not None:
        values, indices = np.concatenate([kept[0], values]), np.concatenate([kept[1], indices])
    order = np.lexsort((indices, -values), axis=0)[:top_n]
    return np.take_along_axis(values, order, 0), np.take_along_axis(indices, order, 0)


def average_visualisations(
    model: nn.Module,
    relevant: RelevantFeatures,
    dataset: Dataset,
    cache: FeatureRows,
    top_n: int = 20,
    rules: Rules | None = None,
    device: torch.device | str | None = None,
) -> list[FeatureVisualisation]:
    """For each relevant feature f of each class c: heatmaps of f on the top-N training images
    of c ranked by x[f], each normalised to [0, 1], averaged (and the images averaged too).

    Under torch.distributed every process gets all of them: the ranking is merged over the
    processes' caches, each process propagates every world-size-th feature, and the results
    are gathered."""
    rules = rules or Rules()
    device = device or next(model.parameters()).device
    ranked = top_images_per_feature(relevant, cache, top_n)
    jobs = []
    for class_id in range(relevant.num_classes):
        for feature in relevant.relevant(class_id):
            chosen = ranked.get((class_id, feature.feature_id), [])
            if not chosen:
                break
            jobs.append((class_id, feature, chosen))
    rank, size = world()
    mine = []
    for class_id, feature, chosen in jobs[rank::size]:
        images = torch.stack([torch.as_tensor(dataset[i][0]) for i in chosen]).to(device)
        signal = backprop_feature(model, images, feature.layer, feature.channel, rules=rules)
        mine.append(
            FeatureVisualisation(
                class_id,
                feature.layer,
                feature.channel,
                feature.weight,
                signal_to_heatmap(signal).mean(0).cpu(),
                images.mean(0).cpu(),
                chosen,
            )
        )
    shares = gather_objects(mine)  # process r holds jobs r, r + size, ...: back in job order
    return [shares[j % size][j // size] for j in range(len(jobs))]


#: (class, layer, channel) -> (the part a feature detects, or None; its IoU with that part)
PartLabels = Mapping[tuple[int, str, int], tuple[str | None, float | None]]


def _part_caption(label: tuple[str | None, float | None] | None) -> str:
    if label is None:
        return "part: n/a"
    part, iou = label
    if part is None:
        return "no part" if iou is None or iou != iou else f"no part (IoU {iou:.2f})"
    return f"{part} IoU {iou:.2f}"


def gallery_file(folder: str | Path, class_id: int, name: str, kind: str = "") -> Path:
    """``<folder>/class_<c>_<name>.png`` (the gallery), or ``..._<kind>.png``."""
    suffix = f"_{kind}" if kind else ""
    return Path(folder) / f"class_{class_id}_{safe_file_name(name)}{suffix}.png"


def save_galleries(
    visualisations: list[FeatureVisualisation],
    relevant: RelevantFeatures,
    folder: str | Path,
    dataset: Dataset | None = None,
    thumbnails: int = 0,
    part_labels: PartLabels | None = None,
) -> list[Path]:
    """One PNG per class with relevant features, ``<folder>/class_<c>_<name>.png`` (classes
    without any, e.g. those of a 1000-class head that had no mining images, get none), and,
    with ``thumbnails`` > 0 and the ``dataset``, ``class_<c>_<name>_top.png``: each feature's
    first ``thumbnails`` top training images (those its average visualisation averages);
    returns their paths (the galleries first). ``part_labels``: (class, layer, channel) -> (the
    part the feature detects or None, its IoU), written under each tile, as Network
    Dissection labels its units."""
    paths, tops = [], []
    for class_id, name in enumerate(relevant.class_names):
        tiles = [v for v in visualisations if v.class_id == class_id]
        if not tiles:
            continue
        titles = [f"{v.layer}/{v.channel} w={v.weight:.2f}" for v in tiles]
        if part_labels is not None:
            titles = [
                f"{title}\n{_part_caption(part_labels.get((class_id, v.layer, v.channel)))}"
                for title, v in zip(titles, tiles, strict=True)
            ]
        figure = gallery_figure(
            [v.average_map for v in tiles],
            [v.average_image for v in tiles],
            titles,
            f"class {name}: average visualisations of its {len(tiles)} relevant features",
        )
        paths.append(save_figure(figure, gallery_file(folder, class_id, name)))
        if thumbnails > 0 and dataset is not None:
            images = [
                [torch.as_tensor(dataset[i][0]) for i in v.dataset_indices[:thumbnails]]
                for v in tiles
            ]
            figure = top_images_figure(
                images, titles, f"class {name}: top training images of each relevant feature"
            )
            tops.append(save_figure(figure, gallery_file(folder, class_id, name, "top")))
    return paths + tops


def interpret_and_log(
    model: nn.Module,
    relevant: RelevantFeatures,
    dataset: Dataset,
    cache_path: str | Path | FeatureRows,
    folder: str | Path,
    loggers: list,
    top_n: int = 20,
    thumbnails: int = 8,
    part_labels: PartLabels | None = None,
    rules: Rules | None = None,
) -> list[Path]:
    """Average visualisations of every relevant feature, a gallery PNG per class and a PNG of
    its features' top ``thumbnails`` training images, logged to W&B as images
    (``interpretation/galleries``, ``interpretation/top_images``). Under torch.distributed
    every process must call it (with its own cache shard); the first writes and logs (the
    others return []). ``cache_path``: the activation cache, or another source of its rows
    (:func:`top_images_per_feature`). ``part_labels``: see :func:`save_galleries`;
    ``rules``: the backward rules of the visualisations (None: the default)."""
    cache = (
        ActivationCache(cache_path, fingerprint="")
        if isinstance(cache_path, str | Path)
        else cache_path
    )
    visualisations = average_visualisations(model, relevant, dataset, cache, top_n, rules)
    if not is_main_process():  # every process took part; one writes
        return []
    paths = save_galleries(visualisations, relevant, folder, dataset, thumbnails, part_labels)
    galleries = [p for p in paths if not p.stem.endswith("_top")]
    tops = [p for p in paths if p.stem.endswith("_top")]
    log_figures(loggers, "interpretation/galleries", galleries, [p.stem for p in galleries])
    if tops:
        log_figures(loggers, "interpretation/top_images", tops, [p.stem for p in tops])
    return paths
