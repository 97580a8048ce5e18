"""Rules for every activation, functional calls, canonizers and modules of unknown types,
each against a naive re-implementation of what docs/method.md (section 4) says."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from vebi.errors import VebiError
from vebi.explain import backprop_feature, backward_rules
from vebi.explain.rules import (
    ACTIVATION_MODULES,
    NotAffineError,
    Rules,
    check_rule_coverage,
    rules_by_module_type,
)

#: one instance of every activation type, with non-default settings where they have some
ACTIVATIONS = [
    nn.ReLU6(),
    nn.LeakyReLU(0.1),
    nn.ELU(0.7),
    nn.CELU(1.3),
    nn.SELU(),
    nn.PReLU(init=0.2),
    nn.Hardtanh(-2.0, 2.5),
    nn.Hardswish(),
    nn.Hardsigmoid(),
    nn.SiLU(),
    nn.GELU(),
    nn.GELU(approximate="tanh"),
    nn.Mish(),
    nn.Softplus(beta=2.0),
    nn.Sigmoid(),
    nn.Tanh(),
]
#: where the activations above have kinks: finite differences are kept away from them
KINKS = torch.tensor([-3.0, -2.0, 0.0, 2.5, 3.0, 6.0], dtype=torch.float64)


def _inputs_and_signal(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.empty(2, 3, 5, 5, dtype=torch.float64).uniform_(-8, 8, generator=generator)
    near = (x[..., None] - KINKS).abs().amin(-1) < 1e-3
    x[near] += 0.01
    return x, torch.randn(x.shape, generator=generator, dtype=torch.float64)


def _finite_difference_slope(activation: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f'(x) by central differences in float64: independent of autograd."""
    h = 1e-6
    with torch.no_grad():
        return (activation(x + h) - activation(x - h)) / (2 * h)


def _naive(family: str, g: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """docs/method.md: gradient g f'(x); deconvnet max(g, 0); guided max(g, 0) max(f'(x), 0)."""
    if family == "gradient":
        return g * slope
    if family == "deconvnet":
        return torch.where(g > 0, g, torch.zeros_like(g))
    return torch.where(g > 0, g, torch.zeros_like(g)) * torch.where(slope > 0, slope, 0 * slope)


def test_every_activation_type_is_listed() -> None:
    assert {type(a) for a in ACTIVATIONS} == set(ACTIVATION_MODULES)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: repr(a))
@pytest.mark.parametrize("family", ["guided", "deconvnet", "gradient"])
def test_activation_rule_equals_its_definition(activation: nn.Module, family: str) -> None:
    model = nn.Sequential(copy.deepcopy(activation)).double().eval()
    x, g = _inputs_and_signal()
    inputs = x.clone().requires_grad_(True)
    with backward_rules(model, Rules(preset=family)):
        (ours,) = torch.autograd.grad(model(inputs), inputs, grad_outputs=g)
    expected = _naive(family, g, _finite_difference_slope(model[0], x))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), activation.double()(x))  # restored


class Functional(nn.Module):
    """A conv, then ``function`` applied in the forward (no module to hang a rule on), then
    another conv."""

    def __init__(self, function) -> None:  # noqa: ANN001
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 4, 3, stride=2), nn.Conv2d(4, 3, 3)
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.function(self.conv1(x)))


def _in_place_relu(x: torch.Tensor) -> torch.Tensor:
    x.relu_()  # the result is not used: the caller reads x
    return x


