"""Deletion / insertion curves against hand-computed ones; the area and artefact metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vebi.errors import VebiError
from vebi.evaluation import CheckerboardScore, DeletionArea, InsertionArea, perturbation_curves
from vebi.evaluation.faithfulness import baseline_images, curve_area
from vebi.explain.heatmaps import checkerboard_score


def _linear_model() -> nn.Module:
    """Two classes on 1x2x2 images: logit_0 = 3 x_00 + 1 x_01 + 0 x_10 - 2 x_11, logit_1 = 0,
    so p_0 = sigmoid(logit_0)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[3.0, 1.0, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0]]))
    return model


def _sigmoid(values: list[float]) -> torch.Tensor:
    return torch.tensor([1 / (1 + math.exp(-v)) for v in values], dtype=torch.float64)


def test_known_deletion_and_insertion_curves() -> None:
    model = _linear_model()
    image = torch.ones(1, 1, 2, 2)
    heatmap = torch.tensor([[[0.9, 0.6], [0.3, 0.0]]])  # order: x00, x01, x10, x11
    classes = torch.tensor([0])
    deletion = perturbation_curves(model, image, heatmap, classes, "deletion", steps=4)
    # pixels removed one per step, highest first: logit 2 -> -1 -> -2 -> -2 -> 0
    assert torch.allclose(deletion[0], _sigmoid([2, -1, -2, -2, 0]), atol=1e-6)
    insertion = perturbation_curves(model, image, heatmap, classes, "insertion", steps=4)
    # revealed one per step on a zero image: logit 0 -> 3 -> 4 -> 4 -> 2
    assert torch.allclose(insertion[0], _sigmoid([0, 3, 4, 4, 2]), atol=1e-6)
    # two steps: two pixels per step
    half = perturbation_curves(model, image, heatmap, classes, "deletion", steps=2)
    assert torch.allclose(half[0], _sigmoid([2, -2, 0]), atol=1e-6)
    expected_area = (deletion[0].sum() - (deletion[0, 0] + deletion[0, -1]) / 2) / 4
    assert torch.isclose(curve_area(deletion)[0], expected_area)


def test_ties_are_taken_in_raster_order() -> None:
    """Equal values keep raster order (stable descending argsort): the two 0.7s go x01 then
    x10, the two 0.2s x00 then x11; a constant map is swept in raster order."""
    model = _linear_model()
    image = torch.ones(1, 1, 2, 2)
    classes = torch.tensor([0])
    tied = torch.tensor([[[0.2, 0.7], [0.7, 0.2]]])
    deletion = perturbation_curves(model, image, tied, classes, "deletion", steps=4)
    # logit 3 + 1 + 0 - 2 = 2; remove x01 (1), x10 (0), x00 (3), x11 (-2): 2 -> 1 -> 1 -> -2 -> 0
    # (the reverse tie order x10, x01, x11, x00 would give 2 -> 2 -> 1 -> 3 -> 0)
    assert torch.allclose(deletion[0], _sigmoid([2, 1, 1, -2, 0]), atol=1e-6)
    insertion = perturbation_curves(model, image, tied, classes, "insertion", steps=4)
    assert torch.allclose(insertion[0], _sigmoid([0, 1, 1, 4, 2]), atol=1e-6)
    constant = perturbation_curves(model, image, torch.full((1, 2, 2), 0.5), classes, "deletion", 4)
    assert torch.allclose(constant[0], _sigmoid([2, -1, -2, -2, 0]), atol=1e-6)
    # the area by hand: trapezoids of width 1/4 between the five points
    p = _sigmoid([2, 1, 1, -2, 0])
    by_hand = sum((p[i] + p[i + 1]) / 2 * 0.25 for i in range(4))
    assert torch.isclose(curve_area(deletion)[0], by_hand)


def test_area_is_rise_trapezoid_from_the_unperturbed_point() -> None:
    """RISE's auc: (sum(p) - p[0] / 2 - p[-1] / 2) / (len(p) - 1), i = 0 (no pixel changed)
    included, over the fraction in [0, 1]."""
    drop = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert curve_area(drop).item() == pytest.approx(0.125)  # one triangle of width 1/4
    flat = torch.full((1, 21), 0.3, dtype=torch.float64)
    assert curve_area(flat).item() == pytest.approx(0.3)
    line = torch.linspace(1, 0, 11, dtype=torch.float64)[None]
    assert curve_area(line).item() == pytest.approx(0.5)


