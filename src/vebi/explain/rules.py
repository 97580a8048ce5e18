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
  the presets (README): R_in = x+ W+^T s + x- W-^T s, s = R / (W+ x+ + W- x- + eps sign),
  with x+- and W+- the positive and negative parts; :class:`ZBoxConv`, LRP's z^B rule for
  the first convolution, whose input lies in a box [L, H] (``layers=`` names it).

Named presets (``Rules(preset=...)``): ``gradient``, ``deconvnet`` (Captum's Deconvolution),
``guided`` (Captum's GuidedBackprop), ``deconvnet_stride_fix`` and ``guided_stride_fix`` (the
project default); ``relu=``, ``conv=``, ``pool=`` override a preset's choice by name or with a
rule object, and ``extra=`` adds rules for other module types. Biases are never added on the
way down.

Rules and presets are chosen by registered name: :func:`register_rule` (a decorator, after
Zennit's ``register_composite``) and :func:`register_preset` fill :data:`NAMED_RULES` and
:data:`PRESETS`, the shipped ones exactly as a user's. The entry points build one
:class:`Rules` from the ``rules`` config group (``configs/rules/``: ``rules=<preset>``,
``rules.conv=<name>``; ``rules.imports`` lists the modules to import first, where a user's
rules register) with :meth:`Rules.from_config`, and every function that propagates signals
(``backprop_feature``, ``Explainer``, the galleries, ``VebiExplanation``) takes that
``Rules``.

Every other elementwise activation (:data:`ACTIVATION_MODULES`: ReLU6, LeakyReLU, ELU, CELU,
SELU, PReLU, Hardtanh, Hardswish, Hardsigmoid, SiLU, GELU, Mish, Softplus, Sigmoid, Tanh) takes
the rule of the preset's *family* (:class:`ActivationRule`), with f'(x) its local slope:
``gradient`` g * f'(x); ``deconvnet`` max(g, 0); ``guided`` max(g, 0) * max(f'(x), 0). For a
ReLU these are exactly the three ReLU rules above.

Functional calls get the same rules as modules (:class:`_FunctionalRules`): while a forward
pass runs under the rules, ``F.relu``, ``torch.relu``, ``clamp(min=0)``, ``F.relu6``,
``F.hardtanh``, ``F.silu``, ``F.gelu``, ``torch.sigmoid``, ``torch.tanh``, ... (see
:data:`FUNCTIONAL_ACTIVATIONS`) take the activation's rule, a strided ``F.conv2d`` the conv
rule and ``F.max_pool2d`` the pool rule, as if they were modules. ``Conv2d`` and
``MaxPool2d`` subclasses that override ``forward`` (padding inside it, standardised weights)
are explained through the functional calls in their forward.

A leaf module of a type no rule covers is checked on its first call: when it is affine in its
input (a normalisation written as a module, ``torchvision.transforms.Normalize`` inside the
model, a reshape) its gradient is exact and is used; otherwise the explanation stops with a
message naming it. ``Rules(gradient_modules=[...])`` declares types to go by their gradient,
``Rules(activations=[...])`` types that take the activation rule.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
import torch.nn.grad  # conv2d_input (a submodule torch.nn does not declare)
from torch import nn
from torch.overrides import TorchFunctionMode

from vebi.errors import VebiError
from vebi.explain.canonizers import Canonizer, GateAsScale, MergeBatchNorm
from vebi.models.hooks import class_names, leaf_modules, refuse_attention
from vebi.models.normalize import Normalize
from vebi.utils.torch_api import current_function_mode

#: Leaf modules whose gradient is the rule: linear maps (an eval-mode normalisation is one),
#: shape-only modules, identities in eval mode (dropout, stochastic depth), padding, and the
#: default rules of max-pooling and convolutions.
ModuleTypes = tuple[type[nn.Module], ...]

GRADIENT_MODULES: ModuleTypes = (
    nn.Conv2d,
    nn.MaxPool2d,
    nn.Linear,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.SyncBatchNorm,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LocalResponseNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm2d,
    nn.ZeroPad2d,
    nn.ConstantPad2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
    nn.ChannelShuffle,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Upsample,
    nn.Sequential,  # a leaf Sequential is an empty one: the identity (ShuffleNet's branches)
    Normalize,
)
#: The same, for types of optional packages, by qualified class name (no import needed).
GRADIENT_MODULE_NAMES: frozenset[str] = frozenset(
    {
        "torchvision.ops.stochastic_depth.StochasticDepth",
        "torchvision.ops.misc.Permute",
        "torchvision.transforms.transforms.Normalize",
        "timm.layers.drop.DropPath",
        "timm.layers.drop.DropBlock2d",
        "timm.layers.linear.Linear",
        "timm.layers.norm.LayerNorm2d",
        "timm.layers.norm.GroupNorm1",
        "timm.layers.std_conv.ScaledStdConv2d",
        "timm.layers.layer_scale.LayerScale2d",
        "timm.layers.layer_scale.LayerScale",
    }
)
#: Elementwise activations other than ReLU: each takes the activation rule of the preset's
#: family (:class:`ActivationRule`).
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.PReLU,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.SiLU,
    nn.GELU,
    nn.Mish,
    nn.Softplus,
    nn.Sigmoid,
    nn.Tanh,
)
#: The same, by qualified class name (timm's own activation modules).
ACTIVATION_MODULE_NAMES: frozenset[str] = frozenset(
    f"timm.layers.activations.{name}"
    for name in (
        "Swish",
        "Mish",
        "Sigmoid",
        "Tanh",
        "HardSwish",
        "HardSigmoid",
        "HardMish",
        "GELU",
        "GELUTanh",
        "QuickGELU",
        "PReLU",
    )
) | frozenset(
    f"timm.layers.activations_me.{name}"
    for name in ("SwishMe", "MishMe", "HardSwishMe", "HardSigmoidMe", "HardMishMe")
)
#: The families of rules: what every activation does under a preset.
FAMILIES = ("guided", "deconvnet", "gradient")


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_a(module: nn.Module, types: tuple[type, ...], names: frozenset[str]) -> bool:
    """``isinstance(module, types)``, or one of the classes it derives from is named in
    ``names``."""
    return isinstance(module, types) or not names.isdisjoint(class_names(module))


