"""Small models and data sets for the mining tests (real MNIST digits, a planted colour task)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.utils.data import TensorDataset

from vebi.models import LeNet


def planted_colour_data(per_class: int = 60, seed: int = 0) -> TensorDataset:
    """3 classes of 3x8x8 images: noise everywhere plus a bright 3x3 blob in colour ``c``.

    Only the colour of the blob tells the classes apart.
    """
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c in range(3):
        batch = torch.rand(per_class, 3, 8, 8, generator=generator) * 0.3
        for i in range(per_class):
            top, left = torch.randint(0, 6, (2,), generator=generator).tolist()
            batch[i, c, top : top + 3, left : left + 3] = 1.0
        images.append(batch)
        labels.append(torch.full((per_class,), c))
    return TensorDataset(torch.cat(images), torch.cat(labels))


def planted_colour_model() -> nn.Sequential:
    """feat: channel k < 3 copies colour k (the deciding channels); channels 3..5 mix all
    colours equally (the same response for every class). Class c's logit reads feat/c."""
    feat = nn.Conv2d(3, 6, kernel_size=1, bias=False)
    fc = nn.Linear(6, 3, bias=False)
    with torch.no_grad():
        feat.weight.zero_()
        for k in range(3):
            feat.weight[k, k] = 1.0
        feat.weight[3] = 1.0
        feat.weight[4] = 0.5
        feat.weight[5] = 0.2
        fc.weight.zero_()
        fc.weight[:, :3] = torch.eye(3)
    return nn.Sequential(
        OrderedDict(
            feat=feat,
            relu=nn.ReLU(),
            pool=nn.AdaptiveMaxPool2d(1),
            flatten=nn.Flatten(),
            fc=fc,
        )
    ).eval()


def seeded_lenet(seed: int = 0) -> LeNet:
    torch.manual_seed(seed)
    return LeNet().eval()


def mnist_subset(root, size: int) -> TensorDataset:
    from vebi.data import MNISTDataModule

    datamodule = MNISTDataModule(data_dir=root)
    datamodule.setup()
    images, labels = datamodule.data_train.tensors
    return TensorDataset(images[:size].clone(), labels[:size].clone())
