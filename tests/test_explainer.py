"""Explainer: top-k relevant features, their maps, the combined map; artefact scores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.mining_models import mnist_subset, planted_colour_data, planted_colour_model
from vebi.errors import VebiError
from vebi.explain import PAPER_STYLE, Explainer, ExplanationStyle, Rules, backprop_feature
from vebi.explain.heatmaps import checkerboard_score, signal_to_heatmap, stride_periods
from vebi.mining import FeatureMiner
from vebi.models import SmallVGG
from vebi.models.hooks import capture_outputs


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
    explainer = Explainer(model, relevant, k=3, style=PAPER_STYLE)  # maps from activations
    first = explainer(images)
    assert explainer._copied == {"layer1.0.bn3"}  # the only output changed in place
    second = explainer(images)
    torch.testing.assert_close(second.maps, first.maps)
    for n in range(len(images)):
        for slot, feature in enumerate(first.features[n]):
            signal = backprop_feature(model, images[n : n + 1], feature.layer, feature.channel)
            expected = signal_to_heatmap(signal, "min_max")[0]
            torch.testing.assert_close(first.maps[n, slot], expected)


def _small_vgg_relevant(classes: int = 4):
    """A randomised SmallVGG (3 colour channels) and one relevant feature per class: channel
    c of relu2 for even classes, channel 2c of relu3 for odd ones, plus a second, weaker one."""
    import numpy as np

    from tests.explain_models import randomised
    from vebi.mining import RelevantFeatures
    from vebi.mining.features import FeatureIndex

    model = randomised(SmallVGG(num_classes=classes, in_channels=3), seed=3)
    index = FeatureIndex(("relu2", "relu3"), (32, 32))
    weights = np.zeros((index.size, classes))
    for c in range(classes):
        main = ("relu2", c) if c % 2 == 0 else ("relu3", 2 * c)
        weights[index.feature_id(*main), c] = 0.8
        weights[index.feature_id("relu3", 20 + c), c] = 0.3
    return model, RelevantFeatures(weights, index, list("abcd")[:classes], mu=1.0)


def test_class_conditioned_maps_start_from_gradient_times_activation() -> None:
    """Under the gradient rules a feature's class-conditioned map is the input gradient of
    sum max(a * g, 0) a_k at its channel, a * g Captum's LayerGradientXActivation of the class
    logit at that layer; the paper's style starts from a itself."""
    from captum.attr import LayerGradientXActivation

    model, relevant = _small_vgg_relevant()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    classes = torch.arange(4)
    gradient = Rules(relu="gradient", conv="standard", pool="standard")
    by_class = ExplanationStyle(conditioning="class")
    explanation = Explainer(model, relevant, k=2, rules=gradient, style=by_class)(images, classes)
    paper = Explainer(model, relevant, k=2, rules=gradient, style=PAPER_STYLE)(images, classes)
    modules = dict(model.named_modules())
    checked = 0
    for n, c in enumerate(classes.tolist()):
        for slot, feature in enumerate(explanation.features[n]):
            module = modules[feature.layer]
            image = images[n : n + 1].clone().requires_grad_(True)
            ga = LayerGradientXActivation(model, module).attribute(image, target=c).detach()
            start = ga[:, feature.channel].clamp_min(0)
            with capture_outputs(model, [feature.layer]) as captured:
                model(image)
            output = captured[feature.layer]
            if start.max() <= 0:  # no part raises the class: the activation is the start
                start = output.detach()[:, feature.channel]
            seed = torch.zeros_like(output)
            seed[:, feature.channel] = start
            (signal,) = torch.autograd.grad(output, image, grad_outputs=seed)
            torch.testing.assert_close(explanation.maps[n, slot], signal_to_heatmap(signal)[0])
            paper_signal = backprop_feature(
                model, image.detach(), feature.layer, feature.channel, rules=gradient
            )
            expected = signal_to_heatmap(paper_signal, "min_max")[0]
            torch.testing.assert_close(paper.maps[n, slot], expected)
            checked += 1
    assert checked == 8


def test_combined_map_weights_each_map_by_its_share_of_the_score() -> None:
    """combined = calibrate(sum_j s_j / sum_i s_i m_j), s_j = x_j w_jc; the paper's: max_j m_j."""
    from vebi.explain.heatmaps import calibrate

    model, relevant = _small_vgg_relevant()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    classes = torch.arange(4)
    explanation = Explainer(model, relevant, k=2)(images, classes)
    assert not explanation.fallback.any()
    for n in range(len(images)):
        scores = torch.tensor([f.score for f in explanation.features[n]])
        assert len(scores) >= 1 and (scores > 0).all()
        summed = (scores[:, None, None] / scores.sum() * explanation.maps[n]).sum(0)
        torch.testing.assert_close(explanation.combined[n], calibrate(summed[None])[0])
    style = ExplanationStyle(combination="max")
    maxed = Explainer(model, relevant, k=2, style=style)(images, classes)
    torch.testing.assert_close(maxed.combined, maxed.maps.amax(dim=1))
    paper = Explainer(model, relevant, k=2, style=PAPER_STYLE)(images, classes)
    torch.testing.assert_close(paper.combined, paper.maps.amax(dim=1))


def test_explanation_style_is_checked() -> None:
    for field in ("conditioning", "calibration", "combination"):
        with pytest.raises(VebiError, match=f"explanation.{field} must be one of"):
            ExplanationStyle(**{field: "sideways"})


def test_percentile_calibration_by_hand() -> None:
    """m / q clipped to 1, q the ceil(0.995 P)-th smallest of P pixels (the maximum when q is 0);
    min-max as the paper; a hot pixel leaves the rest of a percentile map where it was."""
    from vebi.explain.heatmaps import calibrate

    ramp = torch.arange(1000, dtype=torch.float32).view(1, 10, 100)  # q: the 995th value, 994
    torch.testing.assert_close(calibrate(ramp), (ramp / 994).clamp(max=1))
    hot = ramp.clone()
    hot[0, 9, 99] = 1e6  # the brightest pixel 1000 times brighter
    torch.testing.assert_close(calibrate(hot), calibrate(ramp))
    assert calibrate(hot, "min_max")[0, :9].max() < 0.001  # min-max: the rest squeezed to 0
    sparse = torch.zeros(1, 10, 100)
    sparse[0, 3, 3] = 2.0  # fewer non-zero pixels than 0.5 %: scaled by the maximum
    assert calibrate(sparse)[0, 3, 3] == 1 and calibrate(sparse).sum() == 1
    assert calibrate(torch.zeros(2, 4, 4)).eq(0).all()
    with pytest.raises(ValueError, match="calibration must be one of"):
        calibrate(ramp, "sideways")
