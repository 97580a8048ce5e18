"""timm classifiers (``timm.create_model``) wrapped to take [0, 1] images; timm is optional
(``pip install 'vebi[timm]'``)."""

from __future__ import annotations

import warnings
from collections import OrderedDict

from torch import nn

from vebi.errors import VebiError
from vebi.models.normalize import Normalize
from vebi.models.torchvision_models import IMAGENET_MEAN, IMAGENET_STD


def _timm():  # noqa: ANN202
    try:
        import timm
    except ImportError:
        raise VebiError(
            "model=timm needs the timm package: pip install 'vebi[timm]' (or pip install timm)"
        ) from None
    return timm


class TimmClassifier(nn.Sequential):
    """``normalize`` (the mean/std of the model's timm pretrained config) then ``net``,
    ``timm.create_model(name, num_classes=num_classes)``.

    ``pretrained=True`` loads timm's own weights for ``name`` (timm downloads them once into
    its cache when the network allows; ``num_classes`` other than the weights' replaces the
    head). Without network: an error saying so, or, with ``allow_random_init=True``, a
    warning and random weights.
    """

    def __init__(
        self,
        name: str,
        num_classes: int = 1000,
        pretrained: bool = False,
        allow_random_init: bool = False,
    ) -> None:
        timm = _timm()
        known = timm.list_models()
        if name.split(".")[0] not in known:
            import difflib

            close = difflib.get_close_matches(name, known, n=8, cutoff=0.6)
            raise VebiError(
                f"timm has no model {name!r}; similar names: {', '.join(close) or 'none'} "
                "(timm.list_models() lists them all)"
            )
        try:
            net = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
        except (OSError, RuntimeError, ValueError) as error:
            message = (
                f"could not get the pretrained timm weights of {name} ({error}); timm downloads "
                "them once into its cache (Hugging Face hub). Without network: put them in "
                "that cache, set model.net.pretrained=false, or model.net.allow_random_init=true "
                "to go on with random weights"
            )
            if not pretrained or not allow_random_init:
                raise VebiError(message) from error
            warnings.warn(message, stacklevel=2)
            net = timm.create_model(name, pretrained=False, num_classes=num_classes)
        config = getattr(net, "pretrained_cfg", None) or {}
        mean = tuple(config.get("mean", IMAGENET_MEAN))
        std = tuple(config.get("std", IMAGENET_STD))
        super().__init__(OrderedDict(normalize=Normalize(mean, std), net=net))
        self.num_classes = num_classes
        self.input_size = tuple(config.get("input_size", (3, 224, 224)))
