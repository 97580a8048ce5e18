"""Aggregated channel responses: one vector x in R^m per image (docs/method.md, section 1).

For each selected layer output A (N x K x H x W, or N x K for vector layers):

1. a_k = per-channel statistic: ``energy`` sum_{h,w} A[h,w,k]^2 (default), ``mean`` or ``max``
   over the spatial positions;
2. x_k = a_k / sum_k' |a_k'|  (L1-normalise within the layer; 0 when the layer is all zero);
3. concatenate the layers -> x in R^m;
4. x <- x / ||x||_2  (global L2 normalisation; 0 stays 0).

Steps 2 and 4 can be switched off. A :class:`FeatureIndex` maps feature ids <-> (layer, channel).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from vebi.errors import VebiError
from vebi.models.hooks import (
    check_layer_names,
    class_names,
    eval_mode,
    leaf_modules,
    refuse_attention,
    trace_leaf_calls,
)
from vebi.models.normalize import Normalize
from vebi.utils.log import get_logger

log = get_logger(__name__)

AGGREGATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "energy": lambda a: torch.linalg.vector_norm(a, dim=(2, 3)).square(),
    "mean": lambda a: a.mean(dim=(2, 3)),
    "max": lambda a: a.amax(dim=(2, 3)),
}
#: Leaf modules whose output is never a feature layer of its own (a copy, a padded copy, or
#: not a feature map).
NON_FEATURE_MODULES = (
    Normalize,
    nn.Dropout,
    nn.Dropout2d,
    nn.Flatten,
    nn.Identity,
    nn.ZeroPad2d,
    nn.ConstantPad2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
)
#: Leaf modules whose output is another view of their input's channels (a per-channel affine
#: map or a monotone elementwise activation): channel k before and after is one feature.
VIEW_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Softplus,
    nn.Sigmoid,
    nn.Tanh,
)
#: Leaf modules that pool a map: a global one (output 1 x 1, or a vector) is a copy of its input.
POOLING_MODULES: tuple[type[nn.Module], ...] = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
)
#: How many views of one tensor the default layers take: ``one`` (a conv, the batch norm and
#: the activation after it are one feature layer, the activation's; a global pooling of a
#: feature layer is left out) or ``every`` (each of them, as in the paper).
VIEWS = ("one", "every")

#: Blocks whose output is one feature layer and whose inner layers are not: residual blocks
#: (inside them the signal is only half of what the network passes on), inverted residuals,
#: dense layers, inception modules, conv-norm-activation groups. Extend with
#: :func:`register_feature_block` (or ``mining.feature_blocks`` in a config).
FEATURE_BLOCKS: set[type[nn.Module]] = {BasicBlock, Bottleneck}
#: The same by qualified class name: torchvision, timm and lukemelas-style EfficientNet code
#: (matched along each class's bases; no import needed).
FEATURE_BLOCK_NAMES: set[str] = {
    *(
        f"torchvision.models.{name}"
        for name in (
            "mobilenetv2.InvertedResidual",
            "mobilenetv3.InvertedResidual",
            "efficientnet.MBConv",
            "efficientnet.FusedMBConv",
            "convnext.CNBlock",
            "regnet.ResBottleneckBlock",
            "regnet.SimpleStemIN",
            "densenet._DenseLayer",
            "densenet._Transition",
            "googlenet.Inception",
            "googlenet.BasicConv2d",
            "inception.InceptionA",
            "inception.InceptionB",
            "inception.InceptionC",
            "inception.InceptionD",
            "inception.InceptionE",
            "inception.BasicConv2d",
            "squeezenet.Fire",
            "shufflenetv2.InvertedResidual",
            "mnasnet._InvertedResidual",
        )
    ),
    "torchvision.ops.misc.Conv2dNormActivation",
    *(
        f"timm.{name}"
        for name in (
            "layers.conv_bn_act.ConvNormAct",
            "layers.norm_act.BatchNormAct2d",
            "models.resnet.BasicBlock",
            "models.resnet.Bottleneck",
            "models.resnetv2.PreActBasic",
            "models.resnetv2.PreActBottleneck",
            "models.resnetv2.Bottleneck",
            "models._efficientnet_blocks.ConvBnAct",
            "models._efficientnet_blocks.DepthwiseSeparableConv",
            "models._efficientnet_blocks.InvertedResidual",
            "models._efficientnet_blocks.EdgeResidual",
            "models._efficientnet_blocks.CondConvResidual",
            "models._efficientnet_blocks.UniversalInvertedResidual",
            "models.convnext.ConvNeXtBlock",
            "models.regnet.Bottleneck",
            "models.densenet.DenseLayer",
            "models.densenet.DenseTransition",
            "models.inception_v3.InceptionA",
            "models.inception_v3.InceptionB",
            "models.inception_v3.InceptionC",
            "models.inception_v3.InceptionD",
            "models.inception_v3.InceptionE",
            "models.xception.Block",
            "models.xception_aligned.XceptionModule",
            "models.dpn.DualPathBlock",
            "models.res2net.Bottle2neck",
            "models.ghostnet.GhostBottleneck",
            "models.byobnet.RepVggBlock",
            "models.byobnet.BasicBlock",
            "models.byobnet.BottleneckBlock",
            "models.byobnet.DarkBlock",
            "models.byobnet.EdgeBlock",
            "models.nfnet.NormFreeBlock",
        )
    ),
    "efficientnet_lite_pytorch.model.MBConvBlock",
    "efficientnet_pytorch.model.MBConvBlock",
}


def register_feature_block(*types: type[nn.Module] | str) -> None:
    """Count the outputs of these module types (classes or qualified names) as one feature
    layer each, and leave out the layers inside them, in :func:`default_feature_layers`."""
    for block in types:
        if isinstance(block, str):
            FEATURE_BLOCK_NAMES.add(block)
        elif isinstance(block, type) and issubclass(block, nn.Module):
            FEATURE_BLOCKS.add(block)
        else:
            raise VebiError(f"a feature block is an nn.Module subclass or its name, not {block!r}")


def is_feature_block(module: nn.Module, extra: Sequence[str] = ()) -> bool:
    """Whether ``module`` is a registered block (or one of the ``extra`` qualified names), or
    a stock layer type with children (a Conv2d subclass that pads with a child module, a
    batch norm with its activation inside): one layer, its output."""
    if isinstance(module, tuple(FEATURE_BLOCKS)):
        return True
    names = class_names(module)
    if not names.isdisjoint(FEATURE_BLOCK_NAMES) or not names.isdisjoint(extra):
        return True
    stock = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
    return isinstance(module, stock) and any(True for _ in module.children())


class NonFiniteActivationError(VebiError):
    """A layer produced NaN or Inf; the message names the layer (and the batch, when known)."""


@dataclass(frozen=True)
class FeatureIndex:
    """Feature id <-> (layer name, channel), layers in forward order."""

    layers: tuple[str, ...]
    channels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.channels) or len(set(self.layers)) != len(self.layers):
            raise ValueError("layers must be unique and match channels")

    @property
    def size(self) -> int:
        return sum(self.channels)

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        offsets, total = [], 0
        for count in self.channels:
            offsets.append(total)
            total += count
        return tuple(offsets)

    def feature_id(self, layer: str, channel: int) -> int:
        position = self.layers.index(layer)
        if not 0 <= channel < self.channels[position]:
            raise IndexError(f"layer {layer} has {self.channels[position]} channels, not {channel}")
        return self.offsets[position] + channel

    def locate(self, feature_id: int) -> tuple[str, int]:
        if not 0 <= feature_id < self.size:
            raise IndexError(f"feature id {feature_id} outside 0..{self.size - 1}")
        for layer, offset, count in zip(self.layers, self.offsets, self.channels, strict=True):
            if feature_id < offset + count:
                return layer, feature_id - offset
        raise AssertionError("unreachable")

    def layer_of_each_feature(self) -> list[str]:
        return [
            layer
            for layer, count in zip(self.layers, self.channels, strict=True)
            for _ in range(count)
        ]


def default_feature_layers(
    model: nn.Module, images: torch.Tensor, blocks: Sequence[str] = (), views: str = "one"
) -> list[str]:
    """The feature layers when none are named (docs/method.md, section 1):

    * every leaf layer output from the input up to, not including, the logits (for a VGG:
      every conv, relu, pool and fully connected output, as in the paper);
    * but a block (:func:`is_feature_block`: a ResNet's ``Bottleneck``, an inverted residual,
      a dense layer, an inception module, a conv-norm-activation group, or a type in
      ``blocks`` given by qualified name) counts as one layer, its output, and the layers
      inside it are left out (for a ResNet-50: the stem, the 16 block outputs and the average
      pool, m = 17,408 instead of 70,400). Blocks inside blocks count as their outer block.

    The logits layer is the last leaf module with parameters; it and everything after it are
    left out, and so are modules that only copy, pad or reshape (normalisation of the input,
    dropout, flatten, identity, padding). Outputs must be (N, K, H, W) or (N, K).

    ``views="one"`` (the default) keeps one view per tensor (:func:`views_of_one_tensor`): a
    layer whose output goes straight into a batch norm or an activation (:data:`VIEW_MODULES`)
    is left out for the last of that chain (conv -> bn -> relu: relu), and so is a global
    pooling of a feature layer (a ResNet's ``avgpool``, a global max pool). ``views="every"``
    keeps them all (the paper's every-layer choice).
    """
    if views not in VIEWS:
        raise VebiError(f"mining.views must be one of {list(VIEWS)}, got {views!r}")
    refuse_attention(model)
    leaves = leaf_modules(model)
    candidates = {n: m for n, m in model.named_modules() if n and is_feature_block(m, blocks)}
    calls = trace_leaf_calls(model, images, {**leaves, **candidates})
    called = {name for name, _ in calls}
    found = [n for n in candidates if n in called]  # blocks that output a single tensor
    outer = [n for n in found if not any(n.startswith(b + ".") for b in found)]
    with_params = [
        i
        for i, (name, _) in enumerate(calls)
        if name in leaves and any(True for _ in leaves[name].parameters())
    ]
    if not with_params:
        raise VebiError("the model has no layer with parameters: cannot tell where the logits are")
    last = calls[with_params[-1]][0]
    logits_block = next((b for b in outer if last.startswith(b + ".")), None)
    end = min(i for i, (name, _) in enumerate(calls) if name in (last, logits_block))
    layers = []
    for name, shape in calls[:end]:
        if name not in outer and any(name.startswith(block + ".") for block in outer):
            continue
        if name in candidates and name not in outer:
            continue
        if isinstance(leaves.get(name), NON_FEATURE_MODULES) or len(shape) not in (2, 4):
            continue
        layers.append(name)
    if views == "one":
        modules = dict(model.named_modules())
        left_out = views_of_one_tensor(model, images, {n: modules[n] for n in layers})
        layers = [name for name in layers if name not in left_out]
        if left_out:
            log.info(
                "Feature layers: one view per tensor (mining.views=one; every: the paper's "
                "every layer): %d layers, left out %s",
                len(layers),
                ", ".join(f"{name} ({why})" for name, why in left_out.items()),
            )
    return layers


@dataclass
class _Flow:
    """Which traced module returned the tensor each module took (tensor identity)."""

    first_producer: dict[str, str]  # of the input object: the module that made it
    last_producer: dict[str, str]  # ... the last one that returned it (in place: the activation)
    input_shapes: dict[str, torch.Size]
    output_shapes: dict[str, torch.Size]


def _trace_flow(model: nn.Module, images: torch.Tensor, modules: dict[str, nn.Module]) -> _Flow:
    """One forward pass on ``images`` with hooks on ``modules`` (each module's last call)."""
    first: dict[int, str] = {}
    last: dict[int, str] = {}
    taken: dict[str, int] = {}
    input_shapes: dict[str, torch.Size] = {}
    output_shapes: dict[str, torch.Size] = {}
    keep: list[torch.Tensor] = []  # the traced tensors stay alive: ids are not re-used

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if source is not None:
                taken[name], input_shapes[name] = id(source), source.shape
                keep.append(source)
            else:
                taken.pop(name, None)
            if isinstance(output, torch.Tensor):
                keep.append(output)
                first.setdefault(id(output), name)  # in place: the first producer
                last[id(output)] = name
                output_shapes[name] = output.shape

        return hook

    with contextlib.ExitStack() as stack:
        for name, module in modules.items():
            stack.callback(module.register_forward_hook(record(name)).remove)
        with torch.no_grad(), eval_mode(model):
            model(images)
    return _Flow(
        {n: first[i] for n, i in taken.items() if i in first and first[i] != n},
        {n: last[i] for n, i in taken.items() if i in last and last[i] != n},
        input_shapes,
        output_shapes,
    )


def _is_global_pooling(module: nn.Module, flow: _Flow, name: str) -> bool:
    """A pooling whose map input (larger than 1 x 1) comes out 1 x 1 or as a vector."""
    taken, pooled = flow.input_shapes.get(name), flow.output_shapes.get(name)
    if not isinstance(module, POOLING_MODULES) or taken is None or pooled is None:
        return False
    return len(taken) == 4 and taken[-2:] != (1, 1) and (len(pooled) == 2 or pooled[-2:] == (1, 1))


def views_of_one_tensor(
    model: nn.Module, images: torch.Tensor, modules: dict[str, nn.Module]
) -> dict[str, str]:
    """Among ``modules`` (feature layers), those that are another view of one of them, as
    ``{name: why}``: a layer whose output is the input of a :data:`VIEW_MODULES` layer (its
    channels are the same features before a per-channel affine map or a monotone activation;
    the last of such a chain stays), and a global pooling (:data:`POOLING_MODULES` with a
    1 x 1 or vector output) of a layer's output. Traced by tensor identity on ``images``."""
    flow = _trace_flow(model, images, modules)
    left_out: dict[str, str] = {}
    for name, module in modules.items():
        source = flow.first_producer.get(name)
        if source is None:
            continue
        if isinstance(module, VIEW_MODULES):
            left_out[source] = f"a view of {name}'s tensor"
        elif _is_global_pooling(module, flow, name):
            left_out[name] = f"a global pooling of {source}"
    return left_out


def pooled_sources(model: nn.Module, images: torch.Tensor, layers: Sequence[str]) -> dict[str, str]:
    """``{layer: source}`` for those of ``layers`` that globally pool (1 x 1 or vector output)
    the map of another module, ``source`` (the last module that returned that map: after an
    in-place activation, the activation): channel k of the layer is channel k of the source's
    map, pooled (``gmp``/23 is ``relu3``/23's maximum)."""
    modules = dict(model.named_modules())
    traced = {**leaf_modules(model), **{name: modules[name] for name in layers}}
    flow = _trace_flow(model, images, {name: m for name, m in traced.items() if name})
    return {
        name: flow.last_producer[name]
        for name in layers
        if name in flow.last_producer and _is_global_pooling(modules[name], flow, name)
    }


def select_feature_layers(
    model: nn.Module,
    images: torch.Tensor,
    specs: Sequence[str] | None,
    blocks: Sequence[str] = (),
    views: str = "one",
) -> list[str]:
    """The layers named by ``specs``, or :func:`default_feature_layers` (with the extra
    ``blocks``, qualified class names, and its ``views``) when there are none.

    A spec is a module name (``features.29``), a glob over module names (``net.layer4.*``,
    ``features.*``) or a module type (``type:Conv2d``, ``type:Bottleneck``). Module names
    alone are kept in the given order; with globs or types the matches are put in the order
    they run. A spec that matches nothing is an error listing the model's layers.
    """
    if not specs:
        return default_feature_layers(model, images, blocks, views)
    refuse_attention(model)
    if not any("*" in s or "?" in s or "[" in s or s.startswith("type:") for s in specs):
        check_layer_names(model, specs)
        return list(specs)
    modules = {name: module for name, module in model.named_modules() if name}
    chosen: dict[str, nn.Module] = {}
    for spec in specs:
        if spec.startswith("type:"):
            matches = [n for n, m in modules.items() if type(m).__name__ == spec[5:]]
        else:
            matches = [n for n in modules if fnmatch.fnmatchcase(n, spec)]
        if not matches:
            kinds = sorted({type(m).__name__ for m in modules.values()})
            raise VebiError(
                f"layer spec {spec!r} matches no module; the model's layers are: "
                f"{', '.join(modules)}; its module types: {', '.join(kinds)}"
            )
        chosen.update((n, modules[n]) for n in matches)
    return [name for name, _ in trace_leaf_calls(model, images, chosen)]


class FeatureExtractor:
    """Forward hooks that turn chosen layer outputs into the aggregated vector x (module doc).

    Use as a context manager: hooks are installed on enter and removed on exit, even on error::

        with FeatureExtractor(model, ["conv1", "conv2"]) as extractor:
            x, logits = extractor(images)   # x: (N, m) float32
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        aggregation: str = "energy",
        normalize_layers: bool = True,
        normalize_global: bool = True,
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise VebiError(
                f"unknown aggregation {aggregation!r}; choose from {sorted(AGGREGATIONS)}"
            )
        if not layers:
            raise VebiError("no feature layers selected")
        check_layer_names(model, layers)
        self.model = model
        self.layers = tuple(layers)
        self.aggregation = aggregation
        self.normalize_layers = normalize_layers
        self.normalize_global = normalize_global
        self._responses: dict[str, torch.Tensor] = {}
        self._stack: contextlib.ExitStack | None = None
        self.batch_label = ""
        #: channels per layer, known after the first call
        self.index: FeatureIndex | None = None

    def _aggregate(self, name: str, output: torch.Tensor) -> torch.Tensor:
        activations = output.detach()
        if activations.ndim == 2:
            activations = activations[:, :, None, None]
        if activations.ndim != 4:
            raise VebiError(
                f"layer {name} outputs shape {tuple(output.shape)}; need (N,K,H,W) or (N,K)"
            )
        response = AGGREGATIONS[self.aggregation](activations.float())
        if self.normalize_layers:
            total = response.abs().sum(dim=1, keepdim=True)
            # 0 for an all-zero layer; NaN stays NaN so that the check below sees it
            response = torch.where(total == 0, torch.zeros_like(response), response / total)
        return response

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self._responses[name] = self._aggregate(name, output)

        return hook

    def __enter__(self) -> FeatureExtractor:
        modules = dict(self.model.named_modules())
        self._stack = contextlib.ExitStack()
        for name in self.layers:
            handle = modules[name].register_forward_hook(self._hook(name))
            self._stack.callback(handle.remove)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        self._responses.clear()

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, batch_label: str = ""
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward ``images`` without autograd; return (x (N, m) float32, logits)."""
        return self.forward(images, batch_label)

    def forward(
        self, images: torch.Tensor, batch_label: str = ""
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward ``images`` (autograd as the caller has it); return (x, logits). x is detached."""
        if self._stack is None:
            raise RuntimeError("use FeatureExtractor as a context manager")
        finite = torch.isfinite(images)
        if not finite.all():
            bad = (~finite).flatten(1).any(1).nonzero()[:5, 0].tolist()
            raise NonFiniteActivationError(
                f"the input images{batch_label} hold {int((~finite).sum())} NaN/Inf value(s) "
                f"(in image(s) {bad}): pass finite values in [0, 1]"
            )
        self.batch_label = batch_label
        self._responses.clear()
        logits = self.model(images)
        missing = [name for name in self.layers if name not in self._responses]
        if missing:
            raise VebiError(f"layers {missing} did not run in the forward pass")
        responses = [self._responses[name] for name in self.layers]
        self.index = FeatureIndex(self.layers, tuple(r.shape[1] for r in responses))
        x = torch.cat(responses, dim=1)
        # NaN/Inf in a channel's map makes its energy/mean/max (and x) NaN/Inf too: one check
        # of x per batch, and the per-layer search only when it fails
        if not torch.isfinite(x).all():
            name = next(
                n
                for n, r in zip(self.layers, responses, strict=True)
                if not torch.isfinite(r).all()
            )
            raise NonFiniteActivationError(
                f"layer {name} produced NaN/Inf activations{batch_label}: check the input "
                "images (NaN pixels?) and the model weights"
            )
        if self.normalize_global:
            norm = x.norm(dim=1, keepdim=True)
            x = torch.where(norm == 0, torch.zeros_like(x), x / norm)
        return x, logits
