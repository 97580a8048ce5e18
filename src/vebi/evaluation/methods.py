"""Heatmap methods compared by the evaluators (docs/method.md, section 5), one small class each.

Every method is built as ``Method(model, relevant, **options)`` (Hydra ``_target_`` with the
model and the mined :class:`~vebi.mining.relevant.RelevantFeatures` passed in) and called as
``method(images, classes) -> (N, H, W)`` maps in [0, 1], one per image, explaining class
``classes[n]``. The names they are compared under are the keys of ``evaluation.methods`` in
the config. Input-space signals all go through the same
:func:`~vebi.explain.heatmaps.signal_to_heatmap`, so the methods differ only in the signal.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vebi.errors import VebiError
from vebi.explain.explainer import Explainer, ExplanationStyle
from vebi.explain.heatmaps import CALIBRATIONS, calibrate, signal_to_heatmap
from vebi.explain.rules import Rules, backward_rules
from vebi.mining.relevant import RelevantFeatures
from vebi.models.hooks import capture_outputs, eval_mode, trace_leaf_calls


def last_spatial_layer(model: nn.Module, images: torch.Tensor) -> str:
    """The last leaf module before the logits whose output is a map larger than 1 x 1."""
    calls = trace_leaf_calls(model, images[:1])
    spatial = [name for name, shape in calls if len(shape) == 4 and shape[-1] * shape[-2] > 1]
    if not spatial:
        raise VebiError("the model has no layer with a spatial output map (H x W > 1)")
    return spatial[-1]


def spatial_layers(model: nn.Module, layers: Sequence[str], images: torch.Tensor) -> set[str]:
    """Those of ``layers`` (leaves or blocks) whose output is a map larger than 1 x 1."""
    modules = dict(model.named_modules())
    shapes = dict(trace_leaf_calls(model, images[:1], {layer: modules[layer] for layer in layers}))
    return {
        layer
        for layer in layers
        if len(shapes.get(layer, ())) == 4 and shapes[layer][-1] * shapes[layer][-2] > 1
    }


class HeatmapMethod(ABC):
    """Base class: ``method(images, classes)`` -> (N, H, W) heatmaps in [0, 1].

    ``uses_relevant_features``: the maps depend on the mined W (the sanity check then also
    runs the method with the trained network's W kept)."""

    uses_relevant_features: ClassVar[bool] = False

    def __init__(self, model: nn.Module, relevant: RelevantFeatures) -> None:
        self.model = model
        self.relevant = relevant

    @abstractmethod
    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor: ...

    def maps_and_signal(
        self, images: torch.Tensor, classes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the maps, the signed (N, H, W) input-space signal summed over colour channels, or
        None for methods whose only output is the non-negative map): the sanity check ranks
        both the signal and its absolute value."""
        return self(images, classes), None


class SignalMethod(HeatmapMethod):
    """A method whose map comes from one signed (N, C, H, W) input-space signal: subclasses
    give :meth:`_signal` and, where it is not :func:`signal_to_heatmap`, :meth:`_heatmap`;
    the map and the sanity check's signal (summed over colours) come from one computation."""

    @abstractmethod
    def _signal(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor: ...

    def _heatmap(self, signal: torch.Tensor) -> torch.Tensor:
        return signal_to_heatmap(signal)

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self._heatmap(self._signal(images, classes))

    def maps_and_signal(
        self, images: torch.Tensor, classes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        signal = self._signal(images, classes)
        return self._heatmap(signal), signal.sum(dim=1)


class VebiExplanation(HeatmapMethod):
    """Ours: the top-k relevant features that fire, propagated with ``rules`` (None: the
    project default; see :mod:`vebi.explain.rules`). In a config ``rules`` is a rules config
    (the run's ``${rules}``, or one with some of its choices replaced), built with
    :meth:`Rules.from_config`. ``combine="all"`` is the combined map of the k features (as
    ``style`` combines them: :class:`~vebi.explain.explainer.ExplanationStyle`, a config
    mapping of its fields, or None for the default), ``combine="best"`` the map of the single
    highest-scoring feature."""

    uses_relevant_features = True

    def __init__(
        self,
        model: nn.Module,
        relevant: RelevantFeatures,
        k: int = 3,
        rules: Rules | Mapping[str, Any] | None = None,
        combine: str = "all",
        style: ExplanationStyle | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model, relevant)
        if combine not in ("all", "best"):
            raise VebiError(f"combine must be 'all' (k features) or 'best', got {combine!r}")
        self.combine = combine
        if style is not None and not isinstance(style, ExplanationStyle):
            style = ExplanationStyle(**{k: v for k, v in style.items() if k != "_target_"})
        self.explainer = Explainer(
            model,
            relevant,
            k=1 if combine == "best" else k,
            rules=Rules.from_config(rules),
            style=style,
        )

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        explanation = self.explainer(images, classes)
        return explanation.combined if self.combine == "all" else explanation.maps[:, 0]


def checked_calibration(calibration: str) -> str:
    """``calibration`` if it names one of :data:`vebi.explain.heatmaps.CALIBRATIONS`."""
    if calibration not in CALIBRATIONS:
        raise VebiError(f"calibration must be one of {list(CALIBRATIONS)}, got {calibration!r}")
    return calibration


class CaptumAttribution(SignalMethod):
    """A Captum attribution of the class logit: ``deconvolution`` (standard deconvnet),
    ``guided_backprop``, or ``gradient`` (|d logit / d pixel|, Simonyan et al.)."""

    def __init__(self, model: nn.Module, relevant: RelevantFeatures, algorithm: str) -> None:
        super().__init__(model, relevant)
        from captum.attr import Deconvolution, GuidedBackprop, Saliency

        algorithms = {
            "deconvolution": Deconvolution,
            "guided_backprop": GuidedBackprop,
            "gradient": Saliency,
        }
        if algorithm not in algorithms:
            raise VebiError(
                f"unknown Captum algorithm {algorithm!r}; use one of {list(algorithms)}"
            )
        self.algorithm = algorithm
        self.attribution = algorithms[algorithm](model)
        #: what a reader of this row must know: Captum's deconvnet and guided backprop
        #: override nn.ReLU only, the plain gradient flows through every other activation
        self.notes: list[str] = []
        uncovered = captum_uncovered_activations(model)
        if algorithm != "gradient" and uncovered:
            self.notes.append(
                f"Captum's {algorithms[algorithm].__name__} overrides nn.ReLU only; this "
                f"network's {', '.join(uncovered)} pass the plain gradient (the rules rows "
                "deconvnet / guided_backprop cover them)"
            )

    def _signal(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The signed (N, C, H, W) attribution (the gradient itself, not its magnitude)."""
        inputs = images.detach().clone().requires_grad_(True)
        with eval_mode(self.model), torch.enable_grad():
            if self.algorithm == "gradient":
                signal = self.attribution.attribute(inputs, target=classes, abs=False)
            else:
                signal = self.attribution.attribute(inputs, target=classes)
        return signal.detach()

    def _heatmap(self, signal: torch.Tensor) -> torch.Tensor:
        return signal_to_heatmap(signal.abs() if self.algorithm == "gradient" else signal)


class RulesAttribution(SignalMethod):
    """Guided backpropagation or deconvnet that are what they say on every network: vebi's
    own backward rules (``rules``: ``guided`` or ``deconvnet``, no stride fix) installed in
    every activation (ReLU, ReLU6, SiLU, GELU, Hardswish, functional calls; see
    :mod:`vebi.explain.rules`), the signal started at the class logit (one-hot), not at a
    mined feature. Mapped as the other signed signals (positive part, L2 over colours)."""

    def __init__(self, model: nn.Module, relevant: RelevantFeatures, rules: str = "guided") -> None:
        super().__init__(model, relevant)
        self.rules = Rules(preset=rules)

    def _signal(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        inputs = images.detach().clone().requires_grad_(True)
        with eval_mode(self.model), backward_rules(self.model, self.rules), torch.enable_grad():
            logits = self.model(inputs)
            chosen = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()
            (grad,) = torch.autograd.grad(chosen, inputs)
        return grad.detach()


def captum_uncovered_activations(model: nn.Module) -> list[str]:
    """The activation module types of ``model`` that Captum's ``GuidedBackprop`` and
    ``Deconvolution`` do not override (they hook ``nn.ReLU`` only, and compute the plain
    gradient through everything else), sorted."""
    activation_types = (
        nn.ReLU6,
        nn.SiLU,
        nn.GELU,
        nn.Hardswish,
        nn.Hardsigmoid,
        nn.LeakyReLU,
        nn.ELU,
        nn.SELU,
        nn.CELU,
        nn.Mish,
        nn.Softplus,
        nn.Hardtanh,
        nn.PReLU,
        nn.Tanh,
        nn.Sigmoid,
    )
    found = {type(m).__name__ for m in model.modules() if isinstance(m, activation_types)}
    # activations of a module type outside torch.nn (timm's, lukemelas' Swish, ...)
    for m in model.modules():
        name = type(m).__name__.lower()
        if not type(m).__module__.startswith("torch.nn") and any(
            word in name for word in ("swish", "silu", "gelu", "relu6", "mish")
        ):
            found.add(type(m).__name__)
    return sorted(found)


class GradCAM(HeatmapMethod):
    """Grad-CAM (Captum ``LayerGradCam``) at ``layer`` (default: the last layer with a spatial
    map), ReLU, bilinearly upsampled to the image and calibrated (``calibration``, as every
    method's map: :func:`vebi.explain.heatmaps.calibrate`)."""

    def __init__(
        self,
        model: nn.Module,
        relevant: RelevantFeatures,
        layer: str | None = None,
        calibration: str = "percentile",
    ) -> None:
        super().__init__(model, relevant)
        self.layer = layer
        self.calibration = checked_calibration(calibration)

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        from captum.attr import LayerAttribution, LayerGradCam

        if self.layer is None:  # traced once, on the first batch
            self.layer = last_spatial_layer(self.model, images)
        layer = self.layer
        module = dict(self.model.named_modules())[layer]
        with eval_mode(self.model), torch.enable_grad():
            cam = LayerGradCam(self.model, module).attribute(
                images.detach().clone().requires_grad_(True),
                target=classes,
                relu_attributions=True,
            )
        cam = LayerAttribution.interpolate(cam.detach(), tuple(images.shape[-2:]), "bilinear")
        return calibrate(cam[:, 0].clamp_min(0), self.calibration)


class TopUnitActivation(HeatmapMethod):
    """The forward activation map of the top unit, bilinearly upsampled (Network-Dissection style).

    The top unit of image n is the relevant feature of class c with the largest score
    s_f = x_f w_{f,c} among the layers with spatial maps larger than 1 x 1, i.e. the unit our
    explanation would start from, brought to the pixels by upsampling instead of a deconvnet.
    """

    uses_relevant_features = True
    _spatial: torch.Tensor | None = None

    def _spatial_features(self, images: torch.Tensor) -> torch.Tensor:
        """(m,) True for features of layers with maps larger than 1 x 1 (traced once)."""
        if self._spatial is None:
            spatial = spatial_layers(self.model, self.relevant.layers, images)
            self._spatial = torch.tensor(
                [layer in spatial for layer in self.relevant.index.layer_of_each_feature()]
            )
        if not self._spatial.any():
            raise VebiError("none of the mined layers has a spatial map: no top unit to upsample")
        return self._spatial

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        relevant = self.relevant
        spatial = self._spatial_features(images)
        weights = torch.as_tensor(relevant.weights * relevant.relevant_mask(), dtype=torch.float32)
        weights[~spatial] = 0
        with (
            eval_mode(self.model),
            torch.no_grad(),
            relevant.extractor(self.model) as extractor,
            capture_outputs(self.model, relevant.layers) as outputs,
        ):
            x, _ = extractor.forward(images)
        column = weights.to(x.device)[:, classes].T  # (N, m)
        scores = torch.where(column > 0, x * column, torch.full_like(x, -1.0))
        # a class without spatial relevant features: the most active spatial unit instead
        any_spatial = torch.where(spatial.to(x.device), x, torch.full_like(x, -1.0))
        scores = torch.where((column > 0).any(dim=1, keepdim=True), scores, any_spatial)
        top = scores.argmax(dim=1).tolist()
        maps = torch.zeros(len(images), *images.shape[-2:], device=images.device)
        for n, feature in enumerate(top):
            layer, channel = relevant.index.locate(feature)
            activation = outputs[layer][n : n + 1, channel : channel + 1]
            upsampled = F.interpolate(
                activation, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False
            )
            maps[n] = upsampled[0, 0]
        return calibrate(maps.clamp_min(0))


class CentreGaussian(HeatmapMethod):
    """Control: the same centred Gaussian for every image, std ``sigma`` x image side."""

    def __init__(self, model: nn.Module, relevant: RelevantFeatures, sigma: float = 0.25) -> None:
        super().__init__(model, relevant)
        if sigma <= 0:
            raise VebiError(f"sigma must be > 0, got {sigma}")
        self.sigma = sigma

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        ys = (torch.arange(height, dtype=torch.float32) - (height - 1) / 2) / (self.sigma * height)
        xs = (torch.arange(width, dtype=torch.float32) - (width - 1) / 2) / (self.sigma * width)
        gaussian = torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
        return calibrate(gaussian.expand(len(images), height, width).to(images.device))


class UniformRandom(HeatmapMethod):
    """Control: i.i.d. uniform noise maps, from a generator seeded once with ``seed``."""

    def __init__(self, model: nn.Module, relevant: RelevantFeatures, seed: int = 0) -> None:
        super().__init__(model, relevant)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        maps = torch.rand(len(images), *images.shape[-2:], generator=self.generator)
        return maps.to(images.device)