def resolve_module_type(spec: str | type) -> type[nn.Module]:
    """A module type from itself or its qualified name (``package.module.Class``)."""
    if isinstance(spec, type):
        cls = spec
    else:
        import importlib

        module_name, _, class_name = str(spec).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as error:
            raise VebiError(
                f"cannot import the module type {spec!r} ({error}); give its qualified name, "
                "e.g. mypackage.layers.MyNorm"
            ) from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise VebiError(f"{spec!r} is not an nn.Module subclass")
    return cls


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
    #: canonizers the rule needs while it is installed (e.g. z+: batch norms folded)
    canonizers: ClassVar[tuple[type[Canonizer], ...]] = ()

    def applies_to(self, module: nn.Module) -> bool:
        return isinstance(module, self.module_types)

    def selects(self, name: str | None) -> bool:
        """Whether the rule is for the module of this qualified name in the model (None: a
        functional call, or no name known); rules limited to named layers narrow it."""
        return True

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


def _own_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's own output, never overwriting ``x`` (in-place activations work on a copy:
    the rule needs the untouched input)."""
    if getattr(module, "inplace", False):
        x = x.clone()
    return type(module).forward(module, x)


def _vector_jacobian(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad^T d module(x) / dx, by autograd on a detached copy of ``x``."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        (result,) = torch.autograd.grad(_own_output(module, leaf), leaf, grad)
    return result


class ActivationRule(Rule):
    """Elementwise activations f other than ReLU (:data:`ACTIVATION_MODULES`), by the
    preset's family, with f'(x) the local slope at the forward input x:

    * ``gradient``: g * f'(x) (the gradient);
    * ``deconvnet``: max(g, 0), blind to x as the deconvnet's ReLU is;
    * ``guided``: max(g, 0) * max(f'(x), 0): the positive part of the signal, where the
      activation passes signal forward, scaled by how much it passes.

    For f = ReLU each is the corresponding ReLU rule. ``extra_types`` adds module types (or
    qualified names) to the ones covered.
    """

    module_types = ACTIVATION_MODULES

    def __init__(self, family: str = "guided", extra_types: Sequence[str | type] = ()) -> None:
        if family not in FAMILIES:
            raise VebiError(f"unknown activation rule family {family!r}; choose from {FAMILIES}")
        self.family = family
        self.extra_types = tuple(resolve_module_type(t) for t in extra_types)

    def applies_to(self, module: nn.Module) -> bool:
        return _is_a(module, (*self.module_types, *self.extra_types), ACTIVATION_MODULE_NAMES)

    def output(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _own_output(module, x)

    def backward(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        if self.family == "deconvnet":
            return grad.clamp_min(0)
        if self.family == "gradient":
            return _vector_jacobian(module, x, grad)
        slope = _vector_jacobian(module, x, torch.ones_like(grad))  # elementwise: f'(x)
        return grad.clamp_min(0) * slope.clamp_min_(0)

    def __repr__(self) -> str:
        return f"ActivationRule({self.family!r})"

    def __hash__(self) -> int:
        return hash((type(self), self.family))


class NotAffineError(VebiError):
    """A module of a type without a rule turned out not to be affine in its input."""


class AffineByGradient(Rule):
    """Leaf modules of types no rule covers: on the first call of each, check on its actual
    input x that it is affine in it, f(x + 2d) - 2 f(x + d) + f(x) = 0 for a random d of x's
    scale (to float rounding); then its gradient is the exact linear map and is the rule. A
    module that is not affine stops the explanation with :class:`NotAffineError`."""

    #: relative size of the second difference accepted as float rounding
    tolerance = 1e-4

    def __init__(self, names: Mapping[int, str] | None = None) -> None:
        self.names = dict(names or {})
        self.checked: set[int] = set()

    def applies_to(self, module: nn.Module) -> bool:
        return True

    def output(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        output = _own_output(module, x)
        if id(module) not in self.checked:
            self._check_affine(module, x, output)
            self.checked.add(id(module))
        return output

    def _check_affine(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> None:
        generator = torch.Generator(device=x.device).manual_seed(0)
        scale = float(x.detach().float().std()) if x.numel() > 1 else 1.0
        step = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        step = step * (scale if scale > 0 else 1.0)
        once, twice = _own_output(module, x + step), _own_output(module, x + 2 * step)
        curvature = (twice - 2 * once + output).abs().max()
        size = max(float(t.abs().max()) for t in (output, once, twice))
        if not bool(torch.isfinite(curvature)) or float(curvature) > self.tolerance * (size + 1):
            cls = type(module)
            name = self.names.get(id(module), "")
            raise NotAffineError(
                f"module {name!r} ({cls.__name__}) has no backward rule and is not affine in "
                "its input, so its gradient would not be a rule: give its type a rule "
                "(rules.extra), declare it an activation (rules.activations="
                f"[{qualified_name(cls)}]) or, to explain it by its gradient anyway, "
                f"rules.gradient_modules=[{qualified_name(cls)}]"
            )

    def backward(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return _vector_jacobian(module, x, grad)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


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
        module = cast(nn.Conv2d, module)  # module_types
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise VebiError(f"stride_fix needs numeric zero padding ({module})")

    def backward(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        module = cast(nn.Conv2d, module)  # module_types; numeric padding (check)
        padding = cast(tuple[int, int], module.padding)
        kernel, dilation = module.weight.shape[-2:], module.dilation
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
        module = cast(nn.MaxPool2d, module)  # module_types
        args = (module.kernel_size, module.stride, module.padding)
        _, indices = F.max_pool2d(x, *args, 1, module.ceil_mode, return_indices=True)
        return F.max_unpool2d(grad, indices, *args, output_size=x.shape[-2:])  # type: ignore[arg-type]  # ints allowed


def _stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """z + epsilon * sign(z) with sign(0) = 1 (Zennit's ``stabilize``): every denominator moves
    away from zero and keeps its sign."""
    return z + epsilon * ((z == 0).to(z) + z.sign())


def _conv_options(module: nn.Module) -> tuple[Any, Any, Any, int]:
    module = cast(nn.Conv2d, module)  # the convolution rules' modules
    return module.stride, module.padding, module.dilation, module.groups


def _check_zero_padding(module: nn.Module, rule: str) -> None:
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise VebiError(f"the {rule} rule needs numeric zero padding ({module})")


class ZPlusConv(Rule):
    """LRP's z+ rule for convolutions (Montavon et al.; Zennit's ``ZPlus``): the signal R at the
    output is shared among the inputs in proportion to their positive contributions
    x_i w_ij > 0, which are x+ W+ and x- W- (x+ = max(x, 0), x- = min(x, 0), W+ = max(W, 0),
    W- = min(W, 0)):

        z = conv(x+, W+) + conv(x-, W-),    s = R / (z + eps * sign(z))  (sign(0) = 1),
        R_in = x+ * conv^T(W+, s) + x- * conv^T(W-, s).

    On inputs >= 0 (after a ReLU) this is R_in = x * conv^T(W+, R / (conv(x, W+) + eps)). Every
    output's R is shared out whole (sum R_in = sum R z / (z + eps)), except where z = 0 (no
    positive contribution, R lost). ``bias=False`` (default) leaves the bias out of z, as
    vebi's rules do on the way down; ``bias=True`` adds max(b, 0) to z as Zennit's ``ZPlus``
    does by default (the share the positive bias takes is lost). The output is the
    convolution's own. A batch norm right after the convolution is folded into it while the
    rule is installed (:class:`MergeBatchNorm`), so that W+ and W- are the weights that act on
    the input. For the first convolution, whose input is bounded pixels, see :class:`ZBoxConv`.
    """

    module_types = (nn.Conv2d,)
    canonizers = (MergeBatchNorm,)

    def __init__(self, epsilon: float = 1e-9, bias: bool = False) -> None:
        self.epsilon = float(epsilon)
        self.bias = bool(bias)

    def check(self, module: nn.Module) -> None:
        _check_zero_padding(module, "z+")

    def backward(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        options = _conv_options(module)
        module = cast(nn.Conv2d, module)  # module_types
        weight = module.weight.detach()
        positive, x_positive = weight.clamp_min(0), x.clamp_min(0)
        bias = module.bias.detach().clamp_min(0) if self.bias and module.bias is not None else None
        z = F.conv2d(x_positive, positive, bias, *options)
        has_negative = bool((x < 0).any())  # never after a ReLU: skip the x- W- half then
        if has_negative:
            negative, x_negative = weight.clamp_max(0), x.clamp_max(0)
            z = z + F.conv2d(x_negative, negative, None, *options)
        s = grad / _stabilize(z, self.epsilon)
        relevance = x_positive * torch.nn.grad.conv2d_input(x.shape, positive, s, *options)
        if has_negative:
            relevance += x_negative * torch.nn.grad.conv2d_input(x.shape, negative, s, *options)
        return relevance

    def __repr__(self) -> str:
        return "ZPlusConv(bias=True)" if self.bias else "ZPlusConv()"


Bound = float | tuple[float, ...]


def _as_bound(value: Any, what: str) -> Bound:
    """A number, or per-channel numbers (a list, a config list, a tensor), as floats."""
    if isinstance(value, torch.Tensor):
        value = value.detach().flatten().tolist()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        if isinstance(value, str | bytes | bool):
            raise TypeError
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise VebiError(
            f"ZBoxConv: {what} must be a number or one per channel, got {value!r}"
        ) from None
    if not values:
        raise VebiError(f"ZBoxConv: {what} is empty")
    return _collapsed(values)


def _collapsed(values: Sequence[float]) -> Bound:
    """One number for one value, else the tuple of them."""
    return float(values[0]) if len(values) == 1 else tuple(values)


def _per_channel(value: Bound) -> tuple[float, ...]:
    return value if isinstance(value, tuple) else (value,)


def _broadcast(what: str, *bounds: Bound) -> list[tuple[float, ...]]:
    """The bounds as tuples of one common length (a single number repeated)."""
    tuples = [_per_channel(b) for b in bounds]
    channels = max(len(t) for t in tuples)
    if any(len(t) not in (1, channels) for t in tuples):
        raise VebiError(f"ZBoxConv: {what} differ in length ({', '.join(map(str, tuples))})")
    return [t * channels if len(t) == 1 else t for t in tuples]


class ZBoxConv(Rule):
    """LRP's z^B rule (Montavon et al., deep Taylor decomposition; Zennit's ``ZBox``) for the
    first convolution, whose input x lies in a box L <= x <= H (L, H: numbers or one per
    channel), with W+ = max(W, 0), W- = min(W, 0):

        z = conv(x, W) - conv(L, W+) - conv(H, W-),    s = R / (z + eps * sign(z)),
        R_in = x * conv^T(W, s) - L * conv^T(W+, s) - H * conv^T(W-, s).

    Every contribution x_i w_ij - L_i w+_ij - H_i w-_ij is >= 0 inside the box, so positive R
    gives positive R_in, shared out whole (sum R_in = sum R z / (z + eps)). The bias is left
    out: Zennit keeps b, max(b, 0) and min(b, 0) in the three terms, which cancel.

    For pixels in [0, 1] seen through the model's ``Normalize(mean, std)``, give ``mean`` and
    ``std`` (or use :meth:`for_normalized_pixels`): ``low`` and ``high`` are then the pixel
    bounds and the rule's are (low - mean) / std and (high - mean) / std per channel.

    ``layers`` limits the rule to modules of these qualified names in the model (``fnmatch``
    patterns, ``*`` also matching dots), e.g. ``["net.features.0"]``: put it in ``extra``,
    before a z+ rule for the other convolutions. Without ``layers`` it applies to every
    ``nn.Conv2d`` leaf it is offered; with them, never to functional ``F.conv2d`` calls. A
    batch norm right after the convolution is folded into it (:class:`MergeBatchNorm`).
    """

    module_types = (nn.Conv2d,)
    canonizers = (MergeBatchNorm,)

    def __init__(
        self,
        low: Any = 0.0,
        high: Any = 1.0,
        layers: Sequence[str] | None = None,
        epsilon: float = 1e-9,
        mean: Any = None,
        std: Any = None,
    ) -> None:
        low, high = _as_bound(low, "low"), _as_bound(high, "high")
        if (mean is None) != (std is None):
            raise VebiError("ZBoxConv: give both mean and std (the model's Normalize), or neither")
        if mean is not None:
            mean, std = _as_bound(mean, "mean"), _as_bound(std, "std")
            lows, highs, means, stds = _broadcast("low, high, mean and std", low, high, mean, std)
            if any(s <= 0 for s in stds):
                raise VebiError(f"ZBoxConv: std must be > 0, got {std}")
            low = _collapsed([(v - m) / s for v, m, s in zip(lows, means, stds, strict=True)])
            high = _collapsed([(v - m) / s for v, m, s in zip(highs, means, stds, strict=True)])
        lows, highs = _broadcast("low and high", low, high)
        if any(a > b for a, b in zip(lows, highs, strict=True)):
            raise VebiError(f"ZBoxConv: low must not exceed high ({low}, {high})")
        if isinstance(layers, str):
            layers = [layers]
        self.low, self.high = low, high
        self.layers = None if layers is None else tuple(str(name) for name in layers)
        self.epsilon = float(epsilon)

    @classmethod
    def for_normalized_pixels(
        cls,
        mean: Sequence[float],
        std: Sequence[float],
        layers: Sequence[str] | None = None,
        epsilon: float = 1e-9,
    ) -> ZBoxConv:
        """The rule for pixels in [0, 1] after ``Normalize(mean, std)``: low = (0 - mean) / std,
        high = (1 - mean) / std per channel (in a config: ``mean:`` and ``std:`` entries)."""
        return cls(0.0, 1.0, layers=layers, epsilon=epsilon, mean=mean, std=std)

    def applies_to(self, module: nn.Module) -> bool:
        if self.layers is not None and isinstance(module, _ConvCall):
            return False  # a functional call has no name to match
        return isinstance(module, self.module_types)

    def selects(self, name: str | None) -> bool:
        if self.layers is None:
            return True
        import fnmatch

        return name is not None and any(fnmatch.fnmatchcase(name, p) for p in self.layers)

    def check(self, module: nn.Module) -> None:
        _check_zero_padding(module, "z^B")
        module = cast(nn.Conv2d, module)  # module_types
        channels = module.weight.shape[1] * module.groups
        for what, bound in (("low", self.low), ("high", self.high)):
            if len(_per_channel(bound)) not in (1, channels):
                raise VebiError(
                    f"ZBoxConv: {what} has {len(_per_channel(bound))} values, but the "
                    f"convolution takes {channels} channels ({module})"
                )

    def _bound(self, bound: Bound, x: torch.Tensor) -> torch.Tensor:
        values = torch.tensor(_per_channel(bound), dtype=x.dtype, device=x.device)
        return values.view(1, -1, *(1,) * (x.ndim - 2)).expand_as(x)

    def backward(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        options = _conv_options(module)
        module = cast(nn.Conv2d, module)  # module_types
        weight = module.weight.detach()
        positive, negative = weight.clamp_min(0), weight.clamp_max(0)
        low, high = self._bound(self.low, x), self._bound(self.high, x)
        z = (
            F.conv2d(x, weight, None, *options)
            - F.conv2d(low, positive, None, *options)
            - F.conv2d(high, negative, None, *options)
        )
        s = grad / _stabilize(z, self.epsilon)

        def spread(w: torch.Tensor) -> torch.Tensor:
            return torch.nn.grad.conv2d_input(x.shape, w, s, *options)

        return x * spread(weight) - low * spread(positive) - high * spread(negative)

    def __repr__(self) -> str:
        def shown(bound: Bound) -> str:
            return ", ".join(f"{v:.4g}" for v in _per_channel(bound))

        layers = f", layers={list(self.layers)}" if self.layers is not None else ""
        return f"ZBoxConv(low=[{shown(self.low)}], high=[{shown(self.high)}]{layers})"


@dataclass(frozen=True)
class Composite:
    """Which rule each module gets: the first of ``rules`` that applies to it, else its own
    gradient when it is one of ``gradient_modules`` (or named in ``gradient_names``); a
    parameter-free leaf of another type goes by its gradient once checked affine
    (:class:`AffineByGradient`, unless ``family`` is ``gradient``: then every module goes by
    its gradient); other module types are refused. ``functional`` holds the rules of
    functional calls by kind (``relu``, ``activation``, ``conv``, ``pool``), ``canonizers``
    the rewrites applied while the rules are installed."""

    rules: tuple[Rule, ...]
    gradient_modules: tuple[type[nn.Module], ...] = GRADIENT_MODULES
    gradient_names: frozenset[str] = GRADIENT_MODULE_NAMES
    family: str = "guided"
    functional: Mapping[str, Rule] = field(default_factory=dict)
    canonizers: tuple[Canonizer, ...] = ()

    def rule_for(
        self, module: nn.Module, affine: Rule | None = None, name: str | None = None
    ) -> Rule | None:
        """The module's rule, or None for its own gradient; ``affine`` is the rule for
        parameter-free modules of unknown types (refused when None), ``name`` the module's
        qualified name in the model (for rules limited to named layers)."""
        for rule in self.rules:
            if rule.applies_to(module) and rule.selects(name):
                if _explained_functionally(module):
                    return None  # its forward's functional calls take the rules
                rule.check(module)
                return rule
        if self.family == "gradient" or _is_a(module, self.gradient_modules, self.gradient_names):
            return None
        if affine is not None and not any(True for _ in module.parameters()):
            return affine
        raise VebiError(self._unsupported([("", module)]))

    def rules_for(self, model: nn.Module) -> list[tuple[nn.Module, Rule | None]]:
        """(leaf module, its rule or None) for every leaf of ``model``; one error naming every
        module type no rule covers."""
        refuse_attention(model)
        leaves = leaf_modules(model)
        affine = AffineByGradient({id(m): n for n, m in leaves.items()})
        chosen, missing = [], []
        for name, module in leaves.items():
            try:
                chosen.append((module, self.rule_for(module, affine, name)))
            except VebiError as error:
                if not str(error).startswith("no backward rule"):
                    raise
                missing.append((name, module))
        if missing:
            raise VebiError(self._unsupported(missing))
        return chosen

    def _unsupported(self, modules: list[tuple[str, nn.Module]]) -> str:
        by_type: dict[type, list[str]] = {}
        for name, module in modules:
            by_type.setdefault(type(module), []).append(name)
        lines = []
        for cls, names in by_type.items():
            shown = ", ".join(repr(n) for n in names[:3] if n) + (", ..." if len(names) > 3 else "")
            where = f" at {shown}" if shown else ""
            count = f"{len(names)} module{'s' if len(names) > 1 else ''}"
            lines.append(f"  {cls.__name__} ({qualified_name(cls)}): {count}{where}")
        example = qualified_name(next(iter(by_type)))
        return (
            f"no backward rule for {len(by_type)} module type(s) with parameters:\n"
            + "\n".join(lines)
            + "\nGive each a rule (a vebi.explain.rules.Rule subclass, in rules.extra), or "
            f"declare the ones that are linear in their input: rules.gradient_modules=[{example}]"
        )


def _explained_functionally(module: nn.Module) -> bool:
    """Conv2d / MaxPool2d subclasses with a forward of their own (padding inside it,
    standardised weights): their ``F.conv2d`` / ``F.max_pool2d`` calls take the rules."""
    for base in (nn.Conv2d, nn.MaxPool2d):
        if isinstance(module, base) and type(module).forward is not base.forward:
            return True
    return False


def _choose(slot: str, choice: RuleChoice | Mapping[str, Any] | None) -> Rule | None:
    """The rule of one slot from a :class:`Rule`, a rule's Hydra config or a registered name
    (None: the layer's own gradient)."""
    if isinstance(choice, Rule) or choice is None:
        return choice
    if isinstance(choice, Mapping):  # a rule's Hydra config: {_target_: ..., ...}
        from vebi.utils.instantiate import instantiate_checked

        return instantiate_checked(choice, Rule, f"rules.{slot}")
    # extra rules: a name of any slot (the extra slot's first)
    searched = [slot] if slot != "extra" else list(SLOTS[::-1])
    found = next((NAMED_RULES[s] for s in searched if choice in NAMED_RULES[s]), None)
    if not isinstance(choice, str) or found is None:
        registered = sorted({n for s in searched for n in NAMED_RULES[s]})
        raise VebiError(
            f"unknown {slot} rule {choice!r}; the registered {slot} rules are "
            f"{', '.join(registered) or 'none'} (or give a rule's config with _target_); "
            + _HOW_TO_REGISTER.format(what="register_rule")
        )
    factory = found[choice]
    if factory is None:
        return None
    rule = factory()
    if not isinstance(rule, Rule):
        raise VebiError(
            f"the {slot} rule {choice!r} registered {factory!r}, which made {rule!r}, not a Rule"
        )
    return rule


#: The rule slots of :class:`Rules`: the ReLU, strided-convolution and max-pooling choices, and
#: the ``extra`` rules tried first (any registered name may go there).
SLOTS = ("relu", "conv", "pool", "extra")
#: A registered rule: a :class:`Rule` class or a callable that returns a rule (called without
#: arguments each time rules are built); ``None`` is the layer's own gradient.
RuleFactory = Callable[[], Rule] | None
#: The registry of named rules, per slot (:func:`register_rule`): name -> factory.
NAMED_RULES: dict[str, dict[str, RuleFactory]] = {slot: {} for slot in SLOTS}
#: The registry of named presets (:func:`register_preset`): name -> its relu/conv/pool choices
#: (rule names of those slots) and ``family``, what every other activation does.
PRESETS: dict[str, dict[str, Any]] = {}
DEFAULT_PRESET = "guided_stride_fix"

RuleChoice = str | Rule

#: The module type whose rule each slot chooses (a rule registered without a slot goes to the
#: first whose type it covers, else to ``extra``).
_SLOT_TYPES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "conv": nn.Conv2d,
    "pool": nn.MaxPool2d,
}
_HOW_TO_REGISTER = (
    "register your own with vebi.explain.rules.{what} in a module of yours and import it with "
    "rules.imports=[<that module>]"
)


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name or any(c.isspace() or c in "=,[]{}" for c in name):
        raise VebiError(
            f"a {what} name must be a non-empty word (no spaces, = , [ ] {{ }}): {name!r}"
        )
    return name


