"""Propagating a feature's activation down to the pixels under selectable backward rules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from vebi.errors import VebiError
from vebi.explain.rules import Rules, backward_rules
from vebi.mining.features import check_layer_names


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


def channel_signal(activation: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """The starting signal: each image's own channel map of ``activation``, other channels 0."""
    signal = torch.zeros_like(activation)
    rows = torch.arange(len(activation), device=activation.device)
    signal[rows, channels] = activation.detach()[rows, channels]
    return signal


def backprop_feature(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    channel: int | Sequence[int] | torch.Tensor,
    relu: str = "guided",
    conv: str = "stride_fix",
    pool: str = "standard",
) -> torch.Tensor:
    """Input-space signal of channel ``channel`` of ``layer`` for each image (METHOD.md sec. 4).

    Starts from the forward activation map of that channel (the whole map, other channels
    zero) and propagates it to the pixels with the chosen rules (see :mod:`vebi.explain.rules`).
    ``channel`` is one channel for all images or one per image. Returns a tensor shaped like
    ``images``. The model is used in eval mode and restored exactly.
    """
    channels = torch.as_tensor(channel, device=images.device).long().expand(len(images))
    rules = Rules(relu, conv, pool)
    was_training = model.training
    model.eval()
    try:
        with (
            backward_rules(model, rules),
            capture_outputs(model, [layer]) as outputs,
            torch.enable_grad(),
        ):
            inputs = images.detach().clone().requires_grad_(True)
            model(inputs)
            output = outputs[layer]
            activation = output[:, :, None, None] if output.ndim == 2 else output
            if not 0 <= int(channels.min()) <= int(channels.max()) < activation.shape[1]:
                raise VebiError(f"layer {layer} has {activation.shape[1]} channels, not {channel}")
            signal = channel_signal(activation, channels).view_as(output)
            (result,) = torch.autograd.grad(output, inputs, grad_outputs=signal)
    finally:
        model.train(was_training)
    return result
