"""Explaining a prediction by the top-k relevant features that fire (docs/method.md, section 4)."""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vebi.errors import VebiError
from vebi.explain.heatmaps import calibrate, signal_to_heatmap
from vebi.explain.rules import Rules, backward_rules, check_rule_coverage
from vebi.mining.relevant import RelevantFeatures
from vebi.models.hooks import capture_outputs, eval_mode, network_of

COMBINATIONS = ("score", "max")
CONDITIONINGS = ("class", "activation")


@dataclass(frozen=True)
class ExplanationStyle:
    """How the k chosen features become maps and one combined map (docs/method.md, 4).

    * ``conditioning``: ``activation`` (default, the paper's) starts each feature's backward
      pass from its forward activation map a; ``class`` starts it from the part
      of its channel map that raises the class's score, max(a, 0) max(g, 0) with a the
      channel's forward activation and g = dz_c / da the gradient of the class logit at that
      layer (Gradient x Activation's positive part after a ReLU; the idea of CRP), then carried
      down by the rules with the stride fix (on networks that end in a global max pool, g
      is non-zero at one position per channel, and so is the start).
    * ``calibration``: ``percentile`` (default) or ``min_max`` (the paper's), how each map is
      brought to [0, 1] (:func:`vebi.explain.heatmaps.calibrate`).
    * ``combination``: ``score`` (default) sums the calibrated maps weighted by their share of
      the score, sum_j (s_j / sum_i s_i) m_j (the weights w_c when no feature fires), and
      calibrates the sum, so a feature of score 0.03 cannot take over one of 0.62; ``max``
      (the paper's) is the pixel-wise maximum of the k maps.
    """

    conditioning: str = "activation"
    calibration: str = "percentile"
    combination: str = "score"

    def __post_init__(self) -> None:
        from vebi.explain.heatmaps import CALIBRATIONS

        for name, value, allowed in (
            ("conditioning", self.conditioning, CONDITIONINGS),
            ("calibration", self.calibration, CALIBRATIONS),
            ("combination", self.combination, COMBINATIONS),
        ):
            if value not in allowed:
                raise VebiError(f"explanation.{name} must be one of {list(allowed)}, got {value!r}")