def _same_factory(old: Any, new: Any) -> bool:
    """The same rule registered again (also a module imported twice: the same qualified name)."""
    if old is new:
        return True
    named = getattr(old, "__qualname__", None), getattr(old, "__module__", None)
    if named[0] is None or named[1] is None or "<" in named[0]:  # lambdas, local classes
        return False
    return named == (
        getattr(new, "__qualname__", None),
        getattr(new, "__module__", None),
    )


def _slot_of(factory: Any) -> str:
    if isinstance(factory, type) and issubclass(factory, Rule):
        for slot, module_type in _SLOT_TYPES.items():
            if issubclass(module_type, factory.module_types):
                return slot
        return "extra"
    raise VebiError(
        f"register_rule: give the slot ({', '.join(SLOTS)}) of {factory!r}: only a Rule class "
        "tells it by its module_types"
    )


def register_rule(
    name: str, slot: str | None = None, *, replace: bool = False
) -> Callable[[Any], Any]:
    """Register a rule under ``name``, selectable by that name in configs and ``Rules``
    (``rules.conv=<name>``), like the shipped ones; a decorator (Zennit's
    ``register_composite`` is the pattern)::

        @register_rule("my_conv")            # slot "conv": the class's module_types has Conv2d
        class MyConv(Rule): ...

        register_rule("zplus_eps", "conv")(lambda: ZPlusConv(epsilon=1e-6))  # a factory

    ``slot`` is ``relu``, ``conv``, ``pool`` or ``extra``; without it a :class:`Rule` class goes
    to the slot of the module type it covers (ReLU, Conv2d, MaxPool2d), else to ``extra``
    (names of any slot can be listed in ``rules.extra``). The factory is called without
    arguments whenever rules are built. Registering another rule under a taken name is an
    error unless ``replace``; the same class again (its module imported twice) is accepted.
    """
    _check_name(name, "rule")
    if slot is not None and slot not in SLOTS:
        raise VebiError(f"register_rule: unknown slot {slot!r}; choose from {SLOTS}")

    def register(factory: Any) -> Any:
        if factory is not None and not callable(factory):
            raise VebiError(f"register_rule({name!r}): {factory!r} is not a Rule class or factory")
        chosen = slot or _slot_of(factory)
        known = NAMED_RULES[chosen]
        if name in known and not replace and not _same_factory(known[name], factory):
            raise VebiError(
                f"a {chosen} rule named {name!r} is registered already ({known[name]!r}); "
                "choose another name, or replace=True"
            )
        known[name] = factory
        return factory

    return register


