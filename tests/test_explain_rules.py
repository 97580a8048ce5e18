"""The backward engine against independent references (Captum, max_unpool2d, a stride-1 conv)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import NeuronDeconvolution, NeuronGuidedBackprop
from torch import nn

from tests.explain_models import TinyResNet, randomised
from vebi.errors import VebiError
from vebi.explain import backprop_feature, backward_rules
from vebi.explain.rules import Rules
from vebi.models import SmallVGG


def _half_energy(channel: int):
    """Captum neuron selector whose gradient w.r.t. the layer output is the channel's map."""
    return lambda output: 0.5 * output[:, channel].pow(2).flatten(1).sum(1)


CASES = [
    (lambda: SmallVGG(in_channels=1), (3, 1, 28, 28), "conv2"),
    (lambda: SmallVGG(in_channels=1), (3, 1, 28, 28), "relu3"),
    (lambda: SmallVGG(in_channels=1), (3, 1, 28, 28), "pool2"),
    (lambda: TinyResNet(), (2, 3, 32, 32), "block1.relu2"),
    (lambda: TinyResNet(), (2, 3, 32, 32), "block2.bn2"),
]


def _most_active_channel(model: nn.Module, images: torch.Tensor, layer: str) -> int:
    captured = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: captured.__setitem__("a", o.detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    return int(captured["a"].pow(2).sum(dim=(0, 2, 3)).argmax())


@pytest.mark.parametrize(("make", "shape", "layer"), CASES)
@pytest.mark.parametrize(
    ("relu", "reference"), [("deconvnet", NeuronDeconvolution), ("guided", NeuronGuidedBackprop)]
)
def test_standard_rules_equal_captum(make, shape, layer, relu, reference) -> None:
    model = randomised(make())
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    channel = _most_active_channel(model, images, layer)
    rules = Rules(relu=relu, conv="standard", pool="standard")
    ours = backprop_feature(model, images, layer, channel, rules=rules)
    module = dict(model.named_modules())[layer]
    theirs = reference(model, module).attribute(images, neuron_selector=_half_energy(channel))
    assert ours.shape == images.shape and ours.abs().sum() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_gradient_rule_equals_autograd() -> None:
    model = randomised(SmallVGG(in_channels=1))
    images = torch.rand(2, 1, 28, 28).requires_grad_(True)
    output = {}
    handle = model.conv3.register_forward_hook(lambda m, i, o: output.__setitem__("a", o))
    model(images)
    handle.remove()
    (expected,) = torch.autograd.grad(0.5 * output["a"][:, 4].pow(2).sum(), images)
    rules = Rules(relu="gradient", conv="standard")
    ours = backprop_feature(model, images.detach(), "conv3", 4, rules=rules)
    torch.testing.assert_close(ours, expected)


def test_switch_unpool_equals_max_unpool_with_forward_indices() -> None:
    pool = nn.MaxPool2d(3, stride=2, padding=1)  # overlapping windows share arg-maxes
    model = nn.Sequential(pool).eval()
    x = torch.rand(2, 4, 9, 9, requires_grad=True)
    signal = torch.rand(2, 4, 5, 5)
    with backward_rules(model, Rules(pool="switch_unpool")):
        (ours,) = torch.autograd.grad(model(x), x, grad_outputs=signal)
    _, indices = F.max_pool2d(x.detach(), 3, 2, 1, return_indices=True)
    expected = F.max_unpool2d(signal, indices, 3, 2, 1, output_size=x.shape[-2:])
    torch.testing.assert_close(ours, expected)
    (standard,) = torch.autograd.grad(pool(x), x, grad_outputs=signal)
    assert not torch.allclose(ours, standard)  # shared arg-maxes add up under the gradient


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding"),
    [(28, 3, 2, 1), (27, 5, 2, 2), (32, 4, 4, 0), (15, 3, 3, 1)],
)
def test_stride_fix_equals_upsample_then_stride1_transposed_conv(
    size, kernel, stride, padding
) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, kernel, stride=stride, padding=padding)
    model = nn.Sequential(conv).eval()
    x = torch.rand(2, 3, size, size, requires_grad=True)
    out = model(x)
    signal = torch.rand_like(out)
    with backward_rules(model, Rules(conv="stride_fix")):
        (ours,) = torch.autograd.grad(model(x), x, grad_outputs=signal)
    # by hand: the stride-1 output size, nearest upsampling, and the gradient of the stride-1
    # convolution (= its transposed convolution), computed by autograd
    stride1_size = size + 2 * padding - kernel + 1
    upsampled = signal.repeat_interleave(stride, 2).repeat_interleave(stride, 3)
    upsampled = (
        F.interpolate(signal, size=stride1_size, mode="nearest")
        if upsampled.shape[-1] != stride1_size
        else upsampled
    )
    x1 = x.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(
        F.conv2d(x1, conv.weight, None, 1, padding), x1, grad_outputs=upsampled
    )
    torch.testing.assert_close(ours, expected)