def test_reversed_heatmap_gives_a_worse_deletion_area() -> None:
    model = _linear_model()
    image = torch.ones(1, 1, 2, 2)
    good = torch.tensor([[[0.9, 0.6], [0.3, 0.0]]])
    bad = 1 - good
    classes = torch.tensor([0])
    good_area = curve_area(perturbation_curves(model, image, good, classes, "deletion", 4))
    bad_area = curve_area(perturbation_curves(model, image, bad, classes, "deletion", 4))
    assert good_area < bad_area


def test_area_metrics_accumulate_over_batches_and_say_their_direction() -> None:
    curves = torch.rand(10, 6, dtype=torch.float64)
    metric = DeletionArea(steps=5)
    metric.update(curves=curves[:3])
    metric.update(curves=curves[3:])
    result = metric.compute()
    assert torch.allclose(result["curve"], curves.mean(0))
    assert torch.isclose(result["auc"], curve_area(curves).mean())
    assert DeletionArea.higher_is_better is False and InsertionArea.higher_is_better is True
    with pytest.raises(ValueError, match="curves must be"):
        metric.update(curves=torch.rand(2, 4))
    with pytest.raises(ValueError, match="needs model="):
        metric.update(torch.rand(2, 4, 4), images=torch.rand(2, 1, 4, 4), targets=torch.zeros(2))


def test_baselines_and_bad_settings() -> None:
    images = torch.rand(2, 3, 16, 16)
    assert baseline_images(images, "zero").abs().sum() == 0
    mean = baseline_images(images, "mean")
    assert torch.allclose(mean[:, :, 0, 0], images.mean(dim=(2, 3)))
    blurred = baseline_images(images, "blur")
    assert blurred.shape == images.shape and blurred.std() < images.std()
    with pytest.raises(VebiError, match="unknown baseline"):
        baseline_images(images, "noise")
    model = _linear_model()
    with pytest.raises(VebiError, match="mode"):
        perturbation_curves(
            model, torch.ones(1, 1, 2, 2), torch.ones(1, 2, 2), torch.tensor([0]), "removal"
        )
    with pytest.raises(VebiError, match="do not match"):
        perturbation_curves(
            model, torch.ones(1, 1, 2, 2), torch.ones(1, 3, 3), torch.tensor([0]), "deletion"
        )


def test_checkerboard_metric_is_the_mean_score() -> None:
    maps = torch.rand(6, 16, 16)
    metric = CheckerboardScore(periods=[2])
    metric.update(maps[:2])
    metric.update(maps[2:])
    assert torch.isclose(metric.compute().float(), checkerboard_score(maps, [2]).mean(), atol=1e-6)
    assert CheckerboardScore.higher_is_better is False


def test_curves_do_not_depend_on_the_batch_size() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    images, maps = torch.rand(7, 3, 10, 10), torch.rand(7, 10, 10)
    classes = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    default = perturbation_curves(model, images, maps, classes, "insertion", steps=6)
    one_at_a_time = perturbation_curves(model, images, maps, classes, "insertion", 6, batch_size=7)
    assert torch.allclose(default, one_at_a_time, atol=1e-6)


def test_shared_path_ends_follow_the_images_and_the_weights() -> None:
    """The ends of the paths (the images, the baseline) are computed once per batch for every
    method; a changed image, other images or changed weights are never served stale ones."""
    model = _linear_model()
    image = torch.ones(1, 1, 2, 2)
    heatmap = torch.tensor([[[0.9, 0.6], [0.3, 0.0]]])
    classes = torch.tensor([0])
    first = perturbation_curves(model, image, heatmap, classes, "deletion", steps=4)
    reversed_map = perturbation_curves(model, image, 1 - heatmap, classes, "deletion", steps=4)
    assert torch.allclose(first[0], _sigmoid([2, -1, -2, -2, 0]), atol=1e-6)
    assert torch.allclose(reversed_map[0], _sigmoid([2, 4, 4, 3, 0]), atol=1e-6)
    image.mul_(2)  # the same tensor, changed in place
    doubled = perturbation_curves(model, image, heatmap, classes, "deletion", steps=4)
    assert torch.allclose(doubled[0], _sigmoid([4, -2, -4, -4, 0]), atol=1e-6)
    with torch.no_grad():
        model[1].weight.mul_(-1)  # other weights, same model object
    negated = perturbation_curves(model, image, heatmap, classes, "deletion", steps=4)
    assert torch.allclose(negated[0], _sigmoid([-4, 2, 4, 4, 0]), atol=1e-6)
    other = perturbation_curves(model, torch.zeros(1, 1, 2, 2), heatmap, classes, "deletion", 4)
    assert torch.allclose(other[0], _sigmoid([0, 0, 0, 0, 0]), atol=1e-6)
