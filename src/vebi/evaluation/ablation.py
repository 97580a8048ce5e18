"""Relevance by ablation (docs/method.md, section 5) and the sparse classifier's accuracy.

Ablating a feature set S means zeroing, in every forward pass, channel k of the output of
layer l for each (l, k) in S. For class c with relevant set R_c:

    drop_own(S)    = acc_c - acc_c(S)              (accuracy on the images of class c)
    drop_others(S) = acc_{!c} - acc_{!c}(S)         (accuracy on other images)

compared with random sets of the same size and layer distribution: for each layer, as many
channels of that layer as R_c has there, drawn uniformly without replacement (``draws`` sets,
mean and standard deviation). Relevant features matter when drop_own(R_c) is well above the
random sets' drop while drop_others(R_c) stays small. Other pickers of per-class sets of the
same size and layers (``compare``: CRP's class-level relevance ranking,
:class:`vebi.evaluation.peers.CRPClassPick`) are ablated alongside, so the table says whose
pick matters more to the network.

Cost. drop_own needs the N_c images of class c; drop_others is measured on a fixed, seeded,
stratified sample of K test images (``other_images``; those of class c left out), not on all
N - N_c. With one unablated pass for the baseline, the image forwards are

    N + (1 + draws) * sum_c (N_c + K_!c)  <=  N + (1 + draws) * (N + C K)

instead of (1 + draws) * C * N: linear in N. ``other_images=None`` measures drop_others on
every other image (the exact, C x N cost).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from vebi.errors import VebiError
from vebi.evaluation.data import EvaluationSet, forward_batch_size
from vebi.mining.relevant import RelevantFeatures
from vebi.models.hooks import check_layer_names, eval_mode, inference_mode
from vebi.utils.distributed import all_reduce_sum, world

FeatureSet = Mapping[str, Sequence[int]]


def random_feature_set(
    relevant: RelevantFeatures, layers: Mapping[str, int], rng: np.random.Generator
) -> dict[str, list[int]]:
    """As many channels per layer as ``layers`` says, drawn uniformly without replacement from
    the channels of that layer: the random control of a relevant set of that size and layers."""
    sizes = dict(zip(relevant.index.layers, relevant.index.channels, strict=True))
    return {
        layer: sorted(rng.choice(sizes[layer], size=n, replace=False).tolist())
        for layer, n in layers.items()
    }


@contextlib.contextmanager
def ablated(model: nn.Module, features: FeatureSet) -> Iterator[nn.Module]:
    """Within the block, the listed channels of each layer's output are zero."""
    check_layer_names(model, list(features))
    modules = dict(model.named_modules())

    def hook(channels: list[int]) -> Any:
        def zero(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            output[:, channels] = 0
            return output

        return zero

    with contextlib.ExitStack() as stack:
        for layer, channels in features.items():
            if len(channels):
                handle = modules[layer].register_forward_hook(hook(sorted(set(map(int, channels)))))
                stack.callback(handle.remove)
        yield model


@dataclass
class ClassAblation:
    """Accuracy drops (in [0, 1]) of one class: its relevant set and the random sets."""

    class_name: str
    num_features: int
    layers: dict[str, int]
    drop_own: float
    drop_others: float
    random_drop_own: list[float] = field(default_factory=list)
    random_drop_others: list[float] = field(default_factory=list)
    #: name of another picker -> (drop_own, drop_others) of its set of the same size and layers
    compared: dict[str, tuple[float, float]] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        compared = {}
        for name, (own, others) in self.compared.items():
            compared[f"{name}_drop_own"], compared[f"{name}_drop_others"] = own, others
        return compared | {
            "class": self.class_name,
            "features": self.num_features,
            "drop_own": self.drop_own,
            "random_drop_own_mean": float(np.mean(self.random_drop_own)),
            "random_drop_own_std": float(np.std(self.random_drop_own)),
            "drop_others": self.drop_others,
            "random_drop_others_mean": float(np.mean(self.random_drop_others)),
            "random_drop_others_std": float(np.std(self.random_drop_others)),
        }


def correct_per_image(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """(N,) bool: whether the model classifies each image correctly (``batch_size`` images
    per forward pass; by default :func:`~vebi.evaluation.data.forward_batch_size`'s)."""
    device = next(model.parameters()).device
    if batch_size is None:
        batch_size = forward_batch_size(images[0].numel() if len(images) else 1, device)
    correct = []
    with inference_mode(model):
        for start in range(0, len(images), batch_size):
            predicted = model(images[start : start + batch_size].to(device)).argmax(1).cpu()
            correct.append(predicted == labels[start : start + batch_size].cpu())
    return torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)


def correct_in(model: nn.Module, data: EvaluationSet, batch_size: int) -> torch.Tensor:
    """:func:`correct_per_image` over a streamed set, read ``batch_size`` images at a time."""
    parts = [
        correct_per_image(model, batch.images, batch.labels) for batch in data.batches(batch_size)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def stratified_sample(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Indices of about ``size`` images, the same share of every class (seeded, sorted)."""
    labels = labels.cpu()
    if size >= len(labels):
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    share = size / len(labels)
    chosen = []
    for c in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == c).flatten()
        count = max(1, round(share * len(rows)))
        chosen.append(rows[torch.randperm(len(rows), generator=generator)[:count]])
    return torch.sort(torch.cat(chosen)).values


#: Most random sets per class (each one a forward pass over the images per class).
MAX_DRAWS = 1000


class AblationRelevance:
    """``AblationRelevance(draws=5, seed=0)(model, relevant, images, labels)`` -> per-class
    :class:`ClassAblation` records (relevant set vs ``draws`` random sets); module doc for the
    cost and ``other_images``."""

    def __init__(
        self,
        draws: int = 5,
        seed: int = 0,
        batch_size: int = 500,
        other_images: int | None = 1000,
        crp_images: int | None = None,
    ) -> None:
        if not 1 <= draws <= MAX_DRAWS:
            raise VebiError(
                f"evaluation.ablation.draws must be in 1..{MAX_DRAWS}, got {draws}; 5 (the "
                "default) or more gives a standard deviation of the random sets' drop that "
                "tells a real gap from noise, and each draw costs one pass over the images per "
                "class"
            )
        if other_images is not None and other_images < 1:
            raise VebiError(
                f"evaluation.ablation.other_images must be >= 1 or null (all), got {other_images}"
            )
        self.draws = draws
        self.seed = seed
        self.batch_size = batch_size
        self.other_images = other_images
        #: training images per class CRP's class-level pick is ranked on (None or 0: no
        #: comparison; evaluate.py builds the picker, :class:`vebi.evaluation.peers.CRPClassPick`)
        self.crp_images = crp_images

    def random_set(
        self, relevant: RelevantFeatures, layers: Mapping[str, int], rng: np.random.Generator
    ) -> dict[str, list[int]]:
        """As many channels per layer as ``layers`` says (:func:`random_feature_set`)."""
        return random_feature_set(relevant, layers, rng)

    def _lost(
        self,
        model: nn.Module,
        sets: list[FeatureSet],
        images: EvaluationSet,
        base: torch.Tensor,
        own: int,
    ) -> torch.Tensor:
        """Per feature set, (lost on the first ``own`` images, ``own``, lost on the rest, their
        number) when it is ablated; ``base`` says which images the intact model gets right.
        Each batch of images is read once and forwarded under every set."""
        counts = torch.zeros(len(sets), 4, dtype=torch.float64)
        counts[:, 1], counts[:, 3] = own, len(images) - own
        start = 0
        for batch in images.batches(self.batch_size):
            rows = torch.arange(start, start + len(batch))
            is_own = rows < own
            for i, features in enumerate(sets):
                with ablated(model, features):
                    correct = correct_per_image(model, batch.images, batch.labels)
                lost = base[rows].double() - correct.double()
                counts[i, 0] += lost[is_own].sum()
                counts[i, 2] += lost[~is_own].sum()
            start += len(batch)
        return counts

    def planned_forwards(
        self, labels: torch.Tensor, relevant: RelevantFeatures, compared: int = 0
    ) -> int:
        """Image forwards of :meth:`__call__` (the formula of the module doc; classes without
        relevant features cost nothing)."""
        labels = labels.cpu()
        sample = self._sample(labels)
        total = len(labels)
        for c in range(relevant.num_classes):
            if not relevant.relevant(c):
                continue
            own = int((labels == c).sum())
            total += (1 + self.draws + compared) * (own + int((labels[sample] != c).sum()))
        return total

    def _sample(self, labels: torch.Tensor) -> torch.Tensor:
        if self.other_images is None:
            return torch.arange(len(labels))
        return stratified_sample(labels, self.other_images, self.seed)

    def __call__(
        self,
        model: nn.Module,
        relevant: RelevantFeatures,
        data: EvaluationSet,
        progress: bool = True,
        compare: Mapping[str, Callable[[int, Mapping[str, int]], FeatureSet]] | None = None,
    ) -> list[ClassAblation]:
        """Per class, the images of the class and the other-class sample are read batch by
        batch, each batch once, and forwarded under the relevant and every random set.

        Under torch.distributed each process takes every world-size-th of those images and the
        counts of lost images are all-reduced: every process returns the records of one
        process (the random sets are drawn alike from the same seed). ``compare``: name ->
        ``pick(class_id, {layer: count})``, another set of the same size and layers per class,
        ablated alongside (each costs one more set's forwards)."""
        compare = dict(compare or {})
        rank, size = world()
        labels = data.labels
        mine = torch.arange(rank, len(data), size)
        base = torch.zeros(len(data), dtype=torch.float64)
        base[mine] = correct_in(model, data.select(mine), self.batch_size).double()
        base = all_reduce_sum(base) > 0  # every process knows every image's base result
        sample = self._sample(labels)
        rng = np.random.default_rng(self.seed)
        records = []
        bar = tqdm(
            total=self.planned_forwards(labels, relevant, len(compare)) - len(labels),
            desc="ablation",
            unit="img",
            disable=not progress,
        )
        for c, name in enumerate(relevant.class_names):
            chosen: dict[str, list[int]] = {}
            for feature in relevant.relevant(c):
                chosen.setdefault(feature.layer, []).append(feature.channel)
            layers = {layer: len(channels) for layer, channels in chosen.items()}
            if not chosen:  # nothing to ablate (left out of the averages)
                nothing = dict.fromkeys(compare, (0.0, 0.0))
                records.append(ClassAblation(name, 0, {}, 0.0, 0.0, [0.0], [0.0], nothing))
                continue
            own = torch.nonzero(labels == c).flatten()
            others = sample[labels[sample] != c]
            own, others = own[rank::size], others[rank::size]
            rows = torch.cat([own, others])
            sets: list[Mapping[str, Sequence[int]]] = [
                chosen,
                *(self.random_set(relevant, layers, rng) for _ in range(self.draws)),
                *(pick(c, layers) for pick in compare.values()),
            ]
            counts = self._lost(model, sets, data.select(rows), base[rows], len(own))
            counts = all_reduce_sum(counts)
            drops = [
                (
                    float(lost_own / n_own) if n_own else float("nan"),
                    float(lost_other / n_other) if n_other else float("nan"),
                )
                for lost_own, n_own, lost_other, n_other in counts.tolist()
            ]
            bar.update(len(rows) * size * len(sets))
            record = ClassAblation(name, sum(layers.values()), layers, *drops[0])
            randoms = drops[1 : 1 + self.draws]
            record.random_drop_own = [own_drop for own_drop, _ in randoms]
            record.random_drop_others = [other_drop for _, other_drop in randoms]
            record.compared = dict(zip(compare, drops[1 + self.draws :], strict=True))
            records.append(record)
        bar.close()
        return records


def summarise_ablation(records: Sequence[ClassAblation]) -> dict[str, float]:
    """Averages over the classes (random sets: mean over classes of the per-class mean/std)."""
    rows = [r.row() for r in records if r.num_features > 0]
    keys = [k for k in (rows[0] if rows else {}) if k not in ("class", "features")]
    return {key: float(np.nanmean([row[key] for row in rows])) for key in keys}


def sparse_classifier_accuracy(
    model: nn.Module,
    relevant: RelevantFeatures,
    data: EvaluationSet,
    batch_size: int = 500,
) -> dict[str, float]:
    """Accuracy of argmax_c x^T w_c (the sparse classifier) and of the network on the images
    (each process of torch.distributed reads every world-size-th image; the counts are
    all-reduced)."""
    device = next(model.parameters()).device
    sparse = MulticlassAccuracy(num_classes=relevant.num_classes, average="micro").to(device)
    network = MulticlassAccuracy(num_classes=relevant.num_classes, average="micro").to(device)
    with (
        eval_mode(model),
        torch.no_grad(),
        relevant.extractor(model) as extractor,
    ):
        for batch in data.shard(*world()).batches(batch_size):
            x, logits = extractor.forward(batch.images.to(device))
            predicted = torch.from_numpy(relevant.predict(x.double().cpu().numpy()))
            labels = batch.labels.to(device)
            sparse.update(predicted.to(device), labels)
            network.update(logits.argmax(1), labels)
    # all-reduced over the processes under torch.distributed (each read its shard)
    return {
        "sparse_accuracy": float(sparse.compute()),
        "network_accuracy": float(network.compute()),
    }