def test_rules_restore_the_model_exactly() -> None:
    model = torchvision.models.resnet18(num_classes=4).eval()  # in-place, re-used ReLUs
    reference = copy.deepcopy(model)
    images = torch.rand(2, 3, 64, 64)
    signal = backprop_feature(model, images, "layer2.0.relu", 3)
    assert signal.shape == images.shape and torch.isfinite(signal).all() and signal.abs().sum() > 0
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    assert model.layer1[0].relu.inplace
    torch.testing.assert_close(model(images), reference(images))
    with pytest.raises(RuntimeError, match="boom"), backward_rules(model, Rules()):
        raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_in_place_relus_give_the_same_signal() -> None:
    plain = randomised(SmallVGG(in_channels=1))
    inplace = SmallVGG(in_channels=1, inplace=True)
    inplace.load_state_dict(plain.state_dict())
    inplace.eval()
    images = torch.rand(2, 1, 28, 28)
    for layer in ("conv2", "relu2", "conv3"):
        torch.testing.assert_close(
            backprop_feature(inplace, images, layer, 1), backprop_feature(plain, images, layer, 1)
        )


def test_per_image_channels_and_errors() -> None:
    model = randomised(SmallVGG(in_channels=1))
    images = torch.rand(3, 1, 28, 28)
    batched = backprop_feature(model, images, "conv3", [0, 5, 9])
    for n, channel in enumerate([0, 5, 9]):
        torch.testing.assert_close(
            batched[n : n + 1], backprop_feature(model, images[n : n + 1], "conv3", channel)
        )
    with pytest.raises(VebiError, match="has 32 channels"):
        backprop_feature(model, images, "conv3", 32)
    with pytest.raises(VebiError, match="unknown layer"):
        backprop_feature(model, images, "conv9", 0)
    with pytest.raises(VebiError, match="unknown relu rule 'lrp'; the registered relu rules"):
        backprop_feature(model, images, "conv3", 0, rules=Rules(relu="lrp"))
    with pytest.raises(VebiError, match="rules must be a vebi.explain.rules.Rules"):
        backprop_feature(model, images, "conv3", 0, "guided")  # the old relu= argument
    softmax = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Softmax2d(), nn.Flatten(), nn.Linear(2 * 26 * 26, 2)
    )
    with pytest.raises(
        VebiError, match=r"'1' \(Softmax2d\) has no backward rule and is not affine"
    ):
        backprop_feature(softmax, images, "2", 0)


# ------------------------------------------------------------------ open rules
def _naive_zplus(conv: nn.Conv2d, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """z+ by its definition, loop by loop: every output position shares its relevance among
    the inputs of its window in proportion to x * max(W, 0)."""
    weight = conv.weight.detach().clamp_min(0)
    (stride, _), (padding, _) = conv.stride, conv.padding
    kernel = weight.shape[-1]
    padded = F.pad(x, (padding,) * 4)
    result = torch.zeros_like(padded)
    for n in range(x.shape[0]):
        for k in range(weight.shape[0]):
            for py in range(relevance.shape[2]):
                for px in range(relevance.shape[3]):
                    rows = slice(py * stride, py * stride + kernel)
                    cols = slice(px * stride, px * stride + kernel)
                    contributions = padded[n, :, rows, cols] * weight[k]
                    z = contributions.sum() + 1e-9
                    result[n, :, rows, cols] += contributions / z * relevance[n, k, py, px]
    return result[:, :, padding : padding + x.shape[2], padding : padding + x.shape[3]]


@pytest.mark.parametrize(("stride", "padding"), [(1, 0), (2, 1)])
def test_zplus_rule_equals_its_definition(stride: int, padding: int) -> None:
    from vebi.explain.rules import ZPlusConv

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, bias=False)
    model = nn.Sequential(conv).eval()
    x = torch.rand(2, 2, 7, 7, requires_grad=True)
    relevance = torch.rand_like(model(x))
    with backward_rules(model, Rules(conv=ZPlusConv())):
        (ours,) = torch.autograd.grad(model(x), x, grad_outputs=relevance)
    torch.testing.assert_close(ours, _naive_zplus(conv, x.detach(), relevance))
    if padding == 0:  # nothing falls on the padding: relevance is conserved
        torch.testing.assert_close(ours.sum(), relevance.sum())


