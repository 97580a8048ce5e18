"""Backward rules of the deconvnet family (docs/method.md, section 4), installed on autograd.

Each rule is a custom ``torch.autograd.Function`` whose forward is the layer's own and whose
backward is the rule's. :func:`backward_rules` swaps them into a model's modules for the
duration of a ``with`` block and restores every module exactly afterwards, even on error.

ReLU (``relu=``): for forward input x and backward signal g,
    ``gradient``  g * [x > 0];   ``deconvnet``  max(g, 0);   ``guided``  max(g, 0) * [x > 0].
Strided convolution (``conv=``), stride s > 1:
    ``standard``   the transposed convolution with stride s (autograd's gradient), which
                   scatters each value on a sparse grid: the source of checkerboard artefacts;
    ``stride_fix`` nearest-neighbour upsampling of g to the size the layer would have produced
                   with stride 1 (H_in + pad_top + pad_bottom - dilation * (kernel - 1) per axis),
                   then the stride-1 transposed convolution with the same weights and padding.
    Stride-1 convolutions always use the transposed convolution.
Max-pooling (``pool=``):
    ``standard``      autograd's gradient (overlapping windows sharing an arg-max add up);
    ``switch_unpool`` each value goes to its window's arg-max without adding (max_unpool2d
                      with the forward indices).
Everything else uses its gradient: Linear (transposed weights), BatchNorm (eval), average
pooling, LocalResponseNorm, Flatten, Dropout (identity in eval), residual additions. Biases are
never added on the way down. A module type outside this list is refused by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vebi.errors import VebiError
from vebi.models.hooks import leaf_modules
from vebi.models.normalize import Normalize

RELU_RULES = ("deconvnet", "guided", "gradient")
CONV_RULES = ("standard", "stride_fix")
POOL_RULES = ("standard", "switch_unpool")

#: Leaf modules whose gradient is the rule (or that have no effect on the way down).
GRADIENT_MODULES = (
    nn.Linear,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LocalResponseNorm,
    Normalize,
)


@dataclass(frozen=True)
class Rules:
    """A choice of backward rules; the defaults are the project's (guided, stride_fix, standard)."""

    relu: str = "guided"
    conv: str = "stride_fix"
    pool: str = "standard"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("relu", self.relu, RELU_RULES),
            ("conv", self.conv, CONV_RULES),
            ("pool", self.pool, POOL_RULES),
        ):
            if value not in allowed:
                raise VebiError(f"unknown {name} rule {value!r}; choose from {allowed}")


class _ReLURule(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rule: str) -> torch.Tensor:
        ctx.rule = rule
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        if ctx.rule == "gradient":
            return grad * (x > 0), None
        if ctx.rule == "deconvnet":
            return grad.clamp_min(0), None
        return grad.clamp_min(0) * (x > 0), None


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class _StrideFixConv2d(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.input_size = x.shape[-2:]
        ctx.padding, ctx.dilation, ctx.groups = padding, dilation, groups
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (weight,) = ctx.saved_tensors
        kernel = weight.shape[-2:]
        size = [
            ctx.input_size[axis] + 2 * ctx.padding[axis] - ctx.dilation[axis] * (kernel[axis] - 1)
            for axis in range(2)
        ]
        upsampled = F.interpolate(grad, size=size, mode="nearest")
        grad_x = F.conv_transpose2d(
            upsampled,
            weight,
            stride=1,
            padding=ctx.padding,
            dilation=ctx.dilation,
            groups=ctx.groups,
        )
        return grad_x, None, None, None, None, None, None


class _SwitchUnpool2d(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, kernel: Any, stride: Any, padding: Any, ceil_mode: bool
    ) -> torch.Tensor:
        out, indices = F.max_pool2d(x, kernel, stride, padding, 1, ceil_mode, return_indices=True)
        ctx.save_for_backward(indices)
        ctx.args = (kernel, stride, padding)
        ctx.input_size = x.shape[-2:]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (indices,) = ctx.saved_tensors
        kernel, stride, padding = ctx.args
        grad_x = F.max_unpool2d(grad, indices, kernel, stride, padding, output_size=ctx.input_size)
        return grad_x, None, None, None, None


def _rule_forward(module: nn.Module, rules: Rules) -> Any:
    """The replacement forward of ``module`` under ``rules``; None keeps its own forward."""
    if isinstance(module, nn.ReLU):
        return lambda x: _ReLURule.apply(x, rules.relu)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            if _pair(module.stride) != (1, 1) and rules.conv == "stride_fix":
                raise VebiError(f"stride_fix needs numeric zero padding ({module})")
            return None
        if _pair(module.stride) != (1, 1) and rules.conv == "stride_fix":
            return lambda x: _StrideFixConv2d.apply(
                x,
                module.weight,
                module.bias,
                _pair(module.stride),
                _pair(module.padding),
                _pair(module.dilation),
                module.groups,
            )
        return None
    if isinstance(module, nn.MaxPool2d):
        if rules.pool == "switch_unpool":
            if module.dilation not in (1, (1, 1)):
                raise VebiError(f"switch_unpool needs max-pooling without dilation ({module})")
            return lambda x: _SwitchUnpool2d.apply(
                x, module.kernel_size, module.stride, module.padding, module.ceil_mode
            )
        return None
    if isinstance(module, GRADIENT_MODULES):
        return None
    raise VebiError(
        f"no backward rule for {type(module).__name__} ({module}); supported: ReLU, Conv2d, "
        f"MaxPool2d and {', '.join(t.__name__ for t in GRADIENT_MODULES)}"
    )


@contextlib.contextmanager
def backward_rules(model: nn.Module, rules: Rules) -> Iterator[nn.Module]:
    """Install ``rules`` in ``model``'s leaf modules; restore them exactly on exit.

    ReLUs become out-of-place while installed (so in-place and re-used ReLUs work).
    """
    replacements = [
        (module, _rule_forward(module, rules)) for module in leaf_modules(model).values()
    ]
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for module, forward in replacements:
            if forward is not None:
                patched.append((module, module.__dict__.get("forward")))
                module.forward = forward
        yield model
    finally:
        for module, previous in reversed(patched):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
