"""The methods people pick today, run by the libraries their users use (the ``peers`` extra).

Each peer is a :class:`~vebi.evaluation.methods.HeatmapMethod` that calls its own library and
only turns the library's output into an (N, H, W) map in [0, 1]; nothing of the peers is
re-written here. Install them with ``make setup`` (or by hand, as the README says):

- ``zennit`` (LRP composites with canonizers) and ``zennit-crp`` (Concept Relevance
  Propagation). zennit-crp 0.6.0 declares ``zennit<=0.4.6``, which pip would use to downgrade
  zennit; it runs with zennit 0.5 and is installed without its declared dependencies
  (``requirements/peers-no-deps.txt``), all of which the project already has.
- ``grad-cam`` (pytorch-grad-cam): the CAM family.
- ``craft-xai`` (CRAFT). Its torch module imports ``craft.sobol.sampler``, which imports
  TensorFlow at the top for one sampler (``TFSobolSequence``) that the torch path never uses
  (it samples with scipy's Halton sequence). Rather than install TensorFlow (hundreds of MB
  and pins on numpy and protobuf that fight the rest of the stack) for an import, vebi imports
  CRAFT with a placeholder ``tensorflow`` module in place for the duration of that import
  only; any use of it raises :class:`PeerUnavailable`. With TensorFlow installed, the real one
  is used.

A peer whose library is missing raises :class:`PeerUnavailable` when it is built; the
evaluation then skips it with one note naming the extra. A peer that refuses a model at run
time (CRAFT on negative activations, say) becomes a noted row; the other methods go on.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import sys
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vebi.errors import VebiError
from vebi.evaluation.methods import (
    HeatmapMethod,
    SignalMethod,
    checked_calibration,
    last_spatial_layer,
    spatial_layers,
)
from vebi.explain.explainer import Explainer
from vebi.explain.heatmaps import calibrate, signal_to_heatmap
from vebi.mining.relevant import RelevantFeatures
from vebi.models.hooks import eval_mode
from vebi.models.normalize import Normalize

#: how to install the peers (said by every PeerUnavailable)
PEERS_INSTALL = (
    "install the peers extra: make setup does it, or by hand "
    "pip install -e '.[peers]' && pip install --no-deps -r requirements/peers-no-deps.txt"
)


class PeerUnavailable(VebiError):
    """A peer method's library is not installed (the method is skipped with this note)."""


def import_peer(module: str, package: str) -> types.ModuleType:
    """``import module`` of the PyPI package ``package``, or :class:`PeerUnavailable`."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise PeerUnavailable(f"{package} is not installed ({error}): {PEERS_INSTALL}") from None


class _NoTensorFlow(types.ModuleType):
    """Stands in for ``tensorflow`` while CRAFT's torch module is imported (see the module
    docstring); using it is an error that says what to do."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise PeerUnavailable(
            f"CRAFT asked TensorFlow for tf.{name}: vebi runs CRAFT's torch path, which samples "
            "with scipy (HaltonSequence); install tensorflow-cpu to use CRAFT's TF samplers"
        )


def import_craft() -> types.ModuleType:
    """``craft.craft_torch``, importable without TensorFlow (see the module docstring)."""
    if "craft.craft_torch" in sys.modules:
        return sys.modules["craft.craft_torch"]
    if importlib.util.find_spec("craft") is None:
        raise PeerUnavailable(f"craft-xai is not installed: {PEERS_INSTALL}")
    placeholder = None
    if importlib.util.find_spec("tensorflow") is None and "tensorflow" not in sys.modules:
        placeholder = sys.modules["tensorflow"] = _NoTensorFlow("tensorflow")
    try:
        return import_peer("craft.craft_torch", "craft-xai")
    finally:
        if placeholder is not None and sys.modules.get("tensorflow") is placeholder:
            del sys.modules["tensorflow"]


# --------------------------------------------------------------------------------------------
# shared pieces