def register_preset(
    name: str,
    relu: RuleChoice,
    conv: RuleChoice = "standard",
    pool: RuleChoice = "standard",
    family: str | None = None,
    *,
    replace: bool = False,
) -> None:
    """Register a preset under ``name`` (``Rules(preset=name)``, ``rules.preset=<name>``): its
    relu/conv/pool choices (registered names of those slots, or rule objects) and the
    ``family`` (guided, deconvnet or gradient) every other activation takes, by default the
    ReLU choice when it is one of them. The choices must be registered first."""
    _check_name(name, "preset")
    for slot, choice in (("relu", relu), ("conv", conv), ("pool", pool)):
        _choose(slot, choice)  # registered names only
    if family is None and isinstance(relu, str) and relu in FAMILIES:
        family = relu
    if family not in FAMILIES:
        raise VebiError(
            f"register_preset({name!r}): give family= (one of {FAMILIES}), what every "
            "activation other than ReLU does under it"
        )
    entry = {"relu": relu, "conv": conv, "pool": pool, "family": family}
    if name in PRESETS and not replace and PRESETS[name] != entry:
        raise VebiError(
            f"a preset named {name!r} is registered already ({PRESETS[name]}); choose another "
            "name, or replace=True"
        )
    PRESETS[name] = entry


