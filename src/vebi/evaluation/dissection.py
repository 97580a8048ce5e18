"""Which part of the object each relevant feature detects: Network Dissection (Bau et al.,
CVPR 2017) on part masks (docs/method.md, section 5).

For a feature f (channel k of layer l) with activation maps A_f^n on the evaluation images n,
the threshold T_f is its top quantile over every position of every image,
P(A_f > T_f) = 1 - q (q = 0.995, Network Dissection's). The map of image n, bilinearly
upsampled to the image, gives the region M_f^n = {up(A_f^n) >= T_f}, and the IoU of f with part
p over a set of images I is

    IoU_{f,p}(I) = sum_{n in I} |M_f^n & P_p^n| / sum_{n in I} |M_f^n | P_p^n|

(P_p^n: the pixels of part p, background included). A relevant feature of class c is dissected
on c's images; its label is the part of highest IoU when that IoU is at least the floor (0.04,
Network Dissection's), else none. A feature of a global pooling of a map (a global max or
average pool, 1 x 1 or vector output) is dissected through the map it pools (gmp/23 through
relu3/23: the same channel before pooling). Features of other layers without a spatial map
(fully connected outputs) and features whose map is constant on all images get no label, said
so. Per class: the share of its spatial relevant features labelled with a deciding part and the
share of their summed lasso weight on them; the same for ``draws`` random sets with as many
channels per layer (drawn as the ablation draws them), each random channel taking the weight of
a relevant feature of its layer; mean and std over the draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vebi.errors import VebiError, require_int_in_range
from vebi.evaluation.ablation import random_feature_set
from vebi.evaluation.data import EvaluationSet
from vebi.evaluation.methods import spatial_layers
from vebi.mining.features import pooled_sources
from vebi.mining.relevant import RelevantFeatures
from vebi.models.hooks import capture_outputs, eval_mode


@dataclass
class _Feature:
    """One dissected feature: its layer, channel and (once measured) threshold."""

    layer: str
    channel: int
    threshold: float = float("nan")
    constant: bool = False


@dataclass(frozen=True)
class PartMasks:
    """The part label of every pixel of a split's images (N, H, W), the names the labels
    index and the parts that decide the class."""

    labels: torch.Tensor
    names: tuple[str, ...]
    deciding: tuple[str, ...]


def part_masks(datamodule: Any, split: str) -> PartMasks | None:
    """The part masks of ``split`` where the data module has them (``part_labels(split)``,
    ``part_names``, ``deciding_parts``: an8Flower), else None."""
    read = getattr(datamodule, "part_labels", None)
    labels = read(split) if callable(read) else None
    if labels is None:
        return None
    return PartMasks(labels, tuple(datamodule.part_names), tuple(datamodule.deciding_parts))


class FeatureDissection:
    """Network-Dissection labels of the relevant features against part masks (module doc),
    configured by ``evaluation.dissection``."""

    def __init__(
        self,
        quantile: float = 0.995,
        iou_floor: float = 0.04,
        draws: int = 5,
        seed: int = 0,
        batch_size: int = 64,
        progress: bool = True,
    ) -> None:
        if not 0 < quantile < 1:
            raise VebiError(f"evaluation.dissection.quantile must be in (0, 1), got {quantile}")
        if not 0 <= iou_floor < 1:
            raise VebiError(f"evaluation.dissection.iou_floor must be in [0, 1), got {iou_floor}")
        require_int_in_range("evaluation.dissection.draws", draws, 0)
        require_int_in_range("evaluation.dissection.batch_size", batch_size, 1)
        self.quantile = float(quantile)
        self.iou_floor = float(iou_floor)
        self.draws = int(draws)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.progress = progress

    # ------------------------------------------------------------------ measuring
    def _thresholds(self, model: nn.Module, features: list[_Feature], data: EvaluationSet) -> None:
        """T_f of every feature (the k-th largest value, k = ceil((1 - q) N h w)), and
        whether its map is constant; kept as running top-k buffers, one pass."""
        by_layer: dict[str, list[_Feature]] = {}
        for feature in features:
            by_layer.setdefault(feature.layer, []).append(feature)
        top: dict[str, torch.Tensor] = {}
        low: dict[str, torch.Tensor] = {}
        high: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        device = next(model.parameters()).device
        bar = tqdm(total=len(data), desc="dissection thresholds", disable=not self.progress)
        with eval_mode(model), torch.no_grad(), capture_outputs(model, list(by_layer)) as out:
            for batch in data.batches(self.batch_size):
                model(batch.images.to(device))
                for layer, members in by_layer.items():
                    channels = [f.channel for f in members]
                    values = out[layer][:, channels].transpose(0, 1).flatten(1).float()
                    if layer not in counts:
                        per_image = values.shape[1] // len(batch.images)
                        counts[layer] = max(
                            1, math.ceil((1 - self.quantile) * len(data) * per_image)
                        )
                        low[layer] = values.min(1).values
                        high[layer] = values.max(1).values
                        top[layer] = values[:, :0]
                    low[layer] = torch.minimum(low[layer], values.min(1).values)
                    high[layer] = torch.maximum(high[layer], values.max(1).values)
                    pool = torch.cat([top[layer], values], dim=1)
                    top[layer] = pool.topk(min(counts[layer], pool.shape[1]), dim=1).values
                bar.update(len(batch.images))
        bar.close()
        for layer, members in by_layer.items():
            thresholds = top[layer][:, -1]
            constant = high[layer] <= low[layer]
            for i, feature in enumerate(members):
                feature.threshold = float(thresholds[i])
                feature.constant = bool(constant[i])

    def _intersections(
        self,
        model: nn.Module,
        features: list[_Feature],
        data: EvaluationSet,
        parts: torch.Tensor,
        num_parts: int,
        num_classes: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(intersection, union) sums (F, C, P) of every feature's region with every part over
        the images of every class."""
        by_layer: dict[str, list[int]] = {}
        for i, feature in enumerate(features):
            by_layer.setdefault(feature.layer, []).append(i)
        inter = torch.zeros(len(features), num_classes, num_parts, dtype=torch.float64)
        union = torch.zeros_like(inter)
        thresholds = torch.tensor([f.threshold for f in features])
        device = next(model.parameters()).device
        start = 0
        bar = tqdm(total=len(data), desc="dissection IoU", disable=not self.progress)
        with eval_mode(model), torch.no_grad(), capture_outputs(model, list(by_layer)) as out:
            for batch in data.batches(self.batch_size):
                images = batch.images.to(device)
                model(images)
                labels = parts[start : start + len(images)].long().to(device)
                start += len(images)
                onehot = F.one_hot(labels, num_parts).permute(0, 3, 1, 2).flatten(2).float()
                part_area = onehot.sum(2)  # (B, P)
                classes = batch.labels
                for layer, members in by_layer.items():
                    for chunk in torch.split(torch.tensor(members), 32):
                        channels = [features[i].channel for i in chunk.tolist()]
                        maps = F.interpolate(
                            out[layer][:, channels].float(),
                            size=tuple(images.shape[-2:]),
                            mode="bilinear",
                            align_corners=False,
                        )
                        region = (maps >= thresholds[chunk].to(device).view(1, -1, 1, 1)).float()
                        region = region.flatten(2)  # (B, F, HW)
                        overlap = torch.bmm(region, onehot.transpose(1, 2))  # (B, F, P)
                        area = region.sum(2, keepdim=True)  # (B, F, 1)
                        joint = area + part_area[:, None, :] - overlap
                        inter[chunk] += _per_class(overlap, classes, num_classes)
                        union[chunk] += _per_class(joint, classes, num_classes)
                bar.update(len(images))
        bar.close()
        return inter, union

    # ------------------------------------------------------------------ the evaluator
    def __call__(
        self,
        model: nn.Module,
        relevant: RelevantFeatures,
        data: EvaluationSet,
        parts: torch.Tensor,
        part_names: Sequence[str],
        deciding_parts: Sequence[str],
    ) -> dict[str, Any]:
        """Labels of every relevant feature of every class, per-class shares against the
        random sets. ``parts`` (N, H, W): the part label of every pixel of the images of
        ``data`` (in its order), values indexing ``part_names``."""
        if parts.shape[0] != len(data):
            raise VebiError(f"{parts.shape[0]} part-label maps for {len(data)} images")
        unknown = set(deciding_parts) - set(part_names)
        if unknown:
            raise VebiError(f"deciding parts {sorted(unknown)} are not among {list(part_names)}")
        probe = next(iter(data.batches(1))).images.to(next(model.parameters()).device)
        spatial = spatial_layers(model, relevant.layers, probe)
        rng = np.random.default_rng(self.seed)
        sets: list[list[tuple[int, float]]] = []  # per class: relevant (feature id, weight)
        random_sets: list[list[list[tuple[int, float]]]] = []
        for c in range(relevant.num_classes):
            chosen = relevant.relevant(c)
            sets.append([(f.feature_id, f.weight) for f in chosen])
            weights: dict[str, list[float]] = {}
            for f in chosen:
                weights.setdefault(f.layer, []).append(f.weight)
            layers = {layer: len(w) for layer, w in weights.items()}
            draws = []
            for _ in range(self.draws if chosen else 0):
                drawn = random_feature_set(relevant, layers, rng)
                draws.append(
                    [
                        (relevant.index.feature_id(layer, channel), weight)
                        for layer, channels in drawn.items()
                        for channel, weight in zip(channels, weights[layer], strict=True)
                    ]
                )
            random_sets.append(draws)
        ids = sorted(
            {f for s in sets for f, _ in s}
            | {f for draws in random_sets for s in draws for f, _ in s}
        )
        # a global pooling's channel is placed through the map it pools (gmp/23: relu3/23)
        sources = {
            layer: source
            for layer, source in pooled_sources(model, probe, relevant.layers).items()
            if layer not in spatial
        }
        spatial |= spatial_layers(model, sorted(set(sources.values())), probe)
        features = []
        for feature_id in ids:
            layer, channel = relevant.index.locate(feature_id)
            features.append(_Feature(sources.get(layer, layer), channel))
        measured = [f for f in features if f.layer in spatial]
        if measured:
            self._thresholds(model, measured, data)
            inter, union = self._intersections(
                model, measured, data, parts, len(part_names), relevant.num_classes
            )
            iou = (inter / union.clamp_min(1)).numpy()
        position = {id(f): i for i, f in enumerate(measured)}
        row_of = {fid: position.get(id(f)) for fid, f in zip(ids, features, strict=True)}

        def label(fid: int, c: int) -> tuple[str | None, float, list[float], str | None]:
            row = row_of[fid]
            if row is None:
                return None, float("nan"), [], "no spatial map (1 x 1 output)"
            if measured[row].constant:
                return None, float("nan"), [], "constant map on every image"
            values = iou[row, c]
            best = int(values.argmax())
            if values[best] < self.iou_floor:
                return (
                    None,
                    float(values[best]),
                    values.tolist(),
                    f"best IoU below {self.iou_floor}",
                )
            return part_names[best], float(values[best]), values.tolist(), None

        deciding = set(deciding_parts)

        def shares(members: list[tuple[int, float]], c: int) -> tuple[float, float, int]:
            """(share of spatial features with a deciding label, share of their weight, count)."""
            hits = total = 0
            weight_hit = weight_total = 0.0
            for fid, weight in members:
                part, _, _, why = label(fid, c)
                if why and why.startswith("no spatial"):
                    continue
                total += 1
                weight_total += weight
                if part in deciding:
                    hits += 1
                    weight_hit += weight
            if total == 0:
                return float("nan"), float("nan"), 0
            return hits / total, weight_hit / weight_total if weight_total else float("nan"), total

        rows: list[dict[str, Any]] = []
        labelled: list[dict[str, Any]] = []
        for c, name in enumerate(relevant.class_names):
            for fid, weight in sets[c]:
                part, value, values, why = label(fid, c)
                layer, channel = relevant.index.locate(fid)
                labelled.append(
                    {
                        "class": name,
                        "feature": fid,
                        "layer": layer,
                        "channel": channel,
                        "weight": weight,
                        "part": part,
                        "iou": value,
                        "ious": dict(zip(part_names, values, strict=True)) if values else {},
                        "note": why,
                    }
                )
            share, weight_share, spatial_count = shares(sets[c], c)
            random = np.array([shares(s, c)[:2] for s in random_sets[c]]).reshape(-1, 2)
            rows.append(
                {
                    "class": name,
                    "features": len(sets[c]),
                    "spatial_features": spatial_count,
                    "deciding_share": share,
                    "deciding_weight_share": weight_share,
                    "random_deciding_share_mean": _nanmean(random[:, 0]),
                    "random_deciding_share_std": _nanstd(random[:, 0]),
                    "random_deciding_weight_share_mean": _nanmean(random[:, 1]),
                    "random_deciding_weight_share_std": _nanstd(random[:, 1]),
                }
            )
        keys = [k for k in rows[0] if k not in ("class", "features", "spatial_features")]
        average = {k: _nanmean(np.array([r[k] for r in rows], dtype=float)) for k in keys}
        counts = {part: 0 for part in [*part_names, "none"]}
        for entry in labelled:
            counts[entry["part"] or "none"] += 1
        for entry in labelled:
            entry["iou"] = _defined(entry["iou"])
        rows = [{k: _defined(v) for k, v in row.items()} for row in rows]
        average = {k: _defined(v) for k, v in average.items()}
        return {
            "quantile": self.quantile,
            "iou_floor": self.iou_floor,
            "draws": self.draws,
            "num_images": len(data),
            "parts": list(part_names),
            "deciding_parts": list(deciding_parts),
            "features": labelled,
            "label_counts": counts,
            "per_class": rows,
            "average": average,
        }


def _per_class(values: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, F, P) per image -> (F, C, P) summed over the images of each class (float64, CPU)."""
    out = torch.zeros(values.shape[1], num_classes, values.shape[2], dtype=torch.float64)
    out.index_add_(1, classes.long().cpu(), values.double().cpu().transpose(0, 1))
    return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def _nanstd(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.std()) if len(finite) else float("nan")


def _defined(value: Any) -> Any:
    """None for an undefined (NaN) number, so results stay plain JSON: a feature without a
    spatial map has no IoU, a class without spatial features no share."""
    return None if isinstance(value, float) and value != value else value
