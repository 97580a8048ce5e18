"""Model plumbing shared by mining, explanation and evaluation.

Everything here looks at a network through its modules and forward hooks, never through its
code: which leaf modules it has and in which order they run, whether layer names exist,
recording layer outputs during a forward pass, and switching to eval mode for a while.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from vebi.errors import VebiError


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules without children, by qualified name (``""`` when ``model`` itself is a leaf)."""
    return {name: module for name, module in model.named_modules() if not any(module.children())}


def trace_leaf_calls(model: nn.Module, images: torch.Tensor) -> list[tuple[str, torch.Size]]:
    """Named leaf modules in the order they run on ``images`` (each once, its last call kept),
    with the shape of their output."""
    order: dict[str, torch.Size] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                order.pop(name, None)
                order[name] = output.shape

        return hook

    with contextlib.ExitStack() as stack:
        for name, module in leaf_modules(model).items():
            if name:
                stack.callback(module.register_forward_hook(record(name)).remove)
        with torch.no_grad():
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


@contextlib.contextmanager
def capture_outputs(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of each named module (its last call) during forward passes.

    The recorded tensor stays part of the autograd graph; the model continues with a copy, so
    in-place operations downstream (``out += identity``) cannot change it.
    """
    check_layer_names(model, layers)
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: Any, output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor):
                raise VebiError(f"layer {name} does not output a single tensor")
            captured[name] = output
            return output.clone()

        return record

    with contextlib.ExitStack() as stack:
        for name in dict.fromkeys(layers):
            stack.callback(modules[name].register_forward_hook(hook(name)).remove)
        yield captured


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
