"""Propagating a feature's activation down to the pixels under selectable backward rules."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vebi.errors import VebiError
from vebi.explain.rules import Rules, backward_rules
from vebi.models.hooks import capture_outputs, eval_mode


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
    rules: Rules | None = None,
) -> torch.Tensor:
    """Input-space signal of channel ``channel`` of ``layer`` per image (docs/method.md, section 4).

    Starts from the forward activation map of that channel (the whole map, other channels
    zero) and propagates it to the pixels with ``rules`` (None: the project default,
    ``Rules()``; e.g. ``Rules(preset="deconvnet", conv="stride_fix")``, see
    :mod:`vebi.explain.rules`).
    ``channel`` is one channel for all images or one per image. Returns a tensor shaped like
    ``images``. The model is used in eval mode and restored exactly.
    """
    channels = torch.as_tensor(channel, device=images.device).long().expand(len(images))
    if rules is not None and not isinstance(rules, Rules):
        raise VebiError(
            f"rules must be a vebi.explain.rules.Rules (or None for the default), not "
            f"{type(rules).__name__}: e.g. rules=Rules(preset='deconvnet')"
        )
    rules = rules or Rules()
    with (
        eval_mode(model),
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
    return result