def import_rule_modules(modules: Sequence[str]) -> None:
    """Import the modules of ``rules.imports`` (dotted names), whose import registers the
    user's rules and presets."""
    import importlib

    if isinstance(modules, str):
        modules = [modules]
    for module in modules:
        try:
            importlib.import_module(str(module))
        except ImportError as error:
            raise VebiError(
                f"rules.imports: cannot import {module!r} ({error}); give a module importable "
                "here (its package installed or on PYTHONPATH), e.g. mypackage.rules"
            ) from None


# the shipped rules and presets, registered as a user's would be
register_rule("guided", "relu")(GuidedReLU)
register_rule("deconvnet", "relu")(DeconvnetReLU)
register_rule("gradient", "relu")(GradientReLU)
register_rule("stride_fix", "conv")(StrideFixConv)
register_rule("standard", "conv")(None)
register_rule("z_plus", "conv")(ZPlusConv)
register_rule("standard", "pool")(None)
register_rule("switch_unpool", "pool")(SwitchUnpool)
register_preset("gradient", "gradient")
register_preset("deconvnet", "deconvnet")
register_preset("guided", "guided")
register_preset("deconvnet_stride_fix", "deconvnet", conv="stride_fix")
register_preset("guided_stride_fix", "guided", conv="stride_fix")


