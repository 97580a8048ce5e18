"""torchvision classifiers (VGG11/16, ResNet18/50) wrapped to take [0, 1] images."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import cast
from urllib.error import URLError

import torchvision
from torch import nn

from vebi.errors import VebiError
from vebi.models.normalize import Normalize
from vebi.utils.log import get_logger

log = get_logger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHITECTURES = {
    "vgg11": ("vgg11", "VGG11_Weights"),
    "vgg16": ("vgg16", "VGG16_Weights"),
    "resnet18": ("resnet18", "ResNet18_Weights"),
    "resnet50": ("resnet50", "ResNet50_Weights"),
}


def _replace_head(model: nn.Module, num_classes: int) -> None:
    if hasattr(model, "fc"):  # ResNet: a Linear head
        model.fc = nn.Linear(cast(nn.Linear, model.fc).in_features, num_classes)
    else:  # VGG: a Sequential classifier ending in a Linear
        classifier = cast(nn.Sequential, model.classifier)
        last = cast(nn.Linear, classifier[-1])
        classifier[-1] = nn.Linear(last.in_features, num_classes)


class TorchvisionClassifier(nn.Sequential):
    """``normalize`` (ImageNet mean/std) then ``net``, a torchvision VGG or ResNet whose last
    layer predicts ``num_classes``.

    ``pretrained=True`` loads the ImageNet weights (torchvision downloads them once into its
    cache when the network allows). Without network: an error saying so, or, with
    ``allow_random_init=True``, a warning and random weights.
    """

    def __init__(
        self,
        architecture: str = "resnet18",
        num_classes: int = 1000,
        pretrained: bool = False,
        allow_random_init: bool = False,
    ) -> None:
        if architecture not in ARCHITECTURES:
            raise VebiError(
                f"unknown architecture {architecture!r}; choose from {sorted(ARCHITECTURES)}"
            )
        builder_name, weights_name = ARCHITECTURES[architecture]
        builder = getattr(torchvision.models, builder_name)
        model = builder(weights=None)
        if pretrained:
            weights = getattr(torchvision.models, weights_name).DEFAULT
            try:
                model.load_state_dict(weights.get_state_dict(progress=True))
            except (URLError, OSError, RuntimeError) as error:
                message = (
                    f"could not get the pretrained {architecture} weights ({error}); they are "
                    "downloaded once from the torchvision servers into torch's hub cache. "
                    "Without network: put the file there by hand, set model.net.pretrained=false, "
                    "or model.net.allow_random_init=true to go on with random weights"
                )
                if not allow_random_init:
                    raise VebiError(message) from error
                warnings.warn(message, stacklevel=2)
        if num_classes != 1000 or not pretrained:
            _replace_head(model, num_classes)
        super().__init__(OrderedDict(normalize=Normalize(IMAGENET_MEAN, IMAGENET_STD), net=model))
        self.num_classes = num_classes


def imagenet_categories(architecture: str) -> list[str]:
    """The 1000 ImageNet class names of the torchvision weights of ``architecture`` (shipped
    with torchvision: no download)."""
    if architecture not in ARCHITECTURES:
        raise VebiError(
            f"unknown architecture {architecture!r}; choose from {sorted(ARCHITECTURES)}"
        )
    weights = getattr(torchvision.models, ARCHITECTURES[architecture][1]).DEFAULT
    return list(weights.meta["categories"])