FUNCTIONAL_CASES = [
    (F.relu, nn.ReLU()),
    (torch.relu, nn.ReLU()),
    (lambda x: x.relu(), nn.ReLU()),
    (lambda x: F.relu(x, inplace=True), nn.ReLU()),
    (_in_place_relu, nn.ReLU()),
    (lambda x: x.clamp(min=0), nn.ReLU()),
    (lambda x: torch.clamp_min(x, 0), nn.ReLU()),
    (lambda x: x.clamp(0, 6), nn.ReLU6()),
    (F.relu6, nn.ReLU6()),
    (lambda x: F.hardtanh(x, -0.5, 0.5), nn.Hardtanh(-0.5, 0.5)),
    (F.silu, nn.SiLU()),
    (lambda x: F.silu(x, inplace=True), nn.SiLU()),
    (F.gelu, nn.GELU()),
    (F.hardswish, nn.Hardswish()),
    (F.hardsigmoid, nn.Hardsigmoid()),
    (lambda x: F.leaky_relu(x, 0.2), nn.LeakyReLU(0.2)),
    (F.elu, nn.ELU()),
    (F.mish, nn.Mish()),
    (F.softplus, nn.Softplus()),
    (torch.sigmoid, nn.Sigmoid()),
    (lambda x: x.sigmoid(), nn.Sigmoid()),
    (torch.tanh, nn.Tanh()),
]


@pytest.mark.parametrize(("function", "module"), FUNCTIONAL_CASES)
@pytest.mark.parametrize("preset", ["guided_stride_fix", "deconvnet"])
def test_functional_calls_take_the_rules_of_their_modules(function, module, preset) -> None:
    torch.manual_seed(0)
    functional = Functional(function).eval()
    as_module = Functional(module).eval()
    as_module.load_state_dict(functional.state_dict())
    images = torch.randn(2, 2, 11, 11)
    ours = backprop_feature(functional, images, "conv2", 1, rules=Rules(preset=preset))
    reference = backprop_feature(as_module, images, "conv2", 1, rules=Rules(preset=preset))
    assert reference.abs().sum() > 0
    torch.testing.assert_close(ours, reference)
    gradient = backprop_feature(functional, images, "conv2", 1, rules=Rules(preset="gradient"))
    if preset == "deconvnet":  # the rule is not the gradient: it made a difference
        assert not torch.allclose(ours, gradient)


def test_clamps_that_are_not_activations_go_by_their_gradient() -> None:
    model = Functional(lambda x: x.clamp(min=-0.1, max=0.3)).eval()
    images = torch.randn(2, 2, 11, 11)
    guided = backprop_feature(model, images, "conv2", 0, rules=Rules(preset="guided"))
    gradient = backprop_feature(model, images, "conv2", 0, rules=Rules(preset="gradient"))
    torch.testing.assert_close(guided, gradient)


