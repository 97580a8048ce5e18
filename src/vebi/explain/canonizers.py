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

import torch
from torch import nn

from vebi.errors import VebiError


def _class_names(module: nn.Module) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__}


class Canonizer:
    """Rewrites the modules it ``applies_to`` while an explanation runs."""

    def applies_to(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def apply(self, name: str, module: nn.Module) -> Callable[[], None]:
        """Change ``module`` (called ``name`` in the model); return the undo."""
        raise NotImplementedError

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
        return bool(_class_names(module) & self.gates.keys())

    def apply(self, name: str, module: nn.Module) -> Callable[[], None]:
        attribute = next(self.gates[n] for n in _class_names(module) if n in self.gates)
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


__all__ = ["SQUEEZE_EXCITATION_GATES", "Canonizer", "GateAsScale"]