def positive_relevance_map(relevance: torch.Tensor) -> torch.Tensor:
    """LRP-style relevance (N, C, H, W) or (N, H, W) -> (N, H, W) map in [0, 1]: summed over
    the colour channels (relevance is additive), positive part, scaled by its maximum per image
    (the usual LRP heatmap of positive evidence; an all-non-positive map is all zero)."""
    summed = relevance.sum(dim=1) if relevance.ndim == 4 else relevance
    return calibrate(summed.clamp_min(0))


def input_bounds(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest and highest value the first layer can see, per colour channel (1, C, 1, 1):
    [0, 1] pixels, through the model's :class:`~vebi.models.normalize.Normalize` when it has
    one (the box rule of LRP needs the bounds in the space of the layer's input)."""
    channels = images.shape[1]
    low = torch.zeros(1, channels, 1, 1, device=images.device)
    high = torch.ones(1, channels, 1, 1, device=images.device)
    normalize = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    if normalize is not None:
        mean, std = normalize.mean.view(1, -1, 1, 1), normalize.std.view(1, -1, 1, 1)
        low, high = (low - mean) / std, (high - mean) / std
    return low, high


def zennit_canonizers(model: nn.Module) -> list[Any]:
    """zennit's canonizers for ``model``: ``ResNetCanonizer`` for torchvision ResNets (merged
    batch norms and the residual sums as modules), ``VGGCanonizer`` for torchvision VGGs, and
    ``SequentialMergeBatchNorm`` (every batch norm right after a linear layer in a Sequential
    merged into it) for everything else: the usual LRP recipe."""
    canonizers = import_peer("zennit.canonizers", "zennit")
    vision = import_peer("zennit.torchvision", "zennit")
    from torchvision.models import VGG, ResNet

    if any(isinstance(m, ResNet) for m in model.modules()):
        return [vision.ResNetCanonizer()]
    if any(isinstance(m, VGG) for m in model.modules()):
        return [vision.VGGCanonizer()]
    return [canonizers.SequentialMergeBatchNorm()]


def unmerged_batch_norms(model: nn.Module) -> int:
    """Batch norms that do not follow a conv/linear layer inside an ``nn.Sequential`` (zennit's
    ``SequentialMergeBatchNorm`` cannot merge them; LRP then passes their gradient)."""
    merged = set()
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            children = list(module.children())
            for before, after in zip(children, children[1:], strict=False):
                if isinstance(before, nn.Conv2d | nn.Linear) and isinstance(
                    after, nn.modules.batchnorm._BatchNorm
                ):
                    merged.add(id(after))
    return sum(
        1
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in merged
    )


def lrp_composite(name: str, model: nn.Module, images: torch.Tensor) -> Any:
    """zennit's ``EpsilonPlusFlat`` or ``EpsilonGammaBox`` (bounds from :func:`input_bounds`)
    with :func:`zennit_canonizers`."""
    composites = import_peer("zennit.composites", "zennit")
    canonizers = zennit_canonizers(model)
    if name == "epsilon_plus_flat":
        return composites.EpsilonPlusFlat(canonizers=canonizers)
    if name == "epsilon_gamma_box":
        low, high = input_bounds(model, images)
        return composites.EpsilonGammaBox(low=low, high=high, canonizers=canonizers)
    raise VebiError(
        f"unknown LRP composite {name!r}: use 'epsilon_plus_flat' or 'epsilon_gamma_box'"
    )


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with no parameter requiring gradients, restored on exit: the peers that call
    ``backward`` (CRP, pytorch-grad-cam) then leave every parameter's ``.grad`` as it was."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)


@contextlib.contextmanager
def no_hooks_left(model: nn.Module) -> Iterator[nn.Module]:
    """Remove, on exit, every module hook added to ``model`` inside the block: a peer that
    raises half-way (CRP removes its hooks only when it succeeds) leaves nothing behind that
    would break the next forward pass."""
    before = {
        (id(module), name): set(getattr(module, name, {}))
        for module in model.modules()
        for name in _HOOK_DICTS
    }
    try:
        yield model
    finally:
        for module in model.modules():
            for name in _HOOK_DICTS:
                hooks = getattr(module, name, None)
                if hooks is None:
                    continue
                for key in set(hooks) - before.get((id(module), name), set()):
                    hooks.pop(key, None)


@contextlib.contextmanager
def peer_call(model: nn.Module) -> Iterator[nn.Module]:
    """The conditions every peer runs under: eval mode, parameters frozen, no hook left
    behind, gradients on; the model as it was afterwards."""
    with (
        eval_mode(model),
        frozen_parameters(model),
        no_hooks_left(model),
        torch.enable_grad(),
    ):
        yield model


def deepest_mined_spatial_layer(
    model: nn.Module, relevant: RelevantFeatures, images: torch.Tensor
) -> str:
    """The peers' default layer: the deepest mined layer with a spatial map whose module runs
    once per forward pass (a block's output where vebi mines whole blocks; not an activation
    module the network reuses, as EfficientNet's ``_swish``), else the last leaf with one."""
    spatial = spatial_layers(model, relevant.layers, images)
    mined = [layer for layer in relevant.layers if layer in spatial]
    modules = dict(model.named_modules())
    calls = dict.fromkeys(mined, 0)
    handles = [
        modules[layer].register_forward_hook(
            lambda *_, layer=layer: calls.__setitem__(layer, calls[layer] + 1)
        )
        for layer in mined
    ]
    try:
        with torch.no_grad(), eval_mode(model):
            model(images[:1])
    finally:
        for handle in handles:
            handle.remove()
    once = [layer for layer in mined if calls[layer] == 1]
    return once[-1] if once else last_spatial_layer(model, images)


def check_runs_once(model: nn.Module, layer: str, images: torch.Tensor, peer: str) -> None:
    """Refuse a layer whose module runs more than once per forward pass (a reused ReLU):
    CRP masks and CRAFT replaces its output, which would be the wrong call's."""
    calls: list[int] = []
    probe = dict(model.named_modules())[layer].register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad(), eval_mode(model):
            model(images[:1])
    finally:
        probe.remove()
    if len(calls) != 1:
        raise VebiError(
            f"{peer} at {layer}: its module runs {len(calls)} times per forward pass; choose "
            "a layer that runs once (a block's output)"
        )


class PeerMethod:
    """Mixin of the peers: ``is_peer`` (a failure at run time is a noted row, not the end of
    the evaluation) and ``notes`` (what a reader of the table must know about this row)."""

    is_peer: ClassVar[bool] = True
    notes: list[str]


class _StopForward(Exception):
    """Raised by :class:`_SplitNetwork`'s hook once the layer's output is captured."""


class _SplitNetwork:
    """``model`` split at the output of ``layer`` (CRAFT's g and h), through one forward hook:
    ``input_to_latent(x)`` runs the network until the layer and returns its output;
    ``latent_to_logit(a)`` runs the network on blank images with the layer's output replaced
    by ``a`` (the layers before it are computed and discarded: any network splits this way,
    whatever its forward does, as long as nothing after the layer reads a tensor from before
    it). The blank images are a quarter of the side where the network accepts that (the
    work before the layer is wasted; 16x less of it), else of ``image_shape``. The layer must
    run once per forward pass (a ReLU module reused inside a block is refused)."""

    def __init__(self, model: nn.Module, layer: str, image_shape: tuple[int, ...]) -> None:
        self.model, self.image_shape = model, tuple(image_shape)
        self.device = next(model.parameters()).device
        self._replacement: torch.Tensor | None = None
        self._captured: torch.Tensor | None = None
        module = dict(model.named_modules())[layer]
        blank = torch.zeros(1, *self.image_shape, device=self.device)
        check_runs_once(model, layer, blank, "CRAFT (evaluation.methods.craft.layer)")
        self._handle = module.register_forward_hook(self._hook)
        side = self.image_shape[-1]
        self._blank = self.image_shape
        if side >= 64:
            small = (*self.image_shape[:-2], max(16, self.image_shape[-2] // 4), side // 4)
            if self._reduced_blank_works(small):
                self._blank = small

    def _reduced_blank_works(self, shape: tuple[int, ...]) -> bool:
        """Whether a forward pass on blank images of ``shape`` with the layer's output replaced
        gives the logits the full-size blank gives (it must: the layer's output is all that
        reaches them)."""
        with torch.no_grad():
            a = self.input_to_latent(torch.rand(2, *self.image_shape, device=self.device))
            self._blank = self.image_shape
            full = self.latent_to_logit(a)
            self._blank = shape
            try:
                small = self.latent_to_logit(a)
            except (RuntimeError, ValueError):
                return False
        return small.shape == full.shape and torch.allclose(small, full, atol=1e-5, rtol=1e-4)

    def _hook(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self._replacement is not None:
            return self._replacement
        self._captured = output
        raise _StopForward

    def input_to_latent(self, x: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(_StopForward):
            self.model(torch.as_tensor(x).to(self.device))
        assert self._captured is not None
        captured, self._captured = self._captured, None
        return captured

    def latent_to_logit(self, a: torch.Tensor) -> torch.Tensor:
        self._replacement = torch.as_tensor(a).to(self.device)
        try:
            blank = torch.zeros(len(a), *self._blank, device=self.device)
            return self.model(blank)
        finally:
            self._replacement = None

    def close(self) -> None:
        self._handle.remove()


class ZennitLRP(PeerMethod, SignalMethod):
    """LRP through zennit: ``composite`` ``epsilon_plus_flat`` (epsilon in dense layers, z+ in
    convolutions, flat in the first layer) or ``epsilon_gamma_box`` (epsilon, gamma = 0.25,
    z^B with the pixel bounds in the first layer), with :func:`zennit_canonizers`. Relevance
    starts at the class logit (R_c = z_c, other outputs 0) and ends at the pixels; the map is
    :func:`positive_relevance_map`."""

    def __init__(
        self,
        model: nn.Module,
        relevant: RelevantFeatures,
        composite: str = "epsilon_plus_flat",
    ) -> None:
        super().__init__(model, relevant)
        import_peer("zennit.attribution", "zennit")
        self.composite_name = composite
        self.notes = []
        unmerged = unmerged_batch_norms(model)
        if unmerged and not zennit_canonizers(model)[0].__class__.__name__.startswith(
            ("ResNet", "VGG")
        ):
            self.notes.append(
                f"{unmerged} batch norm(s) outside a Sequential after their convolution: "
                "zennit cannot merge them and passes their gradient"
            )

    def _signal(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The (N, C, H, W) pixel relevance of the class logits."""
        attribution = import_peer("zennit.attribution", "zennit")
        composite = lrp_composite(self.composite_name, self.model, images)
        inputs = images.detach().clone().requires_grad_(True)
        with (
            eval_mode(self.model),
            no_hooks_left(self.model),
            torch.enable_grad(),
            attribution.Gradient(self.model, composite) as attributor,
        ):
            # R_c = z_c at the class logit, 0 elsewhere (no extra forward for the class count)
            _, relevance = attributor(
                inputs,
                lambda output: output * F.one_hot(classes, output.shape[1]).to(output),
            )
        return relevance.detach()

    def _heatmap(self, signal: torch.Tensor) -> torch.Tensor:
        return positive_relevance_map(signal)


class CRPConditional(PeerMethod, HeatmapMethod):
    """Concept Relevance Propagation (zennit-crp's ``CondAttribution``, ``EpsilonPlusFlat``
    with :func:`zennit_canonizers`): the conditional heatmaps of k channels, each conditioned
    on the channel at its layer and on the class at the output, R(x | channel, class), each
    scaled as :func:`positive_relevance_map` and combined by their pixel-wise maximum as
    vebi's maps are.

    ``pick="vebi"``: the k relevant features vebi's explanation picks for the image (same
    layers and channels, :meth:`Explainer.choose`). ``pick="crp"``: CRP's own pick, the k
    channels of ``layer`` (default: the deepest mined layer with a spatial map,
    :func:`deepest_mined_spatial_layer`) with the most relevance
    for the class in that image (``ChannelConcept.attribute`` with ``abs_norm``)."""

    uses_relevant_features = True

    def __init__(
        self,
        model: nn.Module,
        relevant: RelevantFeatures,
        pick: str = "vebi",
        k: int = 3,
        layer: str | None = None,
    ) -> None:
        super().__init__(model, relevant)
        if pick not in ("vebi", "crp"):
            raise VebiError(f"CRP pick must be 'vebi' or 'crp', got {pick!r}")
        self.attribution = import_peer("crp.attribution", "zennit-crp")
        self.concepts = import_peer("crp.concepts", "zennit-crp")
        self.pick, self.k, self.layer = pick, int(k), layer
        self.explainer = Explainer(model, relevant, k=k) if pick == "vebi" else None
        self.notes = []

    def _composite(self, images: torch.Tensor) -> Any:
        return lrp_composite("epsilon_plus_flat", self.model, images)

    def chosen(self, images: torch.Tensor, classes: torch.Tensor) -> list[list[tuple[str, int]]]:
        """Per image, the (layer, channel) pairs to condition on."""
        if self.explainer is not None:
            features = self.explainer.choose(images, classes)
            return [[(f.layer, f.channel) for f in row] for row in features]
        if self.layer is None:
            self.layer = deepest_mined_spatial_layer(self.model, self.relevant, images)
            check_runs_once(self.model, self.layer, images, "CRP (evaluation.methods.crp.layer)")
        attribute = self.attribution.CondAttribution(self.model, no_param_grad=False)
        inputs = images.detach().clone().requires_grad_(True)
        conditions = [{"y": [int(c)]} for c in classes]
        with peer_call(self.model):
            result = attribute(
                inputs, conditions, self._composite(images), record_layer=[self.layer]
            )
        per_channel = self.concepts.ChannelConcept().attribute(
            result.relevances[self.layer], abs_norm=True
        )
        top = per_channel.topk(min(self.k, per_channel.shape[1]), dim=1).indices.tolist()
        return [[(self.layer, channel) for channel in row] for row in top]

    def conditional_maps(
        self, images: torch.Tensor, classes: torch.Tensor
    ) -> tuple[torch.Tensor, list[list[tuple[str, int]]]]:
        """((N, k, H, W) conditional maps in [0, 1], zeros where an image has fewer than k
        channels; the channels)."""
        chosen = self.chosen(images, classes)
        k = max((len(row) for row in chosen), default=0)
        maps = torch.zeros(len(images), max(k, 1), *images.shape[-2:], device=images.device)
        attribute = self.attribution.CondAttribution(self.model, no_param_grad=False)
        # one condition per (image, channel); CRP runs the conditions of one layer together
        rows = [(n, slot) for n, row in enumerate(chosen) for slot in range(len(row))]
        if not rows:
            return maps, chosen
        data = images.detach()[[n for n, _ in rows]].clone().requires_grad_(True)
        conditions = [
            {chosen[n][slot][0]: [chosen[n][slot][1]], "y": [int(classes[n])]} for n, slot in rows
        ]
        with peer_call(self.model):
            # exclude_parallel=False: one pass for conditions on different layers (CRP runs
            # conditions of one set of layers per pass otherwise, and orders its output so)
            result = attribute(data, conditions, self._composite(images), exclude_parallel=False)
        heatmaps = positive_relevance_map(result.heatmap.detach())
        for index, (n, slot) in enumerate(rows):
            maps[n, slot] = heatmaps[index]
        return maps, chosen

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        maps, _ = self.conditional_maps(images, classes)
        return maps.amax(dim=1)


class PytorchGradCAM(PeerMethod, HeatmapMethod):
    """A CAM of pytorch-grad-cam at ``layer`` (default: the last layer with a spatial map),
    with its defaults: ``gradcam``, ``gradcam_plus_plus``, ``layercam``, ``scorecam``,
    ``eigencam`` (the target class through ``ClassifierOutputTarget``; EigenCAM ignores it, as
    it is class-agnostic). The library returns maps min-max scaled per image and resized to
    the image; they are then calibrated as every method's (``calibration``; ``min_max`` keeps
    the library's maps)."""

    ALGORITHMS: ClassVar[dict[str, str]] = {
        "gradcam": "GradCAM",
        "gradcam_plus_plus": "GradCAMPlusPlus",
        "layercam": "LayerCAM",
        "scorecam": "ScoreCAM",
        "eigencam": "EigenCAM",
    }

    def __init__(
        self,
        model: nn.Module,
        relevant: RelevantFeatures,
        algorithm: str = "gradcam",
        layer: str | None = None,
        calibration: str = "percentile",
    ) -> None:
        super().__init__(model, relevant)
        self.calibration = checked_calibration(calibration)
        if algorithm not in self.ALGORITHMS:
            raise VebiError(
                f"unknown pytorch-grad-cam algorithm {algorithm!r}; use one of "
                f"{list(self.ALGORITHMS)}"
            )
        self.library = import_peer("pytorch_grad_cam", "grad-cam")
        self.targets = import_peer("pytorch_grad_cam.utils.model_targets", "grad-cam")
        self.algorithm, self.layer = algorithm, layer
        self.notes = []

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            self.layer = last_spatial_layer(self.model, images)
        module = dict(self.model.named_modules())[self.layer]
        cam_class = getattr(self.library, self.ALGORITHMS[self.algorithm])
        targets = [self.targets.ClassifierOutputTarget(int(c)) for c in classes]
        with (
            peer_call(self.model),
            cam_class(model=self.model, target_layers=[module]) as cam,
        ):
            if self.algorithm == "scorecam":
                cam.batch_size = 64
            # ScoreCAM draws a progress bar per image batch: kept off the evaluation's own
            with contextlib.redirect_stderr(io.StringIO()):
                # the graph runs through the input (the parameters are frozen)
                inputs = images.detach().clone().requires_grad_(True)
                maps = cam(input_tensor=inputs, targets=targets)
        maps = torch.as_tensor(np.asarray(maps), dtype=torch.float32, device=images.device)
        return calibrate(maps.nan_to_num(0.0).clamp(0, 1), self.calibration)


class CaptumPathAttribution(PeerMethod, SignalMethod):
    """Captum's ``integrated_gradients`` (``IntegratedGradients``: the black-image baseline,
    ``steps`` = 50 Riemann steps, its default) or ``smoothgrad`` (``NoiseTunnel`` over
    ``Saliency``: the mean gradient over ``samples`` = 50 copies with Gaussian noise of std
    ``noise`` = 0.15 of the [0, 1] pixel range, Smilkov et al.'s recommended 10-20 %).
    Integrated gradients map as the other signed signals (positive part, L2 over colours);
    SmoothGrad as the gradient (its magnitude)."""

    def __init__(
        self,
        model: nn.Module,
        relevant: RelevantFeatures,
        algorithm: str,
        steps: int = 50,
        samples: int = 50,
        noise: float = 0.15,
    ) -> None:
        super().__init__(model, relevant)
        if algorithm not in ("integrated_gradients", "smoothgrad"):
            raise VebiError(
                f"unknown Captum algorithm {algorithm!r}: 'integrated_gradients' or 'smoothgrad'"
            )
        self.captum = import_peer("captum.attr", "captum")
        self.algorithm, self.steps, self.samples, self.noise = algorithm, steps, samples, noise
        self.notes = []

    def _signal(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        inputs = images.detach().clone().requires_grad_(True)
        with eval_mode(self.model), torch.enable_grad():
            if self.algorithm == "integrated_gradients":
                method = self.captum.IntegratedGradients(self.model)
                signal = method.attribute(
                    inputs,
                    baselines=torch.zeros_like(inputs),
                    target=classes,
                    n_steps=self.steps,
                    internal_batch_size=len(images),
                )
            else:
                method = self.captum.NoiseTunnel(self.captum.Saliency(self.model))
                signal = method.attribute(
                    inputs,
                    nt_type="smoothgrad",
                    nt_samples=self.samples,
                    # noisy copies per pass: at most about 256 images forwarded at once (4,096
                    # SmallVGG images at 112 px took 21 GB and were killed)
                    nt_samples_batch_size=max(1, min(self.samples, 256 // len(images))),
                    stdevs=self.noise,
                    target=classes,
                    abs=False,
                )
        return signal.detach()

    def _heatmap(self, signal: torch.Tensor) -> torch.Tensor:
        return signal_to_heatmap(signal.abs() if self.algorithm == "smoothgrad" else signal)


class CRAFTConcepts(PeerMethod, HeatmapMethod):
    """CRAFT (craft-xai's torch ``Craft``): per class, ``concepts`` concepts by NMF of the
    activations at ``layer`` (default: the deepest mined layer with a spatial map) of crops of the
    class's training images (``images_per_class`` of them, crops of ``patch_fraction`` of the
    image side: the library's 64 px at 224 px), their Sobol importance for the class
    (``estimate_importance``); an image's map is the importance-weighted sum of its concept
    maps (``transform`` of its activations), positive part, upsampled bilinearly and scaled.

    The network is split at ``layer``: g(x) = the layer's output, h(a) = the logits with the
    layer's output replaced by a. Needs non-negative activations there (NMF); else the row is
    noted with the reason. Fitted by :meth:`fit` on the training images."""

    needs_training_images: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        relevant: RelevantFeatures,
        layer: str | None = None,
        concepts: int = 10,
        images_per_class: int = 32,
        patch_fraction: float = 64 / 224,
        batch_size: int = 64,
    ) -> None:
        super().__init__(model, relevant)
        self.craft = import_craft()
        self.layer = layer
        self.concepts, self.images_per_class = int(concepts), int(images_per_class)
        self.patch_fraction, self.batch_size = float(patch_fraction), int(batch_size)
        self.fitted: dict[int, tuple[Any, np.ndarray]] = {}
        self.notes = []

    @contextlib.contextmanager
    def _split(self, image_shape: tuple[int, ...]) -> Iterator[_SplitNetwork]:
        """The network split at ``layer`` for images of ``image_shape`` (C, H, W), in eval
        mode (batch norms use and keep their running statistics)."""
        assert self.layer is not None
        with eval_mode(self.model):
            split = _SplitNetwork(self.model, self.layer, image_shape)
            try:
                yield split
            finally:
                split.close()

    def fit(self, training: Callable[[int, int], torch.Tensor]) -> None:
        """Concepts and importances of every class from ``training(class_id, count)`` (that
        many training images of the class, (n, C, H, W) in [0, 1])."""
        for c in range(self.relevant.num_classes):
            images = training(c, self.images_per_class)
            if len(images) == 0:
                continue
            if self.layer is None:
                self.layer = deepest_mined_spatial_layer(self.model, self.relevant, images)
            self.fitted[c] = self._fit_class(images, c)

    def _fit_class(self, images: torch.Tensor, c: int) -> tuple[Any, np.ndarray]:
        if images.shape[1] != 3:
            raise VebiError(
                f"CRAFT (craft-xai 0.0.3) crops colour images only (its patches are shaped "
                f"(-1, 3, p, p)); this network takes {images.shape[1]}-channel images"
            )
        size = images.shape[-1]
        if images.shape[-2] != size:  # CRAFT crops square images
            images = F.interpolate(images, size=(size, size), mode="bilinear")
        patch = max(2, round(self.patch_fraction * size))
        device = str(next(self.model.parameters()).device)
        with self._split((images.shape[1], size, size)) as split, torch.no_grad():
            extractor = self.craft.Craft(
                input_to_latent=split.input_to_latent,
                latent_to_logit=split.latent_to_logit,
                number_of_concepts=self.concepts,
                batch_size=self.batch_size,
                patch_size=patch,
                device=device,
            )
            try:
                with warnings.catch_warnings():  # its torch.tensor(tensor) copies, NMF's
                    warnings.simplefilter("ignore")  # convergence notes
                    extractor.fit(images.cpu())
            except AssertionError as error:
                raise VebiError(
                    f"CRAFT refuses layer {self.layer}: {error} (NMF needs non-negative "
                    "activations; pick a layer after a ReLU with evaluation.methods.craft.layer)"
                ) from None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importance = extractor.estimate_importance(images.to(device), class_id=c)
        return extractor, np.asarray(importance, dtype=np.float32)

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise VebiError("CRAFT has not been fitted: call fit() with the training images")
        maps = torch.zeros(len(images), *images.shape[-2:], device=images.device)
        with self._split(tuple(images.shape[1:])) as split, torch.no_grad():
            activations = split.input_to_latent(images)
            if activations.min() < 0:
                raise VebiError(f"CRAFT: negative activations at {self.layer} (NMF needs >= 0)")
            for c in classes.unique().tolist():
                if c not in self.fitted:
                    continue
                extractor, importance = self.fitted[c]
                rows = (classes == c).nonzero()[:, 0]
                # (n, h, w, R) concept coefficients of each position
                with warnings.catch_warnings():  # NMF's convergence notes
                    warnings.simplefilter("ignore")
                    u = extractor.transform(None, activations=activations[rows].cpu())
                weighted = torch.as_tensor(np.asarray(u) @ importance, dtype=torch.float32)
                upsampled = F.interpolate(
                    weighted[:, None].to(images.device),
                    size=tuple(images.shape[-2:]),
                    mode="bilinear",
                    align_corners=False,
                )
                maps[rows] = upsampled[:, 0]
        return calibrate(maps.clamp_min(0))


class CRPClassPick:
    """CRP's class-level pick of channels, to ablate next to vebi's relevant features:
    ``pick(c, {layer: n})`` -> the n channels of each layer with the most mean relevance for
    class c over ``images_per_class`` of its training images (zennit-crp's
    ``CondAttribution`` with ``EpsilonPlusFlat`` and :func:`zennit_canonizers`, relevance at
    the layers recorded, ``ChannelConcept.attribute`` with ``abs_norm``: each image's channel
    relevances sum to 1 in absolute value before the mean). The relevances of a class are
    computed once, for every layer at once."""

    def __init__(
        self,
        model: nn.Module,
        training: Callable[[int, int], torch.Tensor],
        images_per_class: int = 32,
        batch_size: int = 32,
    ) -> None:
        self.attribution = import_peer("crp.attribution", "zennit-crp")
        self.concepts = import_peer("crp.concepts", "zennit-crp")
        self.model, self.training = model, training
        self.images_per_class, self.batch_size = int(images_per_class), int(batch_size)
        self._relevance: dict[int, dict[str, torch.Tensor]] = {}

    def mean_relevance(self, c: int, layers: list[str]) -> dict[str, torch.Tensor]:
        """Per layer, the (K,) mean normalised channel relevance for class c."""
        cached = self._relevance.get(c, {})
        missing = [layer for layer in layers if layer not in cached]
        if missing:
            images = self.training(c, self.images_per_class)
            device = next(self.model.parameters()).device
            sums: dict[str, torch.Tensor] = {}
            attribute = self.attribution.CondAttribution(self.model, no_param_grad=False)
            concept = self.concepts.ChannelConcept()
            for start in range(0, len(images), self.batch_size):
                batch = images[start : start + self.batch_size].to(device)
                data = batch.clone().requires_grad_(True)
                conditions = [{"y": [int(c)]} for _ in range(len(batch))]
                composite = lrp_composite("epsilon_plus_flat", self.model, batch)
                with peer_call(self.model):
                    result = attribute(data, conditions, composite, record_layer=missing)
                for layer in missing:
                    per_channel = concept.attribute(result.relevances[layer], abs_norm=True)
                    sums[layer] = sums.get(layer, 0) + per_channel.detach().sum(dim=0).cpu()
            for layer in missing:
                cached[layer] = sums[layer] / max(len(images), 1)
            self._relevance[c] = cached
        return {layer: cached[layer] for layer in layers}

    def __call__(self, c: int, layers: Mapping[str, int]) -> dict[str, list[int]]:
        relevance = self.mean_relevance(c, list(layers))
        return {
            layer: sorted(relevance[layer].topk(min(n, len(relevance[layer]))).indices.tolist())
            for layer, n in layers.items()
        }
