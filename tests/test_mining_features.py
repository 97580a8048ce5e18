"""Aggregated responses, layer selection and the feature index."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from tests.mining_models import planted_colour_model, seeded_lenet
from vebi.errors import VebiError
from vebi.mining import FeatureExtractor, FeatureIndex, FeatureMiner, default_feature_layers
from vebi.mining.features import NonFiniteActivationError


def test_feature_index_round_trip() -> None:
    index = FeatureIndex(("a", "b", "c"), (2, 3, 1))
    assert index.size == 6 and index.offsets == (0, 2, 5)
    for f in range(6):
        assert index.feature_id(*index.locate(f)) == f
    assert index.locate(4) == ("b", 2)
    assert index.layer_of_each_feature() == ["a", "a", "b", "b", "b", "c"]
    with pytest.raises(IndexError):
        index.feature_id("b", 3)
    with pytest.raises(IndexError):
        index.locate(6)


def test_default_layers_of_lenet() -> None:
    every = default_feature_layers(seeded_lenet(), torch.rand(1, 1, 28, 28), views="every")
    assert every == ["conv1", "pool1", "conv2", "pool2", "conv3", "relu3"]
    # one view per tensor: conv3 goes straight into relu3, one feature layer (relu3's)
    layers = default_feature_layers(seeded_lenet(), torch.rand(1, 1, 28, 28))
    assert layers == ["conv1", "pool1", "conv2", "pool2", "relu3"]


def test_one_view_per_tensor() -> None:
    """conv -> bn -> relu is one layer (the relu's), in place or not; a global pooling of a
    layer is left out, a pooling that keeps a map is not; views=every keeps them all."""
    from vebi.models import SmallVGG

    net = SmallVGG(num_classes=4, in_channels=3).eval()
    images = torch.rand(1, 3, 32, 32)
    assert default_feature_layers(net, images) == ["relu1", "relu2", "pool2", "relu3"]
    every = default_feature_layers(net, images, views="every")
    assert every == [
        "conv1", "relu1", "conv2", "relu2", "pool2", "conv3", "bn3", "relu3", "gmp"
    ]  # fmt: skip
    in_place = SmallVGG(num_classes=4, in_channels=3, inplace=True).eval()
    assert default_feature_layers(in_place, images) == ["relu1", "relu2", "pool2", "relu3"]
    resnet = torchvision.models.resnet18(num_classes=5).eval()  # in-place ReLU after bn1
    layers = default_feature_layers(resnet, torch.rand(1, 3, 64, 64))
    assert layers[:2] == ["relu", "maxpool"] and layers[-1] == "layer4.1"  # avgpool: a copy
    with pytest.raises(VebiError, match="views must be one of"):
        default_feature_layers(net, images, views="some")


def test_default_layers_of_resnet_and_vgg() -> None:
    resnet = torchvision.models.resnet18(num_classes=5).eval()
    layers = default_feature_layers(resnet, torch.rand(1, 3, 64, 64), views="every")
    assert layers[0] == "conv1" and "fc" not in layers and layers[-1] == "avgpool"
    assert "layer4.1" in layers and not any(name.startswith("layer4.1.") for name in layers)
    vgg = torchvision.models.vgg11(num_classes=4).eval()
    layers = default_feature_layers(vgg, torch.rand(1, 3, 32, 32), views="every")
    assert "classifier.6" not in layers and "classifier.5" not in layers  # logits, dropout
    assert layers[-1] == "classifier.4" and "avgpool" in layers


def _manual_x(activations: list[np.ndarray], statistic: str) -> np.ndarray:
    parts = []
    for a in activations:  # (N, K, H, W)
        if statistic == "energy":
            s = (a**2).sum(axis=(2, 3))
        elif statistic == "mean":
            s = a.mean(axis=(2, 3))
        else:
            s = a.max(axis=(2, 3))
        parts.append(s / np.abs(s).sum(axis=1, keepdims=True))
    x = np.concatenate(parts, axis=1)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("statistic", ["energy", "mean", "max"])
def test_aggregation_matches_hand_computation(statistic: str) -> None:
    # in-place ReLU after conv: conv's response must be taken before the ReLU overwrites it
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(2, 4, 3),
            relu=nn.ReLU(inplace=True),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(4, 3),
        )
    ).eval()
    images = torch.rand(5, 2, 6, 6)
    with torch.no_grad():
        conv = model.conv(images).numpy()
    relu = np.maximum(conv, 0)
    pooled = relu.mean(axis=(2, 3), keepdims=True)
    with FeatureExtractor(model, ["conv", "relu", "pool"], aggregation=statistic) as extractor:
        x, logits = extractor(images)
    assert logits.shape == (5, 3)
    assert extractor.index == FeatureIndex(("conv", "relu", "pool"), (4, 4, 4))
    np.testing.assert_allclose(
        x.numpy(), _manual_x([conv, relu, pooled], statistic), rtol=1e-5, atol=1e-7
    )


def test_all_zero_layer_gives_zeros_not_nan() -> None:
    model = planted_colour_model()
    with FeatureExtractor(model, ["feat", "relu"]) as extractor:
        x, _ = extractor(torch.zeros(2, 3, 8, 8))
    assert torch.equal(x, torch.zeros(2, 12))


def test_unknown_layer_lists_available_names() -> None:
    with pytest.raises(VebiError, match=r"unknown layer\(s\) \['conv9'\].*conv1, pool1, conv2"):
        FeatureExtractor(seeded_lenet(), ["conv1", "conv9"])


def test_hooks_are_removed_even_on_error() -> None:
    model = seeded_lenet()
    with pytest.raises(RuntimeError, match="boom"), FeatureExtractor(model, ["conv1", "conv2"]):
        assert model.conv1._forward_hooks
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())


class _InfForBrightImages(nn.Module):
    """Divides by zero for images whose pixel sum exceeds 100."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        keep = (images.flatten(1).sum(1) < 100).float().view(-1, 1, 1, 1)
        return images / keep


def test_nan_activation_names_layer_and_batch(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            blowup=_InfForBrightImages(),
            conv=nn.Conv2d(1, 2, 3),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(2, 3),
        )
    ).eval()
    images = torch.full((30, 1, 28, 28), 0.01)
    images[25] = 1.0  # in batch 2 of 10
    data = torch.utils.data.TensorDataset(images, torch.arange(30) % 3)
    miner = FeatureMiner(batch_size=10, cache_dir=tmp_path, progress=False)
    with pytest.raises(
        NonFiniteActivationError,
        match=r"layer blowup produced NaN/Inf .* batch 2 \(data rows 20..29\)",
    ):
        miner.mine(model, data)
    assert not list(tmp_path.glob("*.h5"))  # no finished cache from a failed run
    assert all(not m._forward_hooks for m in model.modules())


