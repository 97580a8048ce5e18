"""Canonizers: temporary rewrites of a network so that the backward rules apply to it.

A canonizer is one small class: which modules it applies to (``applies_to``) and how it
changes one of them (``apply``, which returns the function that undoes the change exactly). The
composite of a :class:`vebi.explain.rules.Rules` lists its canonizers; ``backward_rules``
applies them for the duration of an explanation, after the checks and before the rules, and
undoes them on exit, even on error.

The rest of what a canonizer does in other toolkits needs no rewrite here: stochastic depth,
drop-path and dropout are identities in eval mode, ``Permute`` and channels-last layer norms
go by their gradient, padding modules are linear, an empty ``nn.Sequential`` is the identity,
a channel shuffle is a reshape, and a module called at several places gets its rule at every
call (see :mod:`vebi.explain.rules`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from vebi.errors import VebiError
from vebi.models.hooks import class_names


class Canonizer:
    """Rewrites the modules it ``applies_to`` while an explanation runs."""

    def applies_to(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def apply(self, name: str, module: nn.Module) -> Callable[[], None]:
        """Change ``module`` (called ``name`` in the model); return the undo."""
        raise NotImplementedError

    def apply_to_model(self, model: nn.Module) -> list[Callable[[], None]]:
        """Apply to every module of ``model`` it applies to; the undos, in order."""
        return [
            self.apply(name, module)
            for name, module in model.named_modules()
            if self.applies_to(module)
        ]

    def __repr__(self) -> str:
        return type(self).__name__ + "()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash(type(self))


#: Squeeze-excitation modules by qualified class name -> the attribute holding their gate
#: (the sigmoid-like module whose output scales the channels).
SQUEEZE_EXCITATION_GATES: dict[str, str] = {
    "torchvision.ops.misc.SqueezeExcitation": "scale_activation",
    "timm.models._efficientnet_blocks.SqueezeExcite": "gate",
    "timm.layers.squeeze_excite.SEModule": "gate",
    "timm.layers.squeeze_excite.EffectiveSEModule": "gate",
    "timm.layers.squeeze_excite.SqueezeExcite": "gate",
    "timm.models.ghostnet.SqueezeExcite": "gate",
}


class GateAsScale(Canonizer):
    """Squeeze-excitation: the block's output is s(x) * x, with s(x) one factor per channel
    computed from x's pooled values through a small MLP and a sigmoid-like gate. The signal
    goes through the product as through a fixed per-channel scale, g -> s(x) * g, and none
    of it into the gate branch (LRP's treatment of gates): the gate's output is detached.
    Used by the ``guided`` and ``deconvnet`` families; the ``gradient`` family keeps the full
    gradient, gate branch included.

    ``gates`` maps qualified class names to the attribute of their gate module
    (:data:`SQUEEZE_EXCITATION_GATES` by default).
    """

    def __init__(self, gates: Mapping[str, str] | None = None) -> None:
        self.gates = dict(SQUEEZE_EXCITATION_GATES if gates is None else gates)

    def applies_to(self, module: nn.Module) -> bool:
        return not class_names(module).isdisjoint(self.gates)

    def apply(self, name: str, module: nn.Module) -> Callable[[], None]:
        attribute = next(self.gates[n] for n in class_names(module) if n in self.gates)
        gate = getattr(module, attribute, None)
        if not isinstance(gate, nn.Module):
            raise VebiError(
                f"canonizer GateAsScale cannot apply to module {name!r} "
                f"({type(module).__name__}): it has no gate module {attribute!r}. Give its type "
                "a rule, or declare it to go by its gradient (rules.gradient_modules)"
            )

        def detach(gate: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
            return output.detach()

        return gate.register_forward_hook(detach).remove


class MergeBatchNorm(Canonizer):
    """A batch norm right after a convolution (the next leaf in registration order: in an
    ``nn.Sequential``, or ``convN``/``bnN`` as in torchvision's blocks; Zennit's
    ``SequentialMergeBatchNorm`` makes the same assumption) is folded into it, in eval mode:
    W' = W * gamma / sqrt(var + eps) per output channel, b' = (b - mean) * gamma /
    sqrt(var + eps) + beta, and the batch norm becomes the identity. The network computes the
    same outputs; rules that read the weights (LRP's z+) see the ones that act on the input.
    Undone exactly (the original tensors are put back)."""

    def applies_to(self, module: nn.Module) -> bool:
        return False  # pairs of modules: see apply_to_model

    def apply_to_model(self, model: nn.Module) -> list[Callable[[], None]]:
        leaves = [m for m in model.modules() if not any(m.children())]
        undos = []
        for conv, norm in zip(leaves, leaves[1:], strict=False):
            if (
                type(conv) is nn.Conv2d
                and type(norm) is nn.BatchNorm2d
                and norm.track_running_stats
                and not norm.training
                and conv.out_channels == norm.num_features
            ):
                undos.append(self._merge(conv, norm))
        return undos

    @staticmethod
    def _merge(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> Callable[[], None]:
        running_mean, running_var = norm.running_mean, norm.running_var
        assert running_mean is not None and running_var is not None  # track_running_stats
        saved: dict[str, Any] = {
            "weight": conv.weight.data,
            "bias": None if conv.bias is None else conv.bias.data,
            "norm": {
                k: getattr(norm, k).data for k in ("weight", "bias") if getattr(norm, k) is not None
            },
            "running": (norm.running_mean, norm.running_var, norm.eps),
        }
        with torch.no_grad():
            scale = torch.rsqrt(running_var + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight
            bias = conv.bias if conv.bias is not None else torch.zeros_like(running_mean)
            shift = (bias - running_mean) * scale
            if norm.bias is not None:
                shift = shift + norm.bias
            conv.weight.data = conv.weight.data * scale.view(-1, 1, 1, 1).to(conv.weight.dtype)
            if conv.bias is None:
                conv.bias = nn.Parameter(shift.detach().clone(), requires_grad=False)
            else:
                conv.bias.data = shift.detach().clone()
            if norm.weight is not None:
                norm.weight.data = torch.ones_like(norm.weight)
                norm.bias.data = torch.zeros_like(norm.bias)
            norm.running_mean = torch.zeros_like(running_mean)
            norm.running_var = torch.ones_like(running_var)
            norm.eps = 0.0

        def undo() -> None:
            conv.weight.data = saved["weight"]
            if saved["bias"] is None:
                del conv.bias
                conv.register_parameter("bias", None)
            else:
                assert conv.bias is not None  # the merge kept it
                conv.bias.data = saved["bias"]
            for key, value in saved["norm"].items():
                getattr(norm, key).data = value
            norm.running_mean, norm.running_var, norm.eps = saved["running"]

        return undo


__all__ = ["SQUEEZE_EXCITATION_GATES", "Canonizer", "GateAsScale", "MergeBatchNorm"]