#: The paper's explanation: activation maps, min-max scaled, combined by their maximum.
PAPER_STYLE = ExplanationStyle(conditioning="activation", calibration="min_max", combination="max")


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
    image has fewer than k features; k = the explainer's effective ``k``); ``combined``
    (N, H, W): their combination (:class:`ExplanationStyle`).
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

    ``k`` (an integer >= 1) is capped at the largest number of relevant features any class
    has (at least 1): ``self.k`` and the maps' second dimension are that effective k.
    """

    def __init__(
        self,
        model: nn.Module,
        relevant: RelevantFeatures,
        k: int = 3,
        rules: Rules | None = None,
        style: ExplanationStyle | None = None,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise VebiError(
                f"k (the features per explanation) must be an integer >= 1, got {k!r} "
                f"({type(k).__name__}): e.g. k=3"
            )
        model = network_of(model)
        self.model: nn.Module = model
        self.relevant: RelevantFeatures = relevant
        mask = relevant.relevant_mask()
        # no class can show more features than it has relevant ones: k above that would only
        # allocate empty map slots (N x k x H x W)
        most = int(mask.sum(axis=0).max()) if mask.size else 0
        self.k: int = max(1, min(int(k), most))
        self.rules: Rules = rules or Rules()
        self.style: ExplanationStyle = style or ExplanationStyle()
        check_rule_coverage(model, self.rules)  # every unsupported module named, up front
        used = mask.any(axis=1).nonzero()[0]
        self.layers: list[str] = list(dict.fromkeys(relevant.index.locate(int(f))[0] for f in used))
        # only relevant features take part (weights at or below the tolerance count as zero)
        self.weights: torch.Tensor = torch.as_tensor(relevant.weights * mask, dtype=torch.float32)
        layer_names = relevant.index.layer_of_each_feature()
        self._layer_id: torch.Tensor = torch.tensor(
            [relevant.index.layers.index(n) for n in layer_names]
        )
        self._channel: torch.Tensor = torch.tensor(
            [f - relevant.index.offsets[i] for f, i in enumerate(self._layer_id.tolist())]
        )
        # captured outputs the model changes in place downstream (out += identity) need a
        # copy; None = not known yet (copy all, then keep copying only those that need it)
        self._copied: set[str] | None = None

    def _choose(self, x: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, up to k feature ids (N, k; -1 = none): the largest positive scores
        s = x * w_c, or, when none is positive, the highest-weight relevant features of c."""
        weights = self.weights.to(x.device)[:, classes].T  # (N, m)
        k = min(self.k, weights.shape[1])
        top_scores, by_score = (x * weights).topk(k, dim=1)
        top_weights, by_weight = weights.topk(k, dim=1)
        fallback = ~(top_scores[:, :1] > 0)
        chosen = torch.where(fallback, by_weight, by_score)
        valid = torch.where(fallback, top_weights > self.relevant.tolerance, top_scores > 0)
        return torch.where(valid, chosen, torch.full_like(chosen, -1)), fallback[:, 0].cpu()

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor | Sequence[int] | None = None
    ) -> Explanation:
        """Explain ``images`` (N, C, H, W): floats in [0, 1] on the model's device (other float
        dtypes are converted to the model's parameter dtype), each by its ``targets`` class
        (N integer class ids 0..C-1: a list, numpy array or tensor) or, without targets, by its
        predicted class. Anything else is a :class:`VebiError` that says what to change."""
        images = self._check_images(images)
        if targets is not None:
            targets = self._check_targets(targets, len(images)).to(images.device)
        while True:  # runs twice only when a captured output turns out to need a copy
            result = self._explain(images, targets)
            if result is not None:
                return result

    def choose(
        self, images: torch.Tensor, targets: torch.Tensor | Sequence[int] | None = None
    ) -> list[list[ChosenFeature]]:
        """The features :meth:`__call__` would explain each image by (up to k per image), from
        one forward pass and no backward pass: what other methods conditioned on the same
        features need (CRP's conditional maps of vebi's pick)."""
        images = self._check_images(images)
        with (
            eval_mode(self.model),
            torch.no_grad(),
            self.relevant.extractor(self.model) as extractor,
        ):
            x, logits = extractor.forward(images)
        if targets is None:
            classes = logits.argmax(1)
        else:
            classes = self._check_targets(targets, len(images)).to(images.device)
        chosen, _ = self._choose(x, classes)
        return self._describe(chosen, x, classes)

    def _check_images(self, images: object) -> torch.Tensor:
        """``images`` as an (N, C, H, W) float tensor of the model's dtype on its device (NaN
        and Inf are refused by the feature extractor's forward pass, which checks every input)."""
        if not isinstance(images, torch.Tensor):
            hint = " (torch.from_numpy(array))" if isinstance(images, np.ndarray) else ""
            raise VebiError(
                f"images must be a torch.Tensor (N, C, H, W) of floats in [0, 1], got "
                f"{type(images).__name__}: convert them to a tensor first{hint}"
            )
        if images.ndim != 4:
            hint = (
                ": one image (C, H, W) is a batch of one with images.unsqueeze(0)"
                if images.ndim == 3
                else ""
            )
            raise VebiError(
                f"images must be a batch (N, C, H, W), got shape {tuple(images.shape)}{hint}"
            )
        if not images.is_floating_point():
            hint = "" if images.is_complex() else " (e.g. images.float() / 255 for 8-bit images)"
            raise VebiError(
                f"images must be floats in [0, 1], got {images.dtype}: convert them{hint}"
            )
        reference = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
        if reference is not None and images.device != reference.device:
            raise VebiError(
                f"images are on {images.device} but the model is on {reference.device}: move "
                f"them with images.to({str(reference.device)!r}) (or the model with .to(device))"
            )
        dtype = next(
            (p.dtype for p in self.model.parameters() if p.is_floating_point()), images.dtype
        )
        return images.to(dtype)

    def _check_targets(self, targets: object, count: int) -> torch.Tensor:
        """``targets`` as an int64 tensor of ``count`` class ids in 0..C-1, else a VebiError."""
        num_classes = self.relevant.num_classes
        valid = f"integer class ids in 0..{num_classes - 1}"
        if isinstance(targets, torch.Tensor):
            tensor = targets.detach()
        else:
            try:
                array = np.asarray(targets)
            except (TypeError, ValueError):
                array = np.asarray(targets, dtype=object)
            if array.dtype.kind not in "iubfc":  # bools, floats: refused below, as tensors
                raise VebiError(
                    f"targets must be {valid}, got {targets!r}: pass a list, numpy array or "
                    "tensor of ints (or None to explain the predicted classes)"
                )
            tensor = torch.from_numpy(array)
        if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
            raise VebiError(
                f"targets must be {valid}, got {tensor.dtype} values "
                f"{tensor.reshape(-1)[:5].tolist()}: pass ints (e.g. targets.long() when they "
                "are whole numbers)"
            )
        if tensor.shape != (count,):
            raise VebiError(
                f"targets must hold one class id per image: {count} image(s), but targets of "
                f"shape {tuple(tensor.shape)}"
            )
        tensor = tensor.long()
        outside = tensor[(tensor < 0) | (tensor >= num_classes)]
        if len(outside):
            raise VebiError(
                f"targets must be {valid} (the relevant features were mined for {num_classes} "
                f"classes), got {torch.unique(outside)[:5].tolist()}"
            )
        return tensor

    def _explain(self, images: torch.Tensor, targets: torch.Tensor | None) -> Explanation | None:
        relevant = self.relevant
        copied = self._copied
        by_class = self.style.conditioning == "class"
        signals = self._class_signals(images, targets) if by_class else None
        with (
            eval_mode(self.model),
            backward_rules(self.model, self.rules),
            relevant.extractor(self.model) as extractor,
            capture_outputs(
                self.model, self.layers, copy=True if copied is None else copied
            ) as outputs,
            torch.enable_grad(),
        ):
            inputs = images.detach().requires_grad_(True)
            x, logits = extractor.forward(inputs)
            touched = outputs.modified_in_place()
            if copied is not None and touched - copied:  # a copy was needed after all
                self._copied = copied | touched
                return None
            self._copied = touched
            if logits.shape[1] != relevant.num_classes:
                raise VebiError(
                    f"the model has {logits.shape[1]} outputs but the relevant features "
                    f"were mined for {relevant.num_classes} classes"
                )
            classes = logits.argmax(1) if targets is None else targets
            chosen, fallback = self._choose(x.detach(), classes)
            starts = self._starting_maps(outputs, signals, chosen)
            maps = torch.zeros(len(images), self.k, *images.shape[-2:], device=images.device)
            for slot in range(self.k):
                self._backprop_slot(slot, chosen, starts, outputs, inputs, maps, self.k - 1 == slot)
        features = self._describe(chosen, x, classes)
        maps = maps.detach()
        return Explanation(
            classes=classes.detach().cpu(),
            features=features,
            maps=maps,
            combined=self._combine(maps, chosen, x.detach(), classes, fallback),
            fallback=fallback,
            logits=logits.detach(),
        )

    def _class_signals(
        self, images: torch.Tensor, targets: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The gradient g = dz_c / da of the class logit at every layer holding a relevant
        feature, from a forward pass without the rules (the rules' backward signals of the
        deconvnet family hardly depend on the class); c the target or the predicted class."""
        with (
            eval_mode(self.model),
            capture_outputs(self.model, self.layers) as outputs,
            torch.enable_grad(),
        ):
            logits = self.model(images.detach().requires_grad_(True))
            classes = logits.argmax(1) if targets is None else targets.to(logits.device)
            score = logits.gather(1, classes.view(-1, 1)).sum()
            tensors = [outputs[name] for name in self.layers]
            grads = torch.autograd.grad(score, tensors, allow_unused=True)
        return {
            name: torch.zeros_like(tensor) if grad is None else grad.detach()
            for name, tensor, grad in zip(self.layers, tensors, grads, strict=True)
        }

    def _starting_maps(
        self,
        outputs: dict[str, torch.Tensor],
        signals: dict[str, torch.Tensor] | None,
        chosen: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per layer holding a chosen feature, the maps its backward passes start from: the
        forward activation a (``activation``, ``signals`` None), or max(a, 0) max(g, 0) with g
        the class logit's gradient at that layer (``class``: :meth:`_class_signals`; a channel
        where that is zero everywhere starts from a in :meth:`_backprop_slot`)."""
        ids = chosen[chosen >= 0].unique().cpu()
        layers = list(dict.fromkeys(self.relevant.index.layers[i] for i in self._layer_id[ids]))
        if signals is None:
            return {name: outputs[name].detach() for name in layers}
        return {
            name: outputs[name].detach().clamp_min(0) * signals[name].clamp_min(0)
            for name in layers
        }

    def _combine(
        self,
        maps: torch.Tensor,
        chosen: torch.Tensor,
        x: torch.Tensor,
        classes: torch.Tensor,
        fallback: torch.Tensor,
    ) -> torch.Tensor:
        """The combined map of the k maps (:class:`ExplanationStyle`, ``combination``)."""
        if self.style.combination == "max":
            return maps.amax(dim=1)
        ids = chosen.clamp_min(0)
        weights = self.weights.to(x.device)[ids, classes.view(-1, 1)]  # (N, k)
        scores = x.gather(1, ids) * weights
        fell_back = fallback.to(x.device).view(-1, 1)
        shares = torch.where(fell_back, weights, scores).clamp_min(0) * (chosen >= 0)
        shares = shares / shares.sum(dim=1, keepdim=True).clamp_min(1e-30)
        summed = (maps * shares.to(maps.dtype)[:, :, None, None]).sum(dim=1)
        return calibrate(summed, self.style.calibration)

    def _describe(
        self, chosen: torch.Tensor, x: torch.Tensor, classes: torch.Tensor
    ) -> list[list[ChosenFeature]]:
        ids = chosen.clamp_min(0).cpu()
        weights = self.weights[ids, classes.cpu()[:, None]]
        scores = (x.cpu().gather(1, ids) * weights).tolist()
        layers, channels = self._layer_id[ids].tolist(), self._channel[ids].tolist()
        present, weight_values = (chosen >= 0).tolist(), weights.tolist()
        names = self.relevant.index.layers
        return [
            [
                ChosenFeature(
                    names[layers[n][i]], channels[n][i], scores[n][i], weight_values[n][i]
                )
                for i in range(chosen.shape[1])
                if present[n][i]
            ]
            for n in range(len(chosen))
        ]

    def _backprop_slot(
        self,
        slot: int,
        chosen: torch.Tensor,
        starts: dict[str, torch.Tensor],
        outputs: dict[str, torch.Tensor],
        inputs: torch.Tensor,
        maps: torch.Tensor,
        last: bool,
    ) -> None:
        """One backward pass for the slot-th feature of every image (layers may differ),
        each starting from its channel of ``starts`` (:meth:`_starting_maps`)."""
        features = chosen[:, slot].cpu()
        present = features >= 0
        if not present.any():
            return
        layer_ids = torch.where(present, self._layer_id[features.clamp_min(0)], -1)
        channels = self._channel[features.clamp_min(0)]
        rows = torch.arange(len(features))
        tensors, signals = [], []
        for layer_id in layer_ids[present].unique().tolist():
            name = self.relevant.index.layers[layer_id]
            output = outputs[name]
            mine = layer_ids == layer_id
            # each image's own channel map where this layer holds its feature, zeros elsewhere
            images_here = rows[mine].to(output.device)
            channels_here = channels[mine].to(output.device)
            signal = torch.zeros_like(output)
            start = starts[name][images_here, channels_here]
            # a channel of which no part raises the class (max(a, 0) max(g, 0) = 0 everywhere)
            # starts from its activation, as the paper's maps do, rather than from nothing
            silent = start.flatten(1).amax(dim=1) <= 0
            if silent.any():
                activation = output.detach()[images_here, channels_here]
                start = torch.where(silent.view(-1, *([1] * (start.ndim - 1))), activation, start)
            # each start scaled to a maximum of 1 (a map's calibration does not see its scale,
            # and a class signal of 1e-15, as in an untrained network, would underflow below)
            peak = start.flatten(1).abs().amax(dim=1).clamp_min(1e-30)
            start = start / peak.view(-1, *([1] * (start.ndim - 1)))
            signal[images_here, channels_here] = start
            tensors.append(output)
            signals.append(signal)
        (grad,) = torch.autograd.grad(tensors, inputs, grad_outputs=signals, retain_graph=not last)
        rows = present.to(inputs.device)
        maps[rows, slot] = signal_to_heatmap(grad[rows], self.style.calibration)