def test_nan_input_is_reported() -> None:
    images = torch.rand(2, 1, 28, 28)
    images[1, 0, 3, 3] = float("nan")
    with (
        pytest.raises(NonFiniteActivationError, match="input images in batch 7"),
        FeatureExtractor(seeded_lenet(), ["conv1"]) as extractor,
    ):
        extractor(images, batch_label=" in batch 7")


def test_nan_weights_are_reported_with_the_layer() -> None:
    model = seeded_lenet()
    with torch.no_grad():
        model.conv2.weight[3] = float("nan")
    with (
        pytest.raises(NonFiniteActivationError, match="layer conv2 produced NaN/Inf .* batch 0"),
        FeatureExtractor(model, ["conv1", "conv2", "conv3"]) as extractor,
    ):
        extractor(torch.rand(4, 1, 28, 28), batch_label=" in batch 0")


def test_default_layers_of_a_resnet_are_its_block_outputs() -> None:
    """A ResNet's residual blocks count as one layer each (their inner layers are left out);
    the stem and the average pool stay, the logits do not."""
    from vebi.models import TorchvisionClassifier

    torch.manual_seed(0)
    model = TorchvisionClassifier("resnet18", num_classes=5).eval()
    images = torch.rand(1, 3, 64, 64)
    layers = default_feature_layers(model, images, views="every")
    blocks = [f"net.layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert layers == ["net.conv1", "net.bn1", "net.relu", "net.maxpool", *blocks, "net.avgpool"]
    with FeatureExtractor(model, layers) as extractor:
        x, _ = extractor(images)
    assert x.shape == (1, 4 * 64 + 2 * (64 + 128 + 256 + 512) + 512)
    one = default_feature_layers(model, images)  # one view per tensor: the stem's relu
    assert one == ["net.relu", "net.maxpool", *blocks]


def test_layers_selected_by_glob_type_or_name() -> None:
    from vebi.mining.features import select_feature_layers
    from vebi.models import TorchvisionClassifier

    torch.manual_seed(0)
    model = TorchvisionClassifier("resnet18", num_classes=5).eval()
    images = torch.rand(1, 3, 64, 64)
    # types and globs: the matches in the order they run
    assert select_feature_layers(model, images, ["net.avgpool", "type:BasicBlock"]) == [
        *(f"net.layer{i}.{j}" for i in range(1, 5) for j in range(2)),
        "net.avgpool",
    ]
    assert select_feature_layers(model, images, ["net.layer4.*.conv?"]) == [
        "net.layer4.0.conv1",
        "net.layer4.0.conv2",
        "net.layer4.1.conv1",
        "net.layer4.1.conv2",
    ]
    # plain names: kept as given
    assert select_feature_layers(model, images, ["net.layer2", "net.conv1"]) == [
        "net.layer2",
        "net.conv1",
    ]
    assert select_feature_layers(model, images, None) == default_feature_layers(model, images)
    with pytest.raises(VebiError, match=r"'type:Bottleneck' matches no module.*BasicBlock"):
        select_feature_layers(model, images, ["type:Bottleneck"])
    with pytest.raises(VebiError, match="unknown layer"):
        select_feature_layers(model, images, ["net.nothing"])