@dataclass(frozen=True)
class Rules:
    """A choice of backward rules: a preset, optionally with its relu/conv/pool rules replaced
    (by registered name, :func:`register_rule`, or by a :class:`Rule`), plus ``extra`` rules
    for other module types (rules or registered names). The one way rules are chosen: every
    function that propagates signals takes a ``Rules`` (None: ``Rules()``), the entry points
    build it from the ``rules`` config group (:meth:`from_config`).

    ``Rules()`` is the project default (``guided_stride_fix``); ``Rules(conv="standard")``
    keeps the preset's other choices. After construction ``relu``/``conv``/``pool`` hold the
    resolved choices.
    """

    relu: RuleChoice | None = None
    conv: RuleChoice | None = None
    pool: RuleChoice | None = None
    preset: str = DEFAULT_PRESET
    extra: tuple[Rule, ...] = field(default_factory=tuple)
    #: module types (or their qualified names) that go by their gradient
    gradient_modules: tuple[str | type, ...] = field(default_factory=tuple)
    #: module types (or their qualified names) that take the activation rule
    activations: tuple[str | type, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise VebiError(
                f"unknown rules preset {self.preset!r}; the registered presets are "
                f"{', '.join(PRESETS)}; " + _HOW_TO_REGISTER.format(what="register_preset")
            )
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
        for declared in ("gradient_modules", "activations"):
            types = tuple(resolve_module_type(t) for t in getattr(self, declared))
            object.__setattr__(self, declared, types)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Rules | None) -> Rules:
        """From a config node: the ``rules`` group (``configs/rules/``) or one like it, with
        ``preset``, ``relu``/``conv``/``pool`` as registered names or rule configs with
        ``_target_``, ``extra`` as a list of those, ``gradient_modules``/``activations`` and
        ``imports``, the modules to import first (they register the user's rules and presets
        by name); null entries are left out. A :class:`Rules` is returned as it is."""
        if isinstance(config, Rules):
            return config
        values = {k: v for k, v in dict(config or {}).items() if v is not None}
        import_rule_modules(values.pop("imports", ()))
        accepted = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - accepted)
        if unknown:
            raise VebiError(
                f"unknown rules key(s) {unknown}; a rules config has "
                f"{', '.join(sorted(accepted | {'imports'}))}"
            )
        for listed in ("extra", "gradient_modules", "activations"):
            if listed in values:
                values[listed] = tuple(values[listed])
        for slot in ("relu", "conv", "pool"):
            if isinstance(values.get(slot), Mapping):
                values[slot] = _choose(slot, values[slot])
        return cls(**values)

    @property
    def family(self) -> str:
        """What every activation does: the ReLU choice when it is a family's name, else the
        preset's family."""
        relu = self.relu
        return (
            relu if isinstance(relu, str) and relu in FAMILIES else PRESETS[self.preset]["family"]
        )

    def composite(self) -> Composite:
        relu, conv, pool = (_choose(s, getattr(self, s)) for s in ("relu", "conv", "pool"))
        family = self.family
        activation = None if family == "gradient" else ActivationRule(family, self.activations)
        chosen = [*self.extra, relu, activation, conv, pool]
        functional = {
            kind: rule
            for kind, rule in (("relu", relu), ("activation", activation), ("conv", conv))
            if rule is not None and not isinstance(rule, GradientReLU)
        }
        if pool is not None:
            functional["pool"] = pool
        return Composite(
            tuple(rule for rule in chosen if rule is not None),
            # types by now (__post_init__ resolves the names)
            gradient_modules=(*GRADIENT_MODULES, *cast(ModuleTypes, self.gradient_modules)),
            family=family,
            functional=functional,
            canonizers=(
                *(() if family == "gradient" else (GateAsScale(),)),
                *(c() for c in dict.fromkeys(t for r in chosen if r for t in r.canonizers)),
            ),
        )

    def choices(self) -> dict[str, Any]:
        """The relu/conv/pool choices as names (rule objects as ``Class()``) and the extras."""
        chosen: dict[str, Any] = {
            slot: str(getattr(self, slot)) for slot in ("relu", "conv", "pool")
        }
        chosen["activation"] = self.family
        if self.extra:
            chosen["extra"] = [repr(rule) for rule in self.extra]
        if self.gradient_modules:
            types = cast(ModuleTypes, self.gradient_modules)  # resolved by __post_init__
            chosen["gradient_modules"] = [qualified_name(t) for t in types]
        if self.activations:
            types = cast(ModuleTypes, self.activations)
            chosen["activation_modules"] = [qualified_name(t) for t in types]
        return chosen

    def describe(self) -> str:
        """``relu, conv, pool`` choices in words, for summaries."""
        chosen = self.choices()
        return ", ".join(
            f"{slot} {chosen[slot]}" for slot in ("relu", "conv", "pool", "activation")
        )


