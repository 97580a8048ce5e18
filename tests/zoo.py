"""The model zoo of the coverage matrix (tests/test_coverage.py, benchmarks/coverage.py): one
network of every torchvision classification family, a list of timm CNN families and a real
network written outside both (lukemelas-style EfficientNet-Lite0), with random weights, and
what one run of mining + explanation + the evaluation's heatmap methods gives on each."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

from vebi import Explainer, mine_features
from vebi.evaluation.methods import CaptumAttribution, GradCAM, TopUnitActivation
from vebi.explain.rules import rules_by_module_type

CLASSES = 3


def _torchvision(name: str, **options: object) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(num_classes=CLASSES, **options)


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=CLASSES)

    return build


def _lite0() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0", num_classes=CLASSES)


NO_AUX = {"aux_logits": False, "init_weights": True}
#: name -> (builder, image side)
TORCHVISION: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "alexnet": (_torchvision("alexnet"), 64),
    "vgg11": (_torchvision("vgg11"), 32),
    "resnet18": (_torchvision("resnet18"), 64),
    "resnext50_32x4d": (_torchvision("resnext50_32x4d"), 64),
    "squeezenet1_1": (_torchvision("squeezenet1_1"), 64),
    "densenet121": (_torchvision("densenet121"), 64),
    "googlenet": (_torchvision("googlenet", **NO_AUX), 64),
    "inception_v3": (_torchvision("inception_v3", **NO_AUX), 80),
    "mobilenet_v2": (_torchvision("mobilenet_v2"), 64),
    "mobilenet_v3_small": (_torchvision("mobilenet_v3_small"), 64),
    "mnasnet0_5": (_torchvision("mnasnet0_5"), 64),
    "shufflenet_v2_x0_5": (_torchvision("shufflenet_v2_x0_5"), 64),
    "efficientnet_b0": (_torchvision("efficientnet_b0"), 64),
    "efficientnet_v2_s": (_torchvision("efficientnet_v2_s"), 64),
    "regnet_x_400mf": (_torchvision("regnet_x_400mf"), 64),
    "regnet_y_400mf": (_torchvision("regnet_y_400mf"), 64),
    "convnext_tiny": (_torchvision("convnext_tiny"), 64),
}
TIMM: dict[str, tuple[Callable[[], nn.Module], int]] = {
    f"timm/{name}": (_timm(name), 96 if name == "inception_v3" else 64)
    for name in (
        "resnet18",
        "resnetv2_50",
        "efficientnet_b0",
        "tf_efficientnet_b0",  # "same" padding inside Conv2dSame.forward
        "mobilenetv3_small_100",
        "convnext_atto",
        "regnetx_002",
        "densenet121",
        "inception_v3",
        "legacy_xception",
        "dpn68",
        "res2net50_14w_8s",
        "ghostnet_100",
        "repvgg_a0",
        "nf_resnet26",  # weight-standardised convolutions
    )
}
OUTSIDE: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "efficientnet-lite0 (lukemelas-style code)": (_lite0, 64),
}
ZOO = {**TORCHVISION, **TIMM, **OUTSIDE}
#: transformers: refused before any work
TRANSFORMERS: dict[str, Callable[[], nn.Module]] = {
    "vit_b_16": lambda: torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8
    ),
    "swin_t": _torchvision("swin_t"),
    "maxvit_t": _torchvision("maxvit_t"),
}


@dataclass
class Coverage:
    """What one model gave: m, seconds, the rules per module type and the maps' checks."""

    features: int
    mining_s: float
    explanation_s: float
    methods_s: float
    rules: dict[str, str]
    maps: dict[str, torch.Tensor]
    restored: bool


def exercise(model: nn.Module, side: int, images: int = 6) -> Coverage:
    """Mine (mu = 10, predicted labels) on seeded random images, explain two of them with
    k = 3 under the default rules, and run the evaluation's heatmap methods (Captum's
    deconvolution, guided backprop and gradient, Grad-CAM at the layer found automatically,
    the top unit's activation) on them."""
    model = model.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(images, 3, side, side, generator=generator)
    labels = torch.arange(images) % CLASSES
    start = time.perf_counter()
    relevant = mine_features(
        model, TensorDataset(x, labels), mu=10.0, labels="predicted", progress=False
    )
    mined = time.perf_counter()
    explanation = Explainer(model, relevant, k=3)(x[:2])
    explained = time.perf_counter()
    classes = explanation.classes
    maps = {"vebi": explanation.combined}
    methods = {
        **{
            name: CaptumAttribution(model, relevant, name)
            for name in ("deconvolution", "guided_backprop", "gradient")
        },
        "gradcam": GradCAM(model, relevant),
        "top_unit": TopUnitActivation(model, relevant),
    }
    for name, method in methods.items():
        maps[name] = method(x[:2], classes)
    done = time.perf_counter()
    restored = all("forward" not in m.__dict__ for m in model.modules()) and not any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules()
    )
    return Coverage(
        features=relevant.index.size,
        mining_s=mined - start,
        explanation_s=explained - mined,
        methods_s=done - explained,
        rules=rules_by_module_type(model, images=x[:1]),
        maps=maps,
        restored=restored,
    )
