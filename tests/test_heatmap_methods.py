"""The heatmap methods of the evaluators: registered in the config, checked against
hand-computed references (Grad-CAM, gradient), and the localisation of the top unit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from tests.explain_models import randomised
from tests.mining_models import planted_colour_data, planted_colour_model
from vebi.errors import VebiError
from vebi.evaluation import (
    CheckerboardScore,
    DeletionArea,
    InsertionArea,
    PointingGame,
    StrictPointingGame,
)
from vebi.evaluation.data import ClassImages, EvaluationSet
from vebi.evaluation.heatmaps import HeatmapEvaluation
from vebi.evaluation.methods import (
    CaptumAttribution,
    CentreGaussian,
    GradCAM,
    TopUnitActivation,
    UniformRandom,
    VebiExplanation,
    last_spatial_layer,
)
from vebi.explain.explainer import Explainer
from vebi.explain.heatmaps import signal_to_heatmap
from vebi.mining.features import FeatureIndex, default_feature_layers
from vebi.mining.relevant import RelevantFeatures
from vebi.models import SmallVGG
from vebi.models.hooks import trace_leaf_calls
from vebi.pipelines.evaluate import build_methods


def _small_vgg() -> SmallVGG:
    torch.manual_seed(0)  # the convolutions' initial weights, whatever ran before
    return randomised(SmallVGG(num_classes=4, in_channels=3, widths=(8, 12, 16)), seed=1).eval()


def _random_relevant(
    model: torch.nn.Module, images: torch.Tensor, classes: int
) -> RelevantFeatures:
    """A few relevant features per class in every mined layer (random sparse weights)."""
    layers = default_feature_layers(model, images[:1])
    shapes = dict(trace_leaf_calls(model, images[:1]))
    index = FeatureIndex(tuple(layers), tuple(shapes[layer][1] for layer in layers))
    rng = np.random.default_rng(0)
    weights = np.where(
        rng.random((index.size, classes)) < 0.05, rng.random((index.size, classes)), 0
    )
    return RelevantFeatures(weights, index, [f"c{c}" for c in range(classes)], mu=1.0)


def test_configured_methods_all_give_maps_in_unit_range(compose_cfg) -> None:
    cfg = compose_cfg("evaluate", ["experiment=an8flower_double"])
    model = _small_vgg()
    images = torch.rand(5, 3, 32, 32)
    relevant = _random_relevant(model, images, 4)
    training = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(16) % 4
    notes: list[str] = []
    methods = build_methods(
        cfg, model, relevant, notes, training=ClassImages(TensorDataset(training, labels))
    )
    # every registered method, in order (the peers are installed by make setup)
    assert list(methods) == list(cfg.evaluation.methods), notes
    assert not notes
    classes = torch.tensor([0, 1, 2, 3, 0])
    for name, method in methods.items():
        maps = method(images, classes)
        assert maps.shape == (5, 32, 32), name
        assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1, name
    cfg.evaluation.select = ["gradcam", "nope"]
    with pytest.raises(VebiError, match="unknown heatmap method"):
        build_methods(cfg, model, relevant)


def test_gradcam_matches_the_hand_computed_formula() -> None:
    model = _small_vgg()
    images = torch.rand(3, 3, 32, 32)
    classes = torch.tensor([2, 0, 3])
    assert last_spatial_layer(model, images) == "relu3"
    captured = {}
    handle = model.relu3.register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
    logits = model(images)
    handle.remove()
    activation = captured["a"]
    (grad,) = torch.autograd.grad(logits[torch.arange(3), classes].sum(), activation)
    cam = (grad.mean(dim=(2, 3), keepdim=True) * activation).sum(1, keepdim=True).clamp_min(0)
    cam = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    low = cam.flatten(1).min(1).values.view(-1, 1, 1)
    high = cam.flatten(1).max(1).values.view(-1, 1, 1)
    expected = (cam - low) / (high - low)
    maps = GradCAM(model, None, calibration="min_max")(images, classes)
    assert torch.allclose(maps, expected.detach(), atol=1e-5)
    # the default calibration: divided by the 99.5th percentile (numpy's inverted-CDF
    # quantile: the smallest pixel value with at least 99.5 % of the pixels at or below it)
    quantile = np.quantile(cam.detach().flatten(1).numpy(), 0.995, axis=1, method="inverted_cdf")
    expected = (cam.detach() / torch.as_tensor(quantile).view(-1, 1, 1).float()).clamp(0, 1)
    assert (quantile > 0).all()
    torch.testing.assert_close(GradCAM(model, None)(images, classes), expected)


def test_gradient_is_the_absolute_input_gradient() -> None:
    model = _small_vgg()
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    classes = torch.tensor([1, 3])
    (grad,) = torch.autograd.grad(model(images)[torch.arange(2), classes].sum(), images)
    expected = signal_to_heatmap(grad.abs())
    maps = CaptumAttribution(model, None, "gradient")(images.detach(), classes)
    assert torch.allclose(maps, expected, atol=1e-5)
    with pytest.raises(VebiError, match="unknown Captum algorithm"):
        CaptumAttribution(model, None, "lrp")


def _planted_relevant() -> RelevantFeatures:
    index = FeatureIndex(("feat", "relu"), (6, 6))
    weights = np.zeros((12, 3))
    for c in range(3):
        weights[6 + c, c] = 1.0  # relu channel c decides class c
    return RelevantFeatures(weights, index, ["red", "green", "blue"], mu=1.0)


def test_top_unit_and_ours_point_at_the_deciding_blob() -> None:
    model = planted_colour_model()
    images, labels = planted_colour_data(per_class=10).tensors
    # the blob: the 3x3 square where the image's own colour channel is 1
    masks = images[torch.arange(len(images)), labels] == 1.0
    relevant = _planted_relevant()
    # 8 x 8 images: every pixel is within PointingGame's default 15 px of every blob, so the
    # game without tolerance (the metric's behaviour before the tolerance was added)
    for method in (TopUnitActivation(model, relevant), VebiExplanation(model, relevant, k=1)):
        pointing = StrictPointingGame()
        pointing.update(method(images, labels), masks)
        assert pointing.compute() == 1.0, type(method).__name__
    control = StrictPointingGame()
    control.update(CentreGaussian(model, relevant)(images, labels), masks)
    assert control.compute() < 1.0


def test_best_feature_is_the_first_map_of_the_explainer() -> None:
    model = planted_colour_model()
    images, labels = planted_colour_data(per_class=4).tensors
    relevant = _planted_relevant()
    best = VebiExplanation(model, relevant, combine="best")(images, labels)
    assert torch.equal(best, Explainer(model, relevant, k=1)(images, labels).maps[:, 0])
    with pytest.raises(VebiError, match="combine"):
        VebiExplanation(model, relevant, combine="mean")


def test_controls() -> None:
    images = torch.zeros(2, 1, 9, 11)
    gaussian = CentreGaussian(None, None, sigma=0.2)(images, torch.tensor([0, 1]))
    assert gaussian[0, 4, 5] == 1.0 and torch.equal(gaussian[0], gaussian[1])
    assert torch.allclose(gaussian[0], gaussian[0].flip(0)) and gaussian[0, 0, 0] < 0.1
    first = UniformRandom(None, None, seed=3)(images, torch.tensor([0, 1]))
    again = UniformRandom(None, None, seed=3)(images, torch.tensor([0, 1]))
    assert torch.equal(first, again) and not torch.equal(first[0], first[1])
    with pytest.raises(VebiError, match="sigma"):
        CentreGaussian(None, None, sigma=0)


def test_scorer_checks_maps_and_skips_localisation_without_masks() -> None:
    model = planted_colour_model()
    images, labels = planted_colour_data(per_class=4).tensors
    metrics = {
        "pointing": PointingGame(),
        "deletion": DeletionArea(steps=4),
        "insertion": InsertionArea(steps=4, baseline="blur"),
        "artefacts": CheckerboardScore([2]),
    }
    scorer = HeatmapEvaluation(metrics, batch_size=5)
    chosen, notes = scorer.applicable(model, has_masks=False)
    assert set(chosen) == {"deletion", "insertion", "artefacts"}
    assert notes == ["pointing_game skipped: the data set has no ground-truth masks"]
    results = scorer(
        model,
        {"centre": CentreGaussian(model, None)},
        EvaluationSet.from_tensors(images, labels),
        progress=False,
    )
    assert "iou_mean" not in results["centre"] and "pointing_game" not in results["centre"]
    assert {"deletion_auc", "insertion_auc", "artefact_score"} <= set(results["centre"])

    class Broken(CentreGaussian):
        def __call__(self, images, classes):
            return super().__call__(images, classes) * 2

    with pytest.raises(VebiError, match=r"outside \[0, 1\]"):
        scorer(
            model,
            {"broken": Broken(model, None)},
            EvaluationSet.from_tensors(images, labels),
            progress=False,
        )


def test_empty_test_split_is_an_error() -> None:
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 1, 4, 4), torch.zeros(0).long())
    with pytest.raises(VebiError, match="test split is empty"):
        EvaluationSet.from_dataset(empty)


def test_balanced_subset_takes_each_class_in_turn() -> None:
    from vebi.evaluation.heatmaps import balanced_subset

    labels = torch.tensor([0] * 50 + [1] * 5 + [2] * 30)
    chosen = balanced_subset(labels, 12, seed=0)
    assert torch.equal(chosen, chosen.sort().values) and len(set(chosen.tolist())) == 12
    assert torch.bincount(labels[chosen], minlength=3).tolist() == [4, 4, 4]
    few = balanced_subset(labels, 21, seed=0)  # class 1 has only 5: the others fill up
    assert torch.bincount(labels[few], minlength=3).tolist() == [8, 5, 8]
    assert torch.equal(balanced_subset(labels, None, seed=0), torch.arange(85))