def _optional(*names: str) -> list[Callable[..., Any]]:
    """The torch functions of these dotted names that exist in this torch version."""
    found = []
    for name in names:
        owner, _, attribute = name.rpartition(".")
        base = {"torch": torch, "F": F, "Tensor": torch.Tensor}[owner]
        if hasattr(base, attribute):
            found.append(getattr(base, attribute))
    return found


#: Functional ReLUs, and their in-place variants with the out-of-place function to use.
FUNCTIONAL_RELUS = set(_optional("F.relu", "torch.relu", "Tensor.relu"))
#: In-place functions -> their out-of-place versions.
IN_PLACE: dict[Callable[..., Any], Callable[..., Any]] = {
    getattr(owner, f"{name}_"): getattr(owner, name)
    for owner, names in (
        (F, ("relu", "hardtanh", "leaky_relu", "elu", "celu", "rrelu")),
        (torch, ("relu", "sigmoid", "tanh", "clamp", "clamp_min", "clip")),
        (torch.Tensor, ("relu", "sigmoid", "tanh", "clamp", "clamp_min", "clip")),
    )
    for name in names
    if hasattr(owner, f"{name}_") and hasattr(owner, name)
}
#: Functional activations (other than ReLU) that take the activation rule.
FUNCTIONAL_ACTIVATIONS = set(
    _optional(
        "F.relu6", "F.hardtanh", "F.silu", "F.gelu", "F.hardswish", "F.hardsigmoid",
        "F.leaky_relu", "F.elu", "F.celu", "F.selu", "F.mish", "F.softplus", "F.prelu",
        "torch.sigmoid", "Tensor.sigmoid", "torch.tanh", "Tensor.tanh",
    )
)  # fmt: skip
#: Clamps: a ReLU when the bounds are (0, None), a ReLU6 when (0, 6); otherwise left alone.
FUNCTIONAL_CLAMPS = set(_optional("torch.clamp", "Tensor.clamp", "torch.clip", "Tensor.clip"))
FUNCTIONAL_CLAMP_MINS = set(_optional("torch.clamp_min", "Tensor.clamp_min"))


class _Call(nn.Module):
    """A functional call ``function(x, *args, **kwargs)`` dressed as a module, so that the
    rules of modules apply to it."""

    def __init__(self, function: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.function, self.args, self.kwargs = function, args, kwargs
        self.inplace = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x, *self.args, **self.kwargs)


class _ConvCall(nn.Conv2d):
    """An ``F.conv2d`` call as a Conv2d, without allocating weights."""

    def __init__(self, weight, bias, stride=1, padding=0, dilation=1, groups=1) -> None:  # noqa: ANN001
        nn.Module.__init__(self)
        self.weight, self.bias = weight, bias
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = (0, 0) if padding == "valid" else padding
        self.padding = self.padding if isinstance(self.padding, str) else _pair(self.padding)
        self.groups, self.padding_mode = groups, "zeros"
        self.kernel_size = tuple(weight.shape[-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


_signature = functools.cache(inspect.signature)  # once per function, not once per call


def _bound(function: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
    """(args after the input, kwargs with ``inplace`` off, whether the call was in place)."""
    try:
        signature = _signature(function)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):  # a builtin without a signature: no inplace argument
        return tuple(args[1:]), dict(kwargs), False
    arguments = dict(bound.arguments)
    inplace = bool(arguments.pop("inplace", False))
    first = next(iter(arguments))
    del arguments[first]
    if "inplace" in signature.parameters:
        arguments["inplace"] = False
    return (), arguments, inplace


class _FunctionalRules(TorchFunctionMode):
    """While a model's forward runs with autograd on, gives functional activations, strided
    convolutions and max-pooling the rules of the composite (module docstring): each call is
    computed as its own function forward, and its backward is the rule's."""

    def __init__(self, composite: Composite, calls: dict[str, int] | None = None) -> None:
        super().__init__()
        self.calls = calls  # "<function> -> <rule>": count, when given
        self.rules = composite.functional
        self.relu_module = nn.ReLU()
        self.paused = 0  # > 0 while a module that goes by its gradient runs

    def _rule_call(
        self, func: Any, args: tuple, kwargs: dict
    ) -> tuple[Rule, nn.Module, bool] | None:
        out_of_place = IN_PLACE.get(func, func)
        in_place = out_of_place is not func
        if out_of_place in FUNCTIONAL_CLAMPS or out_of_place in FUNCTIONAL_CLAMP_MINS:
            low = args[1] if len(args) > 1 else kwargs.get("min")
            high = (
                None
                if out_of_place in FUNCTIONAL_CLAMP_MINS
                else (args[2] if len(args) > 2 else kwargs.get("max"))
            )
            if low == 0 and high is None and "relu" in self.rules:
                return self.rules["relu"], self.relu_module, in_place
            if low == 0 and high == 6 and "activation" in self.rules:
                return self.rules["activation"], _Call(F.relu6, (), {}), in_place
            return None
        if out_of_place in FUNCTIONAL_RELUS and "relu" in self.rules:
            _, _, flagged = _bound(out_of_place, args, kwargs)
            return self.rules["relu"], self.relu_module, in_place or flagged
        if out_of_place in FUNCTIONAL_ACTIVATIONS and "activation" in self.rules:
            rest, options, flagged = _bound(out_of_place, args, kwargs)
            return self.rules["activation"], _Call(out_of_place, rest, options), in_place or flagged
        if func is F.conv2d and "conv" in self.rules:
            module: nn.Module = _ConvCall(*args[1:], **kwargs)
            rule = self.rules["conv"]
            if rule.applies_to(module):
                rule.check(module)
                return rule, module, False
            return None
        if func is F.max_pool2d and "pool" in self.rules:
            options = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                "return_indices"), args[1:], strict=False), **kwargs)  # fmt: skip
            if options.pop("return_indices", False):
                return None
            module = nn.MaxPool2d(**options)
            rule = self.rules["pool"]
            if rule.applies_to(module):
                rule.check(module)
                return rule, module, False
        return None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        active = torch.is_grad_enabled() and not self.paused
        active = active and bool(args) and isinstance(args[0], torch.Tensor)
        call = self._rule_call(func, args, kwargs) if active else None
        if call is None:
            return func(*args, **kwargs)
        rule, module, in_place = call
        if self.calls is not None:
            key = f"{getattr(func, '__name__', func)} -> {rule!r}"
            self.calls[key] = self.calls.get(key, 0) + 1
        x = args[0]
        if in_place:  # the caller may keep using x: write the result into it
            return x.copy_(_RuleFunction.apply(x.clone(), rule, module))
        return _RuleFunction.apply(x, rule, module)


