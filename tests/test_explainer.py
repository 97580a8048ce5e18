"""Explainer: top-k relevant features, their maps, the combined map; artefact scores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.mining_models import mnist_subset, planted_colour_data, planted_colour_model
from vebi.errors import VebiError
from vebi.explain import Explainer, Rules, backprop_feature
from vebi.explain.heatmaps import checkerboard_score, signal_to_heatmap, stride_periods
from vebi.mining import FeatureMiner
from vebi.models import SmallVGG


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    model, data = planted_colour_model(), planted_colour_data()
    cache = tmp_path_factory.mktemp("cache")
    relevant = FeatureMiner(mu=5.0, cache_dir=cache, progress=False).mine(model, data).relevant
    return model, data, relevant


def test_explanation_points_at_the_deciding_blob(planted) -> None:
    model, data, relevant = planted
    images, labels = data.tensors[0][::20], data.tensors[1][::20]
    explainer = Explainer(model, relevant, k=3)
    explanation = explainer(images)
    assert torch.equal(explanation.classes, labels)
    # k is capped at the most relevant features any class has (no empty slots beyond them)
    assert explainer.k == min(3, int(relevant.relevant_mask().sum(axis=0).max()))
    assert explanation.maps.shape == (len(images), explainer.k, 8, 8)
    assert explanation.maps.min() >= 0 and explanation.maps.max() <= 1
    torch.testing.assert_close(explanation.combined, explanation.maps.amax(dim=1))
    for n, c in enumerate(labels.tolist()):
        assert explanation.features[n][0].channel == c and explanation.features[n][0].score > 0
        blob = images[n, c] == 1.0
        assert explanation.combined[n][blob].mean() > 2 * explanation.combined[n][~blob].mean()
    assert not explanation.fallback.any()


def test_batched_slots_equal_single_backprops(planted) -> None:
    model, data, relevant = planted
    images = data.tensors[0][::25]
    rules = Rules(relu="deconvnet", conv="standard", pool="standard")
    explanation = Explainer(model, relevant, k=2, rules=rules)(images)
    for n in range(len(images)):
        for slot, feature in enumerate(explanation.features[n]):
            image = images[n : n + 1]
            signal = backprop_feature(model, image, feature.layer, feature.channel, rules=rules)
            torch.testing.assert_close(explanation.maps[n, slot], signal_to_heatmap(signal)[0])


def test_targets_and_fallback(planted) -> None:
    model, data, relevant = planted
    images = data.tensors[0][:2]
    explanation = Explainer(model, relevant, k=1)(images, targets=torch.tensor([2, 2]))
    assert explanation.classes.tolist() == [2, 2]
    assert explanation.features[0][0].channel == 2
    blank = torch.zeros(1, 3, 8, 8)  # nothing fires: x = 0, every score is 0
    explanation = Explainer(model, relevant, k=2)(blank, targets=torch.tensor([1]))
    assert explanation.fallback.tolist() == [True]
    top = relevant.relevant(1)[: len(explanation.features[0])]
    assert [(f.layer, f.channel) for f in explanation.features[0]] == [
        (f.layer, f.channel) for f in top
    ]


def test_class_count_mismatch_is_refused(planted) -> None:
    _, data, relevant = planted
    other = planted_colour_model()
    other.fc = torch.nn.Linear(6, 4)
    with pytest.raises(VebiError, match="4 outputs but the relevant features were mined for 3"):
        Explainer(other, relevant)(data.tensors[0][:1])


def test_checkerboard_score_definition() -> None:
    rows = torch.arange(16).view(-1, 1).expand(16, 16)
    checkerboard = ((rows + rows.T) % 2).float()
    assert checkerboard_score(checkerboard, [2]).item() == pytest.approx(1.0)
    smooth = torch.exp(-((rows - 8.0) ** 2 + (rows.T - 8.0) ** 2) / 20)
    assert checkerboard_score(smooth, [2]).item() < 1e-3
    mixed = smooth + 0.1 * checkerboard
    assert 0.0 < checkerboard_score(mixed, [2]).item() < 1.0
    assert checkerboard_score(torch.zeros(4, 4), [2]).item() == 0.0


def test_stride_fix_lowers_artefacts_on_a_trained_net(mnist_root) -> None:
    """A net with strided convolutions and overlapping pools, trained on real digits."""
    data = mnist_subset(mnist_root, 4064)
    images, labels = data.tensors
    torch.manual_seed(0)
    model = SmallVGG(in_channels=1)
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for start in [*range(0, 4000, 100)] * 2:
        loss = F.cross_entropy(model(images[start : start + 100]), labels[start : start + 100])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    test = images[4000:]
    assert (model(test).argmax(1) == labels[4000:]).float().mean() > 0.8
    periods = stride_periods(model)[:1]
    assert periods == [2]
    for layer in ("relu3", "relu2"):
        scores = {}
        for conv in ("standard", "stride_fix"):
            signal = backprop_feature(model, test, layer, 3, rules=Rules(relu="guided", conv=conv))
            scores[conv] = checkerboard_score(signal_to_heatmap(signal), periods).mean().item()
        assert scores["stride_fix"] < 0.5 * scores["standard"], scores


def test_resnet_with_in_place_additions_equals_single_backprops() -> None:
    """torchvision's Bottleneck adds the shortcut in place onto bn3's output: the explainer
    copies such captured outputs (found on the first call) and no others, with the same maps
    as one backprop per feature, on the first call and on later ones."""
    import numpy as np
    import torchvision

    from tests.explain_models import randomised
    from vebi.mining import RelevantFeatures
    from vebi.mining.features import FeatureIndex

    model = randomised(torchvision.models.resnet50(num_classes=4))
    for module in model.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = True
    layers = ("layer1.0.bn3", "layer2.0.conv2", "layer3.1.relu")
    index = FeatureIndex(layers, (256, 128, 1024))
    weights = np.zeros((index.size, 4))
    for c in range(4):
        chosen = [("layer1.0.bn3", 3 + c), ("layer2.0.conv2", c), ("layer3.1.relu", 7 * c)]
        weights[[index.feature_id(*feature) for feature in chosen], c] = [0.5, 0.3, 0.2]
    relevant = RelevantFeatures(weights, index, list("abcd"), mu=1.0)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    explainer = Explainer(model, relevant, k=3)
    first = explainer(images)
    assert explainer._copied == {"layer1.0.bn3"}  # the only output changed in place
    second = explainer(images)
    torch.testing.assert_close(second.maps, first.maps)
    for n in range(len(images)):
        for slot, feature in enumerate(first.features[n]):
            signal = backprop_feature(model, images[n : n + 1], feature.layer, feature.channel)
            torch.testing.assert_close(first.maps[n, slot], signal_to_heatmap(signal)[0])
