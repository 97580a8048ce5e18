"""Backward rules of the deconvnet family (docs/method.md, section 4), open for extension.

A **rule** is one small class: the module types it applies to and what the signal does on its
way down through such a module (its ``backward``); the module's output is its own. A
**composite** maps each module of a network to a rule: the first of its rules that applies,
else the module's own gradient for the layers listed in :data:`GRADIENT_MODULES`; any other
module type is refused by name. :func:`backward_rules` installs a composite for the duration of
a ``with`` block and restores every module exactly afterwards, even on error.

The rules vebi ships, for forward input x and backward signal g:

* ReLU (``relu=``): ``gradient`` g * [x > 0]; ``deconvnet`` max(g, 0); ``guided``
  max(g, 0) * [x > 0] (the project default).
* Strided convolution (``conv=``): ``standard`` is autograd's transposed convolution with
  stride s, which scatters each value on a sparse grid (the source of checkerboard
  artefacts); ``stride_fix`` (default) upsamples g (nearest neighbour) to the size the layer
  would produce with stride 1 (H_in + pad_top + pad_bottom - dilation * (kernel - 1) per axis),
  then applies the stride-1 transposed convolution with the same weights and padding.
  Stride-1 convolutions always use the transposed convolution.
* Max-pooling (``pool=``): ``standard`` (default) is autograd's gradient (overlapping windows
  sharing an arg-max add up); ``switch_unpool`` puts each value at its window's arg-max
  without adding (``max_unpool2d`` with the forward indices).
* :class:`ZPlusConv`, LRP's z+ rule for convolutions, the example of a rule added from outside
  the presets (README): R_in = x * W+^T (R / (W+ x + eps)) with W+ = max(W, 0).

Named presets (``Rules(preset=...)``): ``gradient``, ``deconvnet`` (Captum's Deconvolution),
``guided`` (Captum's GuidedBackprop), ``deconvnet_stride_fix`` and ``guided_stride_fix`` (the
project default); ``relu=``, ``conv=``, ``pool=`` override a preset's choice by name or with a
rule object, and ``extra=`` adds rules for other module types. Biases are never added on the
way down.

ReLUs applied functionally (``F.relu`` / ``torch.relu`` in a ``forward``) cannot take a rule:
with any ReLU rule but ``gradient`` installed, such a call stops the explanation with an error
naming the module, instead of silently explaining it by its gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from vebi.errors import VebiError
from vebi.models.hooks import leaf_modules
from vebi.models.normalize import Normalize

#: Leaf modules whose gradient is the rule (or that have no effect on the way down).
GRADIENT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    nn.MaxPool2d,
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
    nn.GroupNorm,
    nn.LayerNorm,
    nn.SiLU,
    nn.GELU,
    Normalize,
)


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class Rule:
    """A backward rule: for modules of ``module_types``, the output is the module's own and
    the signal ``grad`` on its output becomes ``backward(module, x, grad)`` on its input ``x``.

    Subclasses set ``module_types`` and write ``backward``; ``applies_to`` narrows the modules
    further (e.g. strided convolutions only), ``check`` refuses configurations the rule cannot
    handle, and ``output`` computes the module's output when its own forward would not do
    (e.g. an in-place ReLU: the rule needs the untouched input).
    """

    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()

    def applies_to(self, module: nn.Module) -> bool:
        return isinstance(module, self.module_types)

    def check(self, module: nn.Module) -> None:
        """Raise :class:`VebiError` when ``module`` is a configuration the rule cannot handle."""

    def output(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return type(module).forward(module, x)

    def backward(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__ + "()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash(type(self))


class _RuleFunction(torch.autograd.Function):
    """The module's own output forward, the rule's ``backward`` on the way down."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rule: Rule, module: nn.Module) -> torch.Tensor:
        ctx.rule, ctx.module = rule, module
        ctx.save_for_backward(x)
        return rule.output(module, x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, None, None]:
        (x,) = ctx.saved_tensors
        return ctx.rule.backward(ctx.module, x, grad), None, None