def test_a_rule_from_config_and_the_presets() -> None:
    from omegaconf import OmegaConf

    from vebi.explain.rules import PRESETS, ActivationRule, GuidedReLU, StrideFixConv, ZPlusConv

    config = OmegaConf.create({"conv": {"_target_": "vebi.explain.rules.ZPlusConv"}})
    rules = Rules.from_config(config)
    guided = (GuidedReLU(), ActivationRule("guided"))
    assert rules.composite().rules == (*guided, ZPlusConv())
    assert Rules().composite().rules == (*guided, StrideFixConv())  # the project default
    assert Rules(preset="guided").composite().rules == guided
    assert set(PRESETS) >= {"deconvnet", "guided", "guided_stride_fix"}
    with pytest.raises(VebiError, match="unknown rules preset"):
        Rules(preset="lrp")
    # a preset reproduces Captum like the explicit choices do
    model = randomised(SmallVGG(in_channels=1))
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    ours = backprop_feature(model, images, "conv3", 2, rules=Rules(preset="guided"))
    theirs = NeuronGuidedBackprop(model, model.conv3).attribute(
        images, neuron_selector=_half_energy(2)
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


class FunctionalReLUNet(nn.Module):
    """ReLU applied with F.relu in forward: no module to install a rule on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 26 * 26, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).flatten(1))


def test_functional_relu_takes_the_relu_rule_not_its_gradient() -> None:
    model = FunctionalReLUNet().eval()
    with_module = nn.Sequential(model.conv, nn.ReLU(), nn.Flatten(), model.fc).eval()
    images = torch.rand(2, 1, 28, 28)
    for preset in ("guided", "deconvnet", "gradient"):
        ours = backprop_feature(model, images, "fc", 0, rules=Rules(preset=preset))
        reference = backprop_feature(with_module, images, "3", 0, rules=Rules(preset=preset))
        torch.testing.assert_close(ours, reference)
    nested = nn.Sequential(nn.Identity(), FunctionalReLUNet()).eval()
    nested[1].load_state_dict(model.state_dict())
    torch.testing.assert_close(
        backprop_feature(nested, images, "1.fc", 0), backprop_feature(with_module, images, "3", 0)
    )


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding", "groups"),
    [(32, 1, 2, 0, 1), (56, 1, 2, 0, 2), (64, 7, 2, 3, 1), (28, 3, 2, 1, 4), (9, 3, 3, 0, 1)],
)
def test_stride_fix_fast_paths_equal_the_definition(size, kernel, stride, padding, groups) -> None:
    """The merged-kernel and 1 x 1 shortcuts of stride_fix against upsampling followed by the
    stride-1 transposed convolution, written out by hand (as in the reference test above)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, kernel, stride=stride, padding=padding, groups=groups, bias=False)
    model = nn.Sequential(conv).eval()
    x = torch.rand(2, 8, size, size, requires_grad=True)
    signal = torch.rand_like(model(x))
    with backward_rules(model, Rules(conv="stride_fix")):
        (ours,) = torch.autograd.grad(model(x), x, grad_outputs=signal)
    stride1_size = size + 2 * padding - kernel + 1
    upsampled = F.interpolate(signal, size=stride1_size, mode="nearest")
    x1 = x.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(
        F.conv2d(x1, conv.weight, None, 1, padding, 1, groups), x1, grad_outputs=upsampled
    )
    torch.testing.assert_close(ours, expected)


def test_norms_go_by_their_gradient_and_smooth_activations_by_the_preset() -> None:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 3), nn.GELU()]
    head = [nn.Flatten(), nn.LayerNorm(8 * 28 * 28), nn.Linear(8 * 28 * 28, 3)]
    model = nn.Sequential(*layers, *head).eval()
    images = torch.rand(2, 3, 32, 32)
    inputs = images.clone().requires_grad_(True)
    output = model[:5](inputs)
    (expected,) = torch.autograd.grad(0.5 * output[:, 1].pow(2).sum(), inputs)
    gradient = backprop_feature(model, images, "4", 1, rules=Rules(preset="gradient"))
    torch.testing.assert_close(gradient, expected)  # every layer by its gradient
    guided = backprop_feature(model, images, "4", 1, rules=Rules(preset="guided"))
    assert not torch.allclose(guided, expected)  # SiLU and GELU take the guided rule


class _Gain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class _Bias(_Gain):
    pass


def test_every_unsupported_module_is_named_up_front() -> None:
    from vebi.explain.rules import check_rule_coverage

    model = nn.Sequential(nn.Conv2d(1, 2, 3), _Gain(), nn.Conv2d(2, 2, 3), _Bias(), nn.Flatten())
    with pytest.raises(VebiError) as error:
        check_rule_coverage(model)
    message = str(error.value)
    assert "_Gain (tests.test_explain_rules._Gain): 1 module at '1'" in message
    assert "_Bias (tests.test_explain_rules._Bias): 1 module at '3'" in message
    check_rule_coverage(SmallVGG(in_channels=1))  # covered: no error
