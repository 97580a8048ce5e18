"""A small VGG-style classifier with strided convolutions and overlapping max-pooling."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from vebi.models.normalize import Normalize


class SmallVGG(nn.Sequential):
    """normalize -> conv3x3 -> ReLU -> conv3x3/2 -> ReLU -> maxpool 3/2 (overlapping windows)
    -> conv3x3/2 -> BatchNorm -> ReLU -> global max pool -> flatten -> dropout -> linear.

    Total stride 8. Its strided convolutions and overlapping pools are what leave checkerboard
    artefacts in standard deconvnet visualisations (see ``vebi.explain``). Takes [0, 1] images.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 32),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        dropout: float = 0.2,
        inplace: bool = False,
    ) -> None:
        first, second, third = widths
        super().__init__(
            OrderedDict(
                normalize=Normalize(mean or (0.5,) * in_channels, std or (0.25,) * in_channels),
                conv1=nn.Conv2d(in_channels, first, 3, padding=1),
                relu1=nn.ReLU(inplace=inplace),
                conv2=nn.Conv2d(first, second, 3, stride=2, padding=1),
                relu2=nn.ReLU(inplace=inplace),
                pool2=nn.MaxPool2d(3, stride=2, padding=1),
                conv3=nn.Conv2d(second, third, 3, stride=2, padding=1),
                bn3=nn.BatchNorm2d(third),
                relu3=nn.ReLU(inplace=inplace),
                gmp=nn.AdaptiveMaxPool2d(1),
                flatten=nn.Flatten(),
                dropout=nn.Dropout(dropout),
                fc=nn.Linear(third, num_classes),
            )
        )
        self.num_classes = num_classes
