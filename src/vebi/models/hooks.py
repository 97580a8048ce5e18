"""Model plumbing shared by mining, explanation and evaluation.

Everything here looks at a network through its modules and forward hooks, never through its
code: which leaf modules it has and in which order they run, whether layer names exist,
recording layer outputs during a forward pass, and switching to eval mode for a while.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from vebi.errors import VebiError
from vebi.utils.torch_api import tensor_version


def network_of(model: nn.Module) -> nn.Module:
    """The network to mine or explain: ``model`` itself, or the ``net`` inside a
    LightningModule such as vebi's ClassifierModule (its loss and metrics are no layers)."""
    from lightning.pytorch import LightningModule

    if not isinstance(model, LightningModule):
        return model
    net = getattr(model, "net", None)
    if isinstance(net, nn.Module):
        return net
    raise VebiError(
        f"got a LightningModule ({type(model).__name__}) without a `net` attribute: pass the "
        "network inside it, the nn.Module that maps images to logits"
    )


@functools.cache
def _names_of(cls: type) -> frozenset[str]:
    return frozenset(f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__)


def class_names(module: nn.Module) -> frozenset[str]:
    """The qualified names (``package.module.Class``) of the module's class and its bases:
    how types of optional packages (timm, ...) are recognised without importing them."""
    return _names_of(type(module))  # type: ignore[arg-type]  # classes hash (mypy: Module)


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules without children, by qualified name (``""`` when ``model`` itself is a leaf)."""
    return {name: module for name, module in model.named_modules() if not any(module.children())}


def trace_leaf_calls(
    model: nn.Module, images: torch.Tensor, modules: dict[str, nn.Module] | None = None
) -> list[tuple[str, torch.Size]]:
    """Named leaf modules (or the given ``modules``) in the order their calls end on ``images``
    (each once, its last call kept), with the shape of their output."""
    order: dict[str, torch.Size] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                order.pop(name, None)
                order[name] = output.shape

        return hook

    with contextlib.ExitStack() as stack:
        for name, module in (leaf_modules(model) if modules is None else modules).items():
            if name:
                stack.callback(module.register_forward_hook(record(name)).remove)
        with torch.no_grad(), eval_mode(model):  # a traced forward changes no statistics
            model(images)
    return list(order.items())


def check_layer_names(model: nn.Module, layers: Sequence[str]) -> None:
    """Raise with the list of available names when a layer name is not a module of ``model``."""
    available = dict(model.named_modules())
    unknown = [name for name in layers if name not in available or not name]
    if unknown:
        names = ", ".join(name for name in available if name)
        raise VebiError(f"unknown layer(s) {unknown}; the model's layers are: {names}")
    if len(set(layers)) != len(layers):
        raise VebiError(f"layers listed twice in {list(layers)}")


#: Names of the layer types of vision transformers (token maps, not channel maps).
ModuleT = TypeVar("ModuleT", bound=nn.Module)

ATTENTION_TYPES = (nn.MultiheadAttention,)


def refuse_attention(model: nn.Module) -> None:
    """Refuse, before any work, a network with attention layers (ViT, Swin, MaxViT, ...):
    its layer outputs are token maps (N, T, D), not channel maps, and no backward rule here
    is stated for attention."""
    found = [
        (name, type(module).__name__)
        for name, module in model.named_modules()
        if isinstance(module, ATTENTION_TYPES) or type(module).__name__.endswith("Attention")
    ]
    if found:
        kinds = sorted({kind for _, kind in found})
        names = ", ".join(repr(name) for name, _ in found[:3])
        raise VebiError(
            f"the model has {len(found)} attention layer(s) ({', '.join(kinds)}, at {names}"
            f"{', ...' if len(found) > 3 else ''}): vebi mines and explains convolutional "
            "networks, whose layers output channel maps; a transformer's token maps are not "
            "such maps and no backward rule is stated here for attention. Use a CNN (e.g. "
            "resnet50, efficientnet_b0, convnext_tiny)"
        )


class CapturedOutputs(dict):
    """Layer name -> recorded output, and which of them the model went on to change in place."""

    def __init__(self) -> None:
        super().__init__()
        self._watched: dict[str, tuple[torch.Tensor, int]] = {}

    def watch(self, name: str, passed_on: torch.Tensor) -> None:
        self._watched[name] = (passed_on, tensor_version(passed_on))

    def modified_in_place(self) -> set[str]:
        """Layers whose output (the recorded tensor, or the copy the model went on with) was
        modified in place after it was recorded."""
        return {
            name for name, (t, version) in self._watched.items() if tensor_version(t) != version
        }


@contextlib.contextmanager
def capture_outputs(
    model: nn.Module, layers: Sequence[str], copy: bool | Collection[str] = True
) -> Iterator[CapturedOutputs]:
    """Record the output of each named module (its last call) during forward passes.

    The recorded tensor stays part of the autograd graph. For the layers in ``copy`` (all by
    default) the model continues with a copy, so that in-place operations downstream
    (``out += identity``) cannot change the recorded tensor; for the others it continues with
    the tensor itself (no copy). Either way ``modified_in_place()`` tells afterwards which
    outputs were changed in place: a caller that skipped a copy it needed can run again.
    """
    check_layer_names(model, layers)
    modules = dict(model.named_modules())
    captured = CapturedOutputs()

    def hook(name: str) -> Any:
        copied = copy is True or (copy is not False and name in copy)

        def record(module: nn.Module, inputs: Any, output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor):
                raise VebiError(f"layer {name} does not output a single tensor")
            captured[name] = output
            passed_on = output.clone() if copied else output
            captured.watch(name, passed_on)
            return passed_on

        return record

    with contextlib.ExitStack() as stack:
        for name in dict.fromkeys(layers):
            stack.callback(modules[name].register_forward_hook(hook(name)).remove)
        yield captured


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's own mode afterwards (a model
    in training with its BatchNorm layers frozen in eval comes back so, not all in training)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def to_device(model: ModuleT, device: torch.device | str) -> ModuleT:
    """``model`` on ``device``; on the CPU with its 4-D weights in channels-last (NHWC) order,
    in which oneDNN runs convolutions faster (SmallVGG at 112 px: 0.9 instead of 1.4 ms per
    image on 2 cores). Inputs may keep either layout: the outputs are the same up to float
    rounding."""
    model = model.to(device)
    if torch.device(device).type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model


@contextlib.contextmanager
def inference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Forward passes whose layer outputs nobody keeps (accuracy, ablation, deletion curves):
    eval mode, no autograd, and the ``nn.ReLU`` modules that follow another module inside an
    ``nn.Sequential`` work in place, as torchvision's do (their input is the previous module's
    fresh output, read by nothing else; SmallVGG at 112 px: 12% faster on the CPU). Forward
    hooks that keep a layer's output must not be active: a kept output may be overwritten."""
    switched = [
        child
        for parent in model.modules()
        if isinstance(parent, nn.Sequential)
        for position, child in enumerate(parent)
        if position > 0 and type(child) is nn.ReLU and not child.inplace
    ]
    with eval_mode(model), torch.no_grad():
        for child in switched:
            child.inplace = True
        try:
            yield model
        finally:
            for child in switched:
                child.inplace = False
