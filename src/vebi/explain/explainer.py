"""Explaining one prediction with the top-k relevant features that fire (METHOD.md sec. 4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vebi.errors import VebiError
from vebi.explain.backprop import capture_outputs, channel_signal
from vebi.explain.heatmaps import signal_to_heatmap
from vebi.explain.rules import Rules, backward_rules
from vebi.mining.features import FeatureExtractor
from vebi.mining.relevant import RelevantFeatures


@dataclass(frozen=True)
class ChosenFeature:
    """A feature used to explain one image: channel ``channel`` of ``layer``, score s = x w_c."""

    layer: str
    channel: int
    score: float
    weight: float


@dataclass
class Explanation:
    """The explanations of a batch of N images.

    ``maps`` (N, k, H, W): one map in [0, 1] per chosen feature ("decoupled"; zeros where an
    image has fewer than k features); ``combined`` (N, H, W): their pixel-wise max.
    ``fallback[n]`` is True when no relevant feature of the class fired for image n, so the
    class's highest-weight features were used instead.
    """

    classes: torch.Tensor
    features: list[list[ChosenFeature]]
    maps: torch.Tensor
    combined: torch.Tensor
    fallback: torch.Tensor
    logits: torch.Tensor


class Explainer:
    """``Explainer(model, relevant, k=3)(images)`` -> :class:`Explanation`.

    For image n of class c* (predicted, or the given target): aggregated responses x (as in
    mining), scores s = x * w_{c*}; the top k features with s > 0 are propagated from their
    forward activation maps to the pixels under ``rules``. The k backward passes share one
    forward pass and each runs on the whole batch.
    """

    def __init__(
        self, model: nn.Module, relevant: RelevantFeatures, k: int = 3, rules: Rules | None = None
    ) -> None:
        if k < 1:
            raise VebiError(f"k must be >= 1, got {k}")
        self.model = model
        self.relevant = relevant
        self.k = k
        self.rules = rules or Rules()
        mask = relevant.relevant_mask()
        used = mask.any(axis=1).nonzero()[0]
        self.layers = list(dict.fromkeys(relevant.index.locate(int(f))[0] for f in used))
        # only relevant features take part (weights at or below the tolerance count as zero)
        self.weights = torch.as_tensor(relevant.weights * mask, dtype=torch.float32)

    def _choose(
        self, x: torch.Tensor, classes: torch.Tensor
    ) -> tuple[list[list[int]], torch.Tensor]:
        weights = self.weights.to(x.device)[:, classes].T  # (N, m)
        scores = x * weights
        chosen, fallback = [], torch.zeros(len(x), dtype=torch.bool)
        for n in range(len(x)):
            positive = (scores[n] > 0).nonzero().flatten()
            if len(positive) == 0:
                fallback[n] = True
                relevant = (weights[n] > self.relevant.tolerance).nonzero().flatten()
                order = relevant[weights[n, relevant].argsort(descending=True)]
            else:
                order = positive[scores[n, positive].argsort(descending=True)]
            chosen.append(order[: self.k].tolist())
        return chosen, fallback

    def __call__(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> Explanation:
        relevant = self.relevant
        was_training = self.model.training
        self.model.eval()
        try:
            with (
                backward_rules(self.model, self.rules),
                FeatureExtractor(self.model, relevant.layers, relevant.aggregation,
                                 relevant.normalize_layers, relevant.normalize_global) as extractor,
                capture_outputs(self.model, self.layers) as outputs,
                torch.enable_grad(),
            ):  # fmt: skip
                inputs = images.detach().clone().requires_grad_(True)
                x, logits = extractor.forward(inputs)
                if logits.shape[1] != relevant.num_classes:
                    raise VebiError(
                        f"the model has {logits.shape[1]} outputs but the relevant features "
                        f"were mined for {relevant.num_classes} classes"
                    )
                classes = (
                    logits.argmax(1)
                    if targets is None
                    else torch.as_tensor(targets).to(images.device).long()
                )
                chosen, fallback = self._choose(x.detach(), classes)
                maps = torch.zeros(len(images), self.k, *images.shape[-2:], device=images.device)
                for slot in range(self.k):
                    self._backprop_slot(
                        slot, chosen, outputs, inputs, maps, last=slot == self.k - 1
                    )
        finally:
            self.model.train(was_training)
        features = [
            [self._describe(f, x[n], int(classes[n])) for f in chosen[n]]
            for n in range(len(images))
        ]
        return Explanation(
            classes=classes.detach().cpu(),
            features=features,
            maps=maps.detach(),
            combined=maps.detach().amax(dim=1),
            fallback=fallback,
            logits=logits.detach(),
        )

    def _describe(self, feature: int, x: torch.Tensor, class_id: int) -> ChosenFeature:
        weight = float(self.weights[feature, class_id])
        layer, channel = self.relevant.index.locate(feature)
        return ChosenFeature(layer, channel, float(x[feature].cpu()) * weight, weight)

    def _backprop_slot(self, slot: int, chosen: list[list[int]], outputs: dict[str, torch.Tensor],
                       inputs: torch.Tensor, maps: torch.Tensor, last: bool) -> None:  # fmt: skip
        """One backward pass for the slot-th feature of every image (layers may differ)."""
        per_layer: dict[str, list[tuple[int, int]]] = {}
        for n, features in enumerate(chosen):
            if slot < len(features):
                layer, channel = self.relevant.index.locate(features[slot])
                per_layer.setdefault(layer, []).append((n, channel))
        if not per_layer:
            return
        tensors, signals = [], []
        for layer, pairs in per_layer.items():
            output = outputs[layer]
            activation = output[:, :, None, None] if output.ndim == 2 else output
            rows = torch.tensor([n for n, _ in pairs], device=inputs.device)
            channels = torch.zeros(len(output), dtype=torch.long, device=inputs.device)
            channels[rows] = torch.tensor([c for _, c in pairs], device=inputs.device)
            signal = channel_signal(activation, channels)
            keep = torch.zeros(len(output), dtype=torch.bool, device=inputs.device)
            keep[rows] = True
            signal[~keep] = 0
            tensors.append(output)
            signals.append(signal.view_as(output))
        (grad,) = torch.autograd.grad(tensors, inputs, grad_outputs=signals, retain_graph=not last)
        images_done = [n for pairs in per_layer.values() for n, _ in pairs]
        heatmaps = signal_to_heatmap(grad)
        maps[images_done, slot] = heatmaps[images_done]