@contextlib.contextmanager
def _functional_rules(
    model: nn.Module,
    composite: Composite,
    by_gradient: Sequence[nn.Module],
    calls: dict[str, int] | None = None,
) -> Iterator[None]:
    """The functional rules, on from the model's first to its last forward hook (not during
    backward passes or anything else the caller does), and paused while one of the modules
    ``by_gradient`` runs: whatever they call inside is their gradient."""
    mode = _FunctionalRules(composite, calls)

    def pause(module: nn.Module, inputs: Any) -> None:
        mode.paused += 1

    def resume(module: nn.Module, inputs: Any, output: Any) -> None:
        mode.paused -= 1

    def start(module: nn.Module, inputs: Any) -> None:
        mode.__enter__()

    def stop(module: nn.Module, inputs: Any, output: Any) -> None:
        mode.__exit__(None, None, None)

    with contextlib.ExitStack() as stack:
        stack.callback(model.register_forward_pre_hook(start, prepend=True).remove)
        stack.callback(model.register_forward_hook(stop).remove)
        for module in by_gradient:
            stack.callback(module.register_forward_pre_hook(pause).remove)
            stack.callback(module.register_forward_hook(resume).remove)
        try:
            yield
        finally:
            if current_function_mode() is mode:  # a forward that raised
                mode.__exit__(None, None, None)


def rules_by_module_type(
    model: nn.Module, rules: Rules | Composite | None = None, images: torch.Tensor | None = None
) -> dict[str, str]:
    """Module type name -> the rule its leaves get (``gradient`` for their own gradient,
    ``gradient if affine`` for types checked on their first call), plus ``canonizers`` and
    ``functional``: with ``images``, the functional calls of one forward pass that took a rule
    and how often (else the kinds of call that would)."""
    rules = rules or Rules()
    composite = rules.composite() if isinstance(rules, Rules) else rules
    found: dict[str, set[str]] = {}
    leaves = composite.rules_for(model)
    inner = [(m, None) for m in model.modules() if any(m.children()) and _explained_functionally(m)]
    for module, rule in [*leaves, *inner]:
        described = "gradient" if rule is None else repr(rule)
        if isinstance(rule, AffineByGradient):
            described = "gradient if affine"
        elif rule is None and _explained_functionally(module):
            described = "by its functional calls"
        found.setdefault(type(module).__name__, set()).add(described)
    table = {name: " / ".join(sorted(described)) for name, described in found.items()}
    if images is not None:
        calls: dict[str, int] = {}
        with backward_rules(model, composite, calls), torch.enable_grad():
            model(images)
        if calls:
            table["functional"] = ", ".join(f"{key} x{count}" for key, count in calls.items())
    elif composite.functional:
        table["functional"] = ", ".join(f"{k} {v!r}" for k, v in composite.functional.items())
    used = {
        repr(c) for c in composite.canonizers for module in model.modules() if c.applies_to(module)
    }
    if used:
        table["canonizers"] = ", ".join(sorted(used))
    return table


def check_rule_coverage(
    model: nn.Module,
    rules: Rules | Composite | None = None,
    hint: str = "",
    images: torch.Tensor | None = None,
) -> None:
    """Refuse, naming every one, the modules of ``model`` that ``rules`` (default: the
    project's) cannot explain: called when a model first enters a job, before any work.
    With ``images``, also run one forward pass under the rules, which checks the modules of
    unknown types for affinity and the canonizers. ``hint`` is added to the message (e.g.
    how to run the job without explanations)."""
    rules = rules or Rules()
    try:
        composite = rules.composite() if isinstance(rules, Rules) else rules
        composite.rules_for(model)
        if images is not None:
            with backward_rules(model, composite), torch.enable_grad():
                model(images)
    except VebiError as error:
        raise type(error)(f"{error}{hint}") from None


@contextlib.contextmanager
def backward_rules(
    model: nn.Module,
    rules: Rules | Composite | None = None,
    functional_calls: dict[str, int] | None = None,
) -> Iterator[nn.Module]:
    """Install ``rules`` (default: the project's) in ``model``'s leaf modules, its canonizers
    and the rules of functional calls; restore everything exactly on exit. Activations become
    out-of-place while installed (in-place and re-used ones work). ``functional_calls``, when
    given, counts the functional calls that took a rule (``"relu -> GuidedReLU()"``: n)."""
    rules = rules or Rules()
    composite = rules.composite() if isinstance(rules, Rules) else rules
    chosen = composite.rules_for(model)
    patched: list[tuple[nn.Module, Any]] = []
    try:
        with contextlib.ExitStack() as stack:
            if composite.functional:
                by_gradient = [
                    m for m, rule in chosen if rule is None and not _explained_functionally(m)
                ]
                functional = _functional_rules(model, composite, by_gradient, functional_calls)
                stack.enter_context(functional)
            for canonizer in composite.canonizers:
                for undo in canonizer.apply_to_model(model):
                    stack.callback(undo)
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
    "ACTIVATION_MODULES",
    "GRADIENT_MODULES",
    "ActivationRule",
    "AffineByGradient",
    "NotAffineError",
    "PRESETS",
    "NAMED_RULES",
    "SLOTS",
    "Composite",
    "DeconvnetReLU",
    "GradientReLU",
    "GuidedReLU",
    "ReLURule",
    "Rule",
    "Rules",
    "StrideFixConv",
    "SwitchUnpool",
    "ZBoxConv",
    "ZPlusConv",
    "backward_rules",
    "check_rule_coverage",
    "import_rule_modules",
    "register_preset",
    "register_rule",
    "rules_by_module_type",
]