class ReLURule(Rule):
    """Base of the ReLU rules: out-of-place output (in-place and re-used ReLUs work)."""

    module_types = (nn.ReLU,)

    def output(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0)


def _pass_where_positive(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g * [x > 0] in one fused pass (autograd's own ReLU backward kernel; an order of
    magnitude faster than multiplying by a boolean mask)."""
    return torch.ops.aten.threshold_backward(grad, x, 0)


class GradientReLU(ReLURule):
    """g * [x > 0]: the ReLU's own gradient."""

    def backward(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return _pass_where_positive(grad, x)


class DeconvnetReLU(ReLURule):
    """max(g, 0): the deconvnet's ReLU (Zeiler & Fergus), blind to the forward input."""

    def backward(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp_min(0)


class GuidedReLU(ReLURule):
    """max(g, 0) * [x > 0]: guided backpropagation (Springenberg et al.)."""

    def backward(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return _pass_where_positive(grad, x).clamp_min_(0)


class StrideFixConv(Rule):
    """Strided convolutions: nearest-neighbour upsampling of g to the stride-1 output size,
    then the stride-1 transposed convolution with the layer's weights and padding.

    When the stride-1 size is exactly s times the output size (e.g. every strided layer of a
    ResNet at 224 px) and there is no dilation, the two steps are one transposed convolution
    with stride s and the kernel W convolved with an s x s box of ones: upsampling by
    repetition is itself a transposed convolution with that box, and two transposed
    convolutions compose into one. It gives the same signal (to float rounding) with
    (k + s - 1)^2 instead of s^2 k^2 multiplications per value: 2.25x fewer for k = 3, s = 2.
    """

    module_types = (nn.Conv2d,)

    def applies_to(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d) and _pair(module.stride) != (1, 1)

    def check(self, module: nn.Module) -> None:
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise VebiError(f"stride_fix needs numeric zero padding ({module})")

    def backward(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        kernel, padding, dilation = module.weight.shape[-2:], module.padding, module.dilation
        size = [
            x.shape[-2 + axis] + 2 * padding[axis] - dilation[axis] * (kernel[axis] - 1)
            for axis in range(2)
        ]
        stride = module.stride
        weight = module.weight.detach()
        exact = all(size[axis] == stride[axis] * grad.shape[-2 + axis] for axis in range(2))
        if exact and tuple(kernel) == (1, 1) and tuple(padding) == (0, 0):
            # a 1 x 1 convolution commutes with the upsampling: apply it at the low resolution
            low = F.conv_transpose2d(grad, weight, groups=module.groups)
            return low.repeat_interleave(stride[0], 2).repeat_interleave(stride[1], 3)
        if exact and tuple(dilation) == (1, 1):
            # W convolved with the s x s box: the sum of W shifted to every offset in the box
            merged = weight.new_zeros(
                *weight.shape[:2], *(k + s - 1 for k, s in zip(kernel, stride, strict=True))
            )
            for row in range(stride[0]):
                for column in range(stride[1]):
                    merged[..., row : row + kernel[0], column : column + kernel[1]] += weight
            return F.conv_transpose2d(
                grad, merged, stride=stride, padding=padding, groups=module.groups
            )
        upsampled = F.interpolate(grad, size=size, mode="nearest")
        return F.conv_transpose2d(
            upsampled,
            module.weight.detach(),
            stride=1,
            padding=padding,
            dilation=dilation,
            groups=module.groups,
        )


class SwitchUnpool(Rule):
    """Max-pooling: each value goes to its window's arg-max without adding (``max_unpool2d``
    with the forward's indices)."""

    module_types = (nn.MaxPool2d,)

    def check(self, module: nn.Module) -> None:
        if module.dilation not in (1, (1, 1)):
            raise VebiError(f"switch_unpool needs max-pooling without dilation ({module})")

    def backward(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        args = (module.kernel_size, module.stride, module.padding)
        _, indices = F.max_pool2d(x, *args, 1, module.ceil_mode, return_indices=True)
        return F.max_unpool2d(grad, indices, *args, output_size=x.shape[-2:])


class ZPlusConv(Rule):
    """LRP's z+ rule for convolutions (Montavon et al.): the signal R at the output is shared
    among the inputs in proportion to their positive contributions,
    R_in = x * W+^T (R / (W+ x + eps)) with W+ = max(W, 0). Meant for non-negative inputs
    (after a ReLU); the output is the convolution's own."""

    module_types = (nn.Conv2d,)

    def __init__(self, epsilon: float = 1e-9) -> None:
        self.epsilon = epsilon

    def check(self, module: nn.Module) -> None:
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise VebiError(f"the z+ rule needs numeric zero padding ({module})")

    def backward(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        weight = module.weight.detach().clamp_min(0)
        args = (module.stride, module.padding, module.dilation, module.groups)
        z = F.conv2d(x, weight, None, *args) + self.epsilon
        return x * torch.nn.grad.conv2d_input(x.shape, weight, grad / z, *args)


#: The rules selectable by name for each slot; ``None`` is the layer's own gradient.
NAMED_RULES: dict[str, dict[str, type[Rule] | None]] = {
    "relu": {"guided": GuidedReLU, "deconvnet": DeconvnetReLU, "gradient": GradientReLU},
    "conv": {"stride_fix": StrideFixConv, "standard": None},
    "pool": {"standard": None, "switch_unpool": SwitchUnpool},
    "extra": {},  # extra rules come as objects or configs, never by name
}
#: Named choices of (relu, conv, pool).
PRESETS: dict[str, dict[str, str]] = {
    "gradient": {"relu": "gradient", "conv": "standard", "pool": "standard"},
    "deconvnet": {"relu": "deconvnet", "conv": "standard", "pool": "standard"},
    "guided": {"relu": "guided", "conv": "standard", "pool": "standard"},
    "deconvnet_stride_fix": {"relu": "deconvnet", "conv": "stride_fix", "pool": "standard"},
    "guided_stride_fix": {"relu": "guided", "conv": "stride_fix", "pool": "standard"},
}
DEFAULT_PRESET = "guided_stride_fix"

RuleChoice = str | Rule


@dataclass(frozen=True)
class Composite:
    """Which rule each module gets: the first of ``rules`` that applies to it, else its own
    gradient when it is one of ``gradient_modules``; other module types are refused."""

    rules: tuple[Rule, ...]
    gradient_modules: tuple[type[nn.Module], ...] = GRADIENT_MODULES

    def rule_for(self, module: nn.Module) -> Rule | None:
        """The module's rule, or None for its own gradient."""
        for rule in self.rules:
            if rule.applies_to(module):
                rule.check(module)
                return rule
        if isinstance(module, self.gradient_modules):
            return None
        raise VebiError(self._unsupported([("", module)]))

    def rules_for(self, model: nn.Module) -> list[tuple[nn.Module, Rule | None]]:
        """(leaf module, its rule or None) for every leaf of ``model``; one error naming every
        module no rule covers."""
        chosen, missing = [], []
        for name, module in leaf_modules(model).items():
            try:
                chosen.append((module, self.rule_for(module)))
            except VebiError as error:
                if not str(error).startswith("no backward rule"):
                    raise
                missing.append((name, module))
        if missing:
            raise VebiError(self._unsupported(missing))
        return chosen

    def _unsupported(self, modules: list[tuple[str, nn.Module]]) -> str:
        types = {t.__name__ for rule in self.rules for t in rule.module_types}
        supported = sorted(types | {t.__name__ for t in self.gradient_modules})
        named = "; ".join(
            f"{type(module).__name__}{f' at {name!r}' if name else ''} ({module})"
            for name, module in modules
        )
        return (
            f"no backward rule for {named}; supported: {', '.join(supported)}. Add a rule for "
            "it (a vebi.explain.rules.Rule subclass, passed in rules.extra)"
        )

    @property
    def guards_functional_relu(self) -> bool:
        """Whether a functional ReLU would be explained wrongly (any ReLU rule but gradient)."""
        return any(isinstance(r, ReLURule) and not isinstance(r, GradientReLU) for r in self.rules)


def _choose(slot: str, choice: RuleChoice | Mapping[str, Any] | None) -> Rule | None:
    if isinstance(choice, Rule) or choice is None:
        return choice
    if isinstance(choice, Mapping):  # a rule's Hydra config: {_target_: ..., ...}
        from vebi.utils.instantiate import instantiate_checked

        return instantiate_checked(choice, Rule, f"rules.{slot}")
    named = NAMED_RULES[slot]
    if choice not in named:
        raise VebiError(f"unknown {slot} rule {choice!r}; choose from {tuple(named)}")
    rule_type = named[choice]
    return rule_type() if rule_type is not None else None


@dataclass(frozen=True)
class Rules:
    """A choice of backward rules: a preset, optionally with its relu/conv/pool rules replaced
    (by name or by a :class:`Rule`), plus ``extra`` rules for other module types.

    ``Rules()`` is the project default (``guided_stride_fix``); ``Rules(conv="standard")``
    keeps the preset's other choices. After construction ``relu``/``conv``/``pool`` hold the
    resolved choices.
    """

    relu: RuleChoice | None = None
    conv: RuleChoice | None = None
    pool: RuleChoice | None = None
    preset: str = DEFAULT_PRESET
    extra: tuple[Rule, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise VebiError(f"unknown rules preset {self.preset!r}; choose from {tuple(PRESETS)}")
        for slot in ("relu", "conv", "pool"):
            value = getattr(self, slot)
            if value is None:
                object.__setattr__(self, slot, PRESETS[self.preset][slot])
            else:
                _choose(slot, value)  # validates names early
        extra = tuple(_choose("extra", rule) for rule in self.extra)
        if any(rule is None for rule in extra):
            raise VebiError("rules.extra holds an empty entry")
        object.__setattr__(self, "extra", extra)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> Rules:
        """From a config node (``preset``, ``relu``/``conv``/``pool`` as names or rule configs
        with ``_target_``, ``extra`` as a list of rule configs); null entries are left out."""
        values = {k: v for k, v in dict(config or {}).items() if v is not None}
        if "extra" in values:
            values["extra"] = tuple(values["extra"])
        for slot in ("relu", "conv", "pool"):
            if isinstance(values.get(slot), Mapping):
                values[slot] = _choose(slot, values[slot])
        return cls(**values)

    def composite(self) -> Composite:
        chosen = [*self.extra, *(_choose(s, getattr(self, s)) for s in ("relu", "conv", "pool"))]
        return Composite(tuple(rule for rule in chosen if rule is not None))

    def choices(self) -> dict[str, str]:
        """The relu/conv/pool choices as names (rule objects as ``Class()``) and the extras."""
        chosen = {slot: str(getattr(self, slot)) for slot in ("relu", "conv", "pool")}
        return {**chosen, **({"extra": [repr(rule) for rule in self.extra]} if self.extra else {})}

    def describe(self) -> str:
        """``relu, conv, pool`` choices in words, for summaries."""
        return ", ".join(f"{slot} {value}" for slot, value in self.choices().items())


class _FunctionalReLUGuard(TorchFunctionMode):
    """Stops a forward pass that applies ReLU functionally, naming the module that does."""

    FUNCTIONS: ClassVar[set[Callable[..., Any]]] = {
        F.relu,
        F.relu_,
        torch.relu,
        torch.relu_,
        torch.Tensor.relu,
        torch.Tensor.relu_,
    }

    def __init__(self, running: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.running = running

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in self.FUNCTIONS:
            name, module = self.running[-1] if self.running else ("", None)
            where = f"module {name!r} ({type(module).__name__})" if name else "the model"
            raise VebiError(
                f"{where} applies ReLU functionally ({getattr(func, '__name__', func)}) in its "
                "forward: a backward rule can only be installed on nn.ReLU modules, and "
                "explaining it by its gradient would be silently wrong. Use nn.ReLU modules "
                "there, or the gradient rules (rules.preset=gradient)"
            )
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _functional_relu_guard(model: nn.Module) -> Iterator[None]:
    """While ``model`` runs forward (not during backward passes or anything else), refuse
    functional ReLUs; hooks keep the stack of running modules to name the culprit."""
    running: list[tuple[str, nn.Module]] = []
    guard = _FunctionalReLUGuard(running)

    def enter(name: str) -> Callable[..., None]:
        return lambda module, inputs: running.append((name, module))

    def leave(module: nn.Module, inputs: Any, output: Any) -> None:
        if running:
            running.pop()

    def start(module: nn.Module, inputs: Any) -> None:
        running.clear()
        guard.__enter__()

    def stop(module: nn.Module, inputs: Any, output: Any) -> None:
        guard.__exit__(None, None, None)

    with contextlib.ExitStack() as stack:
        for name, module in model.named_modules():
            if name:
                stack.callback(module.register_forward_pre_hook(enter(name)).remove)
                stack.callback(module.register_forward_hook(leave).remove)
        # the guard is on from the model's first to its last hook, after every other hook
        stack.callback(model.register_forward_pre_hook(start, prepend=True).remove)
        stack.callback(model.register_forward_hook(stop).remove)
        try:
            yield
        finally:
            if torch.overrides._get_current_function_mode() is guard:  # a forward that raised
                guard.__exit__(None, None, None)


def check_rule_coverage(
    model: nn.Module, rules: Rules | Composite | None = None, hint: str = ""
) -> None:
    """Refuse, naming every one, the modules of ``model`` that ``rules`` (default: the
    project's) cannot explain: called when a model first enters a job, before any work.
    ``hint`` is added to the message (e.g. how to run the job without explanations)."""
    rules = rules or Rules()
    try:
        (rules.composite() if isinstance(rules, Rules) else rules).rules_for(model)
    except VebiError as error:
        raise VebiError(f"{error}{hint}") from None


@contextlib.contextmanager
def backward_rules(model: nn.Module, rules: Rules | Composite | None = None) -> Iterator[nn.Module]:
    """Install ``rules`` (default: the project's) in ``model``'s leaf modules; restore them
    exactly on exit. ReLUs become out-of-place while installed (in-place and re-used ReLUs
    work); a functional ReLU in a forward is refused (module docstring)."""
    rules = rules or Rules()
    composite = rules.composite() if isinstance(rules, Rules) else rules
    chosen = composite.rules_for(model)
    patched: list[tuple[nn.Module, Any]] = []
    try:
        with contextlib.ExitStack() as guard:
            if composite.guards_functional_relu:
                guard.enter_context(_functional_relu_guard(model))
            for module, rule in chosen:
                if rule is not None:
                    patched.append((module, module.__dict__.get("forward")))
                    module.forward = _installed(rule, module)
            yield model
    finally:
        for module, previous in reversed(patched):
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def _installed(rule: Rule, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: _RuleFunction.apply(x, rule, module)


__all__: Sequence[str] = [
    "GRADIENT_MODULES",
    "PRESETS",
    "Composite",
    "DeconvnetReLU",
    "GradientReLU",
    "GuidedReLU",
    "ReLURule",
    "Rule",
    "Rules",
    "StrideFixConv",
    "SwitchUnpool",
    "ZPlusConv",
    "backward_rules",
    "check_rule_coverage",
]
