"""Relevance by ablation (docs/method.md, section 5) and the sparse classifier's accuracy.

Ablating a feature set S means zeroing, in every forward pass, channel k of the output of
layer l for each (l, k) in S. For class c with relevant set R_c:

    drop_own(S)    = acc_c - acc_c(S)              (accuracy on the images of class c)
    drop_others(S) = acc_{!c} - acc_{!c}(S)         (accuracy on all other images)

compared with random sets of the same size and layer distribution: for each layer, as many
channels of that layer as R_c has there, drawn uniformly without replacement (``draws`` sets,
mean and standard deviation). Relevant features matter when drop_own(R_c) is well above the
random sets' drop while drop_others(R_c) stays small.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassStatScores
from tqdm.auto import tqdm

from vebi.errors import VebiError
from vebi.mining.relevant import RelevantFeatures
from vebi.models.hooks import check_layer_names, eval_mode

FeatureSet = Mapping[str, Sequence[int]]


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


def per_class_correct(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int
) -> torch.Tensor:
    """(C,) number of correctly classified test images of each class: the true positives of
    torchmetrics' per-class stat scores (DDP-safe)."""
    metric = MulticlassStatScores(num_classes=num_classes, average=None).to(images.device)
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(images), batch_size):
            metric.update(
                model(images[start : start + batch_size]).argmax(1),
                labels[start : start + batch_size],
            )
    return metric.compute()[:, 0].double().cpu()


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

    def row(self) -> dict[str, Any]:
        return {
            "class": self.class_name,
            "features": self.num_features,
            "drop_own": self.drop_own,
            "random_drop_own_mean": float(np.mean(self.random_drop_own)),
            "random_drop_own_std": float(np.std(self.random_drop_own)),
            "drop_others": self.drop_others,
            "random_drop_others_mean": float(np.mean(self.random_drop_others)),
            "random_drop_others_std": float(np.std(self.random_drop_others)),
        }


class AblationRelevance:
    """``AblationRelevance(draws=5, seed=0)(model, relevant, images, labels)`` -> per-class
    :class:`ClassAblation` records (relevant set vs ``draws`` random sets)."""

    def __init__(self, draws: int = 5, seed: int = 0, batch_size: int = 500) -> None:
        if draws < 1:
            raise VebiError(
                f"evaluation.ablation.draws must be >= 1, got {draws}; 5 (the default) or more "
                "gives a standard deviation of the random sets' drop that tells a real gap "
                "from noise"
            )
        self.draws = draws
        self.seed = seed
        self.batch_size = batch_size

    def random_set(
        self, relevant: RelevantFeatures, layers: Mapping[str, int], rng: np.random.Generator
    ) -> dict[str, list[int]]:
        """As many channels per layer as ``layers`` says, drawn without replacement."""
        sizes = dict(zip(relevant.index.layers, relevant.index.channels, strict=True))
        return {
            layer: sorted(rng.choice(sizes[layer], size=n, replace=False).tolist())
            for layer, n in layers.items()
        }

    def __call__(
        self,
        model: nn.Module,
        relevant: RelevantFeatures,
        images: torch.Tensor,
        labels: torch.Tensor,
        progress: bool = True,
    ) -> list[ClassAblation]:
        classes = relevant.num_classes
        counts = torch.bincount(labels.cpu(), minlength=classes).double()
        base = per_class_correct(model, images, labels, classes, self.batch_size)
        rng = np.random.default_rng(self.seed)

        def drops(features: FeatureSet, c: int) -> tuple[float, float]:
            with ablated(model, features):
                correct = per_class_correct(model, images, labels, classes, self.batch_size)
            lost = base - correct
            others = counts.sum() - counts[c]
            own = float(lost[c] / counts[c]) if counts[c] > 0 else float("nan")
            return own, float((lost.sum() - lost[c]) / others) if others > 0 else float("nan")

        records = []
        bar = tqdm(total=classes * (1 + self.draws), desc="ablation", disable=not progress)
        for c, name in enumerate(relevant.class_names):
            chosen: dict[str, list[int]] = {}
            for feature in relevant.relevant(c):
                chosen.setdefault(feature.layer, []).append(feature.channel)
            layers = {layer: len(channels) for layer, channels in chosen.items()}
            record = ClassAblation(name, sum(layers.values()), layers, *drops(chosen, c))
            bar.update()
            for _ in range(self.draws):
                own, others = drops(self.random_set(relevant, layers, rng), c)
                record.random_drop_own.append(own)
                record.random_drop_others.append(others)
                bar.update()
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
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 500,
) -> dict[str, float]:
    """Accuracy of argmax_c x^T w_c (the sparse classifier) and of the network on the images."""
    sparse = MulticlassAccuracy(num_classes=relevant.num_classes, average="micro")
    network = MulticlassAccuracy(num_classes=relevant.num_classes, average="micro")
    with (
        eval_mode(model),
        torch.no_grad(),
        relevant.extractor(model) as extractor,
    ):
        for start in range(0, len(images), batch_size):
            x, logits = extractor.forward(images[start : start + batch_size])
            truth = labels[start : start + batch_size].cpu()
            sparse.update(torch.from_numpy(relevant.predict(x.double().cpu().numpy())), truth)
            network.update(logits.argmax(1).cpu(), truth)
    return {
        "sparse_accuracy": float(sparse.compute()),
        "network_accuracy": float(network.compute()),
    }
