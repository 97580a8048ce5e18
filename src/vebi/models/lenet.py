"""LeNet as in docs/method.md, section 6 (the Caffe MNIST LeNet, fully convolutional)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from vebi.models.normalize import Normalize

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


class LeNet(nn.Sequential):
    """normalize -> conv5x5x20 -> maxpool 2/2 -> conv5x5x50 -> maxpool 2/2 -> conv4x4x500 -> ReLU
    -> conv1x1xC -> flatten.

    On 28x28 inputs the spatial sizes are 24, 12, 8, 4, 1, so the last two layers act as fully
    connected layers. Named children (``conv1`` ... ``conv4``) are the layer names used for
    feature mining and explanation; ``conv4`` gives the logits.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        mean: Sequence[float] = MNIST_MEAN,
        std: Sequence[float] = MNIST_STD,
    ) -> None:
        super().__init__(
            OrderedDict(
                normalize=Normalize(mean, std),
                conv1=nn.Conv2d(in_channels, 20, kernel_size=5),
                pool1=nn.MaxPool2d(kernel_size=2, stride=2),
                conv2=nn.Conv2d(20, 50, kernel_size=5),
                pool2=nn.MaxPool2d(kernel_size=2, stride=2),
                conv3=nn.Conv2d(50, 500, kernel_size=4),
                relu3=nn.ReLU(),
                conv4=nn.Conv2d(500, num_classes, kernel_size=1),
                flatten=nn.Flatten(),
            )
        )
        self.num_classes = num_classes