class PaddingConv(nn.Conv2d):
    """lukemelas-style "same" convolution: a ZeroPad2d child applied inside forward, then the
    convolution without padding."""

    def __init__(self, pad: tuple[int, int, int, int], *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.mark.parametrize("pad", [(1, 1, 1, 1), (0, 1, 0, 1)])
@pytest.mark.parametrize("conv", ["stride_fix", "standard"])
def test_convolutions_that_pad_in_their_forward_take_the_conv_rule(pad, conv) -> None:
    torch.manual_seed(0)
    subclass = nn.Sequential(PaddingConv(pad, 3, 4, 3, stride=2), nn.ReLU()).eval()
    plain = nn.Sequential(nn.ZeroPad2d(pad), nn.Conv2d(3, 4, 3, stride=2), nn.ReLU()).eval()
    plain[1].load_state_dict(subclass[0].state_dict(), strict=False)
    images = torch.rand(2, 3, 12, 12)
    ours = backprop_feature(subclass, images, "1", 2, rules=Rules(conv=conv))
    reference = backprop_feature(plain, images, "2", 2, rules=Rules(conv=conv))
    torch.testing.assert_close(ours, reference)
    assert rules_by_module_type(subclass)["PaddingConv"] == "by its functional calls"


class FunctionalPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(self.conv(x), 3, 2, 1)


def test_functional_max_pooling_takes_the_pool_rule() -> None:
    torch.manual_seed(0)
    functional = FunctionalPool().eval()
    modules = nn.Sequential(functional.conv, nn.MaxPool2d(3, 2, 1)).eval()
    images = torch.rand(2, 3, 13, 13)
    for pool in ("switch_unpool", "standard"):
        rules = Rules(pool=pool)
        x1, x2 = images.clone().requires_grad_(True), images.clone().requires_grad_(True)
        signal = torch.rand_like(modules(images))
        with backward_rules(functional, rules):
            (ours,) = torch.autograd.grad(functional(x1), x1, signal)
        with backward_rules(modules, rules):
            (reference,) = torch.autograd.grad(modules(x2), x2, signal)
        torch.testing.assert_close(ours, reference)


def test_squeeze_excitation_passes_the_signal_through_its_gate_as_a_scale() -> None:
    torch.manual_seed(0)
    block = torchvision.ops.SqueezeExcitation(4, 2).eval()
    x = torch.randn(2, 4, 6, 6)
    g = torch.randn(2, 4, 6, 6)
    inputs = x.clone().requires_grad_(True)
    with backward_rules(block, Rules(preset="guided")):
        (ours,) = torch.autograd.grad(block(inputs), inputs, g)
    with torch.no_grad():  # by hand: s(x) per channel, the signal scaled by it
        scale = torch.sigmoid(block.fc2(torch.relu(block.fc1(x.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(ours, g * scale)
    inputs = x.clone().requires_grad_(True)
    with backward_rules(block, Rules(preset="gradient")):  # the full gradient, gate included
        (gradient,) = torch.autograd.grad(block(inputs), inputs, g)
    _, expected = torch.autograd.functional.vjp(block, x, g)
    torch.testing.assert_close(gradient, expected)
    assert not any(m._forward_hooks for m in block.modules())


class MyNormalize(nn.Module):
    """A user's normalisation as a module: affine, no parameters, unknown to vebi."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) / 0.25


class MySwish(nn.Module):
    """A user's activation as a module: not affine."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def _net(first: nn.Module, activation: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(first, nn.Conv2d(3, 4, 3), activation, nn.Conv2d(4, 2, 3)).eval()


@pytest.mark.parametrize(
    "normalize", [MyNormalize(), torchvision.transforms.Normalize((0.4, 0.5, 0.6), (0.2, 0.3, 0.4))]
)
def test_affine_modules_of_unknown_types_go_by_their_gradient(normalize: nn.Module) -> None:
    model = _net(normalize, nn.ReLU())
    images = torch.rand(2, 3, 10, 10)
    check_rule_coverage(model, images=images)
    ours = backprop_feature(model, images, "3", 0)
    reference_model = _net(nn.Identity(), nn.ReLU())
    reference_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        normalised = normalize(images)
    signal = backprop_feature(reference_model, normalised, "3", 0)
    # the normalisation's gradient: the signal on its output divided by the per-channel std
    std = torch.tensor(getattr(normalize, "std", (0.25,) * 3)).view(1, -1, 1, 1)
    torch.testing.assert_close(ours, signal / std)


def test_a_module_that_is_not_affine_is_refused_with_what_to_do() -> None:
    model = _net(nn.Identity(), MySwish())
    images = torch.rand(2, 3, 10, 10)
    with pytest.raises(NotAffineError) as error:
        check_rule_coverage(model, images=images)
    message = str(error.value)
    assert "module '2' (MySwish)" in message and "not affine" in message
    assert f"rules.activations=[{__name__}.MySwish]" in message
    # declared an activation: the guided activation rule; declared by its gradient: autograd
    declared = Rules(activations=(MySwish,))
    guided = backprop_feature(model, images, "3", 0, rules=declared)
    as_silu = _net(nn.Identity(), nn.SiLU())
    as_silu.load_state_dict(model.state_dict())
    torch.testing.assert_close(guided, backprop_feature(as_silu, images, "3", 0))
    by_name = Rules(gradient_modules=(f"{__name__}.MySwish",))
    gradient = backprop_feature(model, images, "3", 0, rules=by_name)
    expected = backprop_feature(model, images, "3", 0, rules=Rules(preset="gradient"))
    torch.testing.assert_close(gradient, expected)
    with pytest.raises(VebiError, match="cannot import the module type"):
        Rules(gradient_modules=("no.such.Module",))


class Scaled(nn.Module):
    """A module with parameters of a type vebi does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def test_unknown_modules_with_parameters_are_refused_by_type_up_front() -> None:
    model = nn.Sequential(*(m for _ in range(4) for m in (nn.Conv2d(2, 2, 1), Scaled())))
    with pytest.raises(VebiError) as error:
        check_rule_coverage(model)
    message = str(error.value)
    lines = message.splitlines()
    assert lines[0] == "no backward rule for 1 module type(s) with parameters:"
    assert lines[1] == f"  Scaled ({__name__}.Scaled): 4 modules at '1', '3', '5', ..."
    assert f"rules.gradient_modules=[{__name__}.Scaled]" in lines[2]
    check_rule_coverage(model, Rules(gradient_modules=(Scaled,)))


def test_transformers_are_refused_before_any_work() -> None:
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=8
    )
    with pytest.raises(
        VebiError, match=r"the model has 2 attention layer\(s\) \(MultiheadAttention"
    ):
        check_rule_coverage(vit)


# ------------------------------------------------------------------ Zennit as the reference
def _conv_bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2, bias=False),
        nn.BatchNorm2d(4),
    )  # the relevance starts at the last batch norm: no ReLU on top (LRP passes it unchanged)
    for module in model.modules():  # running statistics and affine parameters of a trained net
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(-1.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


def test_zplus_with_batch_norms_folded_equals_zennit() -> None:
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import LayerMapComposite
    from zennit.rules import Pass, ZPlus

    from vebi.explain.rules import ZPlusConv

    model = _conv_bn_net()
    reference = copy.deepcopy(model)
    images = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    relevance = torch.rand_like(model(images))
    x = images.clone().requires_grad_(True)
    with backward_rules(model, Rules(preset="gradient", conv=ZPlusConv(epsilon=1e-6))):
        (ours,) = torch.autograd.grad(model(x), x, relevance)
    composite = LayerMapComposite(
        [(nn.Conv2d, ZPlus(stabilizer=1e-6, zero_params=["bias"])), (nn.ReLU, Pass())],
        canonizers=[SequentialMergeBatchNorm()],
    )
    with Gradient(reference, composite) as attributor:
        _, theirs = attributor(images, relevance)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)

    class Unfolded(ZPlusConv):
        canonizers = ()

    x = images.clone().requires_grad_(True)
    with backward_rules(model, Rules(preset="gradient", conv=Unfolded(epsilon=1e-6))):
        (unfolded,) = torch.autograd.grad(model(x), x, relevance)
    assert not torch.allclose(unfolded, theirs, rtol=1e-2)  # the folding is what makes it z+
    # the folding is undone exactly
    for (name, value), (_, original) in zip(
        model.state_dict().items(), _conv_bn_net().state_dict().items(), strict=True
    ):
        assert torch.equal(value, original), name
    assert model[3].bias is None and model[4].eps == 1e-5


def test_guided_backprop_equals_zennit_on_a_torchvision_network() -> None:
    from zennit.attribution import Gradient
    from zennit.composites import GuidedBackprop

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5).eval()
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    logits = net(images).detach()
    signal = torch.zeros_like(logits)
    signal[:, 3] = 1.0
    x = images.clone().requires_grad_(True)
    with backward_rules(net, Rules(preset="guided")):
        (ours,) = torch.autograd.grad(net(x), x, signal)
    with Gradient(net, GuidedBackprop()) as attributor:
        _, theirs = attributor(images, signal)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
