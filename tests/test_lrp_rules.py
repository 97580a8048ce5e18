"""LRP's z+ and z^B rules (vebi.explain.rules.ZPlusConv / ZBoxConv) against Zennit's ZPlus and
ZBox as the independent reference, in float64, on a network whose first convolution sees
normalised (partly negative) pixels, as in every vebi model."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vebi.errors import VebiError
from vebi.explain import backward_rules
from vebi.explain.rules import Rules, ZBoxConv, ZPlusConv, rules_by_module_type
from vebi.models.normalize import Normalize
from vebi.models.torchvision_models import IMAGENET_MEAN, IMAGENET_STD

EPS = 1e-6  # Zennit's default stabiliser; ours is given explicitly
FIRST = "features.0"
MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
STD = torch.tensor(IMAGENET_STD, dtype=torch.float64)
LOW = ((0 - MEAN) / STD).view(1, 3, 1, 1)  # the box of normalised [0, 1] pixels
HIGH = ((1 - MEAN) / STD).view(1, 3, 1, 1)


def _net(batch_norm: bool = False) -> nn.Sequential:
    """Normalize -> Conv2d (-> BatchNorm2d) -> ReLU -> Conv2d(stride 2) -> ReLU -> pool ->
    Linear, seeded, with biases, in float64."""
    torch.manual_seed(0)
    features = [nn.Conv2d(3, 6, 3, padding=1)]
    if batch_norm:
        features.append(nn.BatchNorm2d(6))
    features += [nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.ReLU()]
    model = nn.Sequential(
        OrderedDict(
            normalize=Normalize(IMAGENET_MEAN, IMAGENET_STD),
            features=nn.Sequential(*features),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            head=nn.Linear(5, 3),
        )
    )
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.bias.data.uniform_(-0.3, 0.3)
        if isinstance(module, nn.BatchNorm2d):  # statistics of a trained net
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(-1.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return model.double().eval()


def _images() -> torch.Tensor:
    return torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _relevance(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.rand_like(model(images))


def _explain(
    model: nn.Module, images: torch.Tensor, relevance: torch.Tensor, context: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """(signal at the pixels, signal at the first convolution's input) under ``context``: a
    context manager that installs rules in ``model`` and yields the model to run."""
    kept: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        kept["normalized"] = output

    handle = model.normalize.register_forward_hook(keep)
    x = images.clone().requires_grad_(True)
    try:
        with context as modified:
            modified(x).backward(relevance)
    finally:
        handle.remove()
    return x.grad, kept["normalized"].grad


def _zennit(model: nn.Module, *, first: object, rest: object, batch_norm: bool) -> object:
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import SpecialFirstLayerMapComposite

    class ExactMergeBatchNorm(SequentialMergeBatchNorm):
        """Zennit 0.5.1 leaves the batch norm's eps in place after merging it, so the
        "identity" it leaves scales by 1 / sqrt(1 + eps) (5e-6 for eps = 1e-5); vebi's
        MergeBatchNorm zeroes it. Zero it here too while merged."""

        def register(self, linears: object, batch_norm: nn.BatchNorm2d) -> None:
            super().register(linears, batch_norm)
            self.saved_eps, batch_norm.eps = batch_norm.eps, 0.0

        def remove(self) -> None:
            super().remove()
            self.batch_norm.eps = self.saved_eps

    # ReLUs, pooling, the linear head and Normalize take their gradient there as here
    composite = SpecialFirstLayerMapComposite(
        layer_map=[(nn.Conv2d, rest)],
        first_map=[(nn.Conv2d, first)],
        canonizers=[ExactMergeBatchNorm()] if batch_norm else None,
    )
    return composite.context(model)


def _ours(model: nn.Module, *extra: object, conv: object = None) -> object:
    return backward_rules(model, Rules(preset="gradient", conv=conv, extra=extra))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_zbox_first_and_zplus_after_equal_zennit(batch_norm: bool) -> None:
    from zennit.rules import ZBox, ZPlus

    model, images = _net(batch_norm), _images()
    relevance = _relevance(model, images)
    box = ZBoxConv.for_normalized_pixels(IMAGENET_MEAN, IMAGENET_STD, layers=[FIRST], epsilon=EPS)
    ours = _explain(model, images, relevance, _ours(model, box, conv=ZPlusConv(epsilon=EPS)))
    reference = copy.deepcopy(model)
    theirs = _explain(
        reference,
        images,
        relevance,
        _zennit(
            reference,
            first=ZBox(LOW, HIGH, stabilizer=EPS),
            rest=ZPlus(stabilizer=EPS, zero_params=["bias"]),
            batch_norm=batch_norm,
        ),
    )
    for mine, zennit in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, zennit, rtol=1e-9, atol=1e-12)
    # the folding is undone exactly
    for (name, value), (_, original) in zip(
        model.state_dict().items(), _net(batch_norm).state_dict().items(), strict=True
    ):
        assert torch.equal(value, original), name


@pytest.mark.parametrize("bias", [False, True])
def test_zplus_on_every_conv_equals_zennit_with_and_without_bias(bias: bool) -> None:
    from zennit.rules import ZPlus

    model, images = _net(batch_norm=True), _images()
    relevance = _relevance(model, images)
    ours = _explain(model, images, relevance, _ours(model, conv=ZPlusConv(EPS, bias=bias)))
    reference = copy.deepcopy(model)
    zplus = ZPlus(stabilizer=EPS, zero_params=None if bias else ["bias"])  # None: max(b, 0) in z
    theirs = _explain(
        reference,
        images,
        relevance,
        _zennit(reference, first=zplus, rest=zplus, batch_norm=True),
    )
    for mine, zennit in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, zennit, rtol=1e-9, atol=1e-12)


def _old_zplus(
    conv: nn.Conv2d, x: torch.Tensor, relevance: torch.Tensor, eps: float
) -> torch.Tensor:
    """The rule as it was: R_in = x * W+^T (R / (W+ x + eps)), right only for x >= 0."""
    weight = conv.weight.detach().clamp_min(0)
    options = (conv.stride, conv.padding, conv.dilation, conv.groups)
    z = F.conv2d(x, weight, None, *options) + eps
    return x * torch.nn.grad.conv2d_input(x.shape, weight, relevance / z, *options)


def _one_conv(x: torch.Tensor, rule: object, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(relevance at the input, the relevance given at the output) of ``conv`` alone."""
    model = nn.Sequential(conv)
    x = x.clone().requires_grad_(True)
    with backward_rules(model, Rules(preset="gradient", conv=rule)):
        output = model(x)
        relevance = torch.rand(output.shape, generator=torch.Generator().manual_seed(2)).to(x)
        (result,) = torch.autograd.grad(output, x, relevance)
    return result, relevance


def _conv(bias: bool = False, **options: int) -> nn.Conv2d:
    torch.manual_seed(3)
    return nn.Conv2d(3, 8, 3, bias=bias, **options).double()


def test_zplus_on_normalized_pixels_is_finite_and_of_zennit_magnitude() -> None:
    from zennit.rules import ZPlus

    conv = _conv(padding=1)
    x = Normalize(IMAGENET_MEAN, IMAGENET_STD).double()(_images())
    assert bool((x < 0).any()) and bool((x > 0).any())
    ours, relevance = _one_conv(x, ZPlusConv(epsilon=EPS), conv)
    # Zennit on the same conv
    reference = copy.deepcopy(conv)
    handles = ZPlus(stabilizer=EPS).register(reference)
    leaf = x.clone().requires_grad_(True)
    (theirs,) = torch.autograd.grad(reference(leaf), leaf, relevance)
    handles.remove()
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    assert bool(torch.isfinite(ours).all())
    # the old formula divided by W+ x, which is <= 0 in many places on such inputs
    plus = F.conv2d(x, conv.weight.detach().clamp_min(0), None, 1, 1)
    assert float((plus <= 0).double().mean()) > 0.2
    old = _old_zplus(conv, x, relevance, EPS)
    assert float(old.abs().max()) > 10 * float(theirs.abs().max())
    assert float(ours.abs().max()) == pytest.approx(float(theirs.abs().max()), rel=1e-9)


def test_zplus_reduces_to_the_old_formula_on_non_negative_inputs() -> None:
    conv = _conv(stride=2, padding=1)
    x = _images()  # in [0, 1]
    ours, relevance = _one_conv(x, ZPlusConv(), conv)
    torch.testing.assert_close(ours, _old_zplus(conv, x, relevance, 1e-9), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "rule",
    [ZPlusConv(), ZBoxConv.for_normalized_pixels(IMAGENET_MEAN, IMAGENET_STD)],
    ids=["zplus", "zbox"],
)
@pytest.mark.parametrize("padding", [0, 1])
def test_relevance_is_conserved_on_normalized_pixels(rule: object, padding: int) -> None:
    """Without a bias every output's relevance is shared out whole (up to eps / z), also on
    inputs of both signs and when windows reach into the zero padding."""
    conv = _conv(padding=padding, stride=2)
    x = Normalize(IMAGENET_MEAN, IMAGENET_STD).double()(_images())
    ours, relevance = _one_conv(x, rule, conv)
    assert bool(torch.isfinite(ours).all())
    torch.testing.assert_close(ours.sum(), relevance.sum(), rtol=1e-6, atol=0)
    if isinstance(rule, ZBoxConv):  # every contribution is >= 0 inside the box
        assert bool((ours >= 0).all())


def test_zbox_from_a_config_applies_to_the_named_layer_only() -> None:
    from omegaconf import OmegaConf

    config = OmegaConf.create(
        {
            "conv": {"_target_": "vebi.explain.rules.ZPlusConv"},
            "extra": [
                {
                    "_target_": "vebi.explain.rules.ZBoxConv",
                    "layers": [FIRST],
                    "mean": list(IMAGENET_MEAN),
                    "std": list(IMAGENET_STD),
                }
            ],
        }
    )
    rules = Rules.from_config(config)
    (box,) = rules.extra
    assert box == ZBoxConv.for_normalized_pixels(IMAGENET_MEAN, IMAGENET_STD, layers=[FIRST])
    lists = ZBoxConv(LOW.flatten().tolist(), HIGH.flatten().tolist(), layers=[FIRST])
    assert lists.low == pytest.approx(box.low) and lists.high == pytest.approx(box.high)
    assert box.low == pytest.approx(tuple(((0 - MEAN) / STD).tolist()))
    model = _net()
    chosen = dict(rules.composite().rules_for(model))
    assert chosen[model.features[0]] == box
    assert chosen[model.features[2]] == ZPlusConv()
    assert rules_by_module_type(model, rules)["Conv2d"] == f"{box!r} / ZPlusConv()"
    # glob patterns, and a pattern that matches nothing leaves every conv to z+
    assert ZBoxConv(layers=["features.*"]).selects("features.2")
    assert not ZBoxConv(layers=["net.features.0"]).selects(FIRST)
    assert not ZBoxConv(layers=[FIRST]).selects(None)  # functional calls have no name
    assert ZBoxConv().selects(None)


def test_zbox_refuses_bounds_it_cannot_use() -> None:
    with pytest.raises(VebiError, match="low must not exceed high"):
        ZBoxConv(1.0, 0.0)
    with pytest.raises(VebiError, match="both mean and std"):
        ZBoxConv(mean=IMAGENET_MEAN)
    with pytest.raises(VebiError, match="differ in length"):
        ZBoxConv([0.0, 0.0], [1.0, 1.0, 1.0])
    with pytest.raises(VebiError, match="std must be > 0"):
        ZBoxConv(mean=[0.5], std=[0.0])
    with pytest.raises(VebiError, match="must be a number or one per channel"):
        ZBoxConv("low")
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    grey = ZBoxConv.for_normalized_pixels(IMAGENET_MEAN, IMAGENET_STD)  # three channels
    with pytest.raises(VebiError, match="low has 3 values, but the convolution takes 1"):
        Rules(extra=(grey,)).composite().rules_for(model)
    # scalars and (1, C, 1, 1) tensors are accepted
    assert ZBoxConv(LOW, HIGH) == ZBoxConv(LOW.flatten().tolist(), HIGH.flatten().tolist())
    assert ZBoxConv(torch.tensor(-1.0), 1).low == -1.0
