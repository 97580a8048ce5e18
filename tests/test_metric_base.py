"""The metrics' shared parts: the mean over images (merged as DDP merges it), abstract methods,
the end points shared between methods, a pure skip check and the one "is it a metric" check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torchmetrics.utilities.data import dim_zero_sum

from vebi.errors import VebiError
from vebi.evaluation import (
    CheckerboardScore,
    DeletionArea,
    HeatmapEvaluation,
    HeatmapMetric,
    InsertionArea,
    MeanThresholdIoU,
    PointingGame,
    RelevanceMass,
    StrictPointingGame,
    ThresholdIoU,
    perturbation_curves,
)
from vebi.evaluation.data import EvaluationSet
from vebi.evaluation.faithfulness import EndpointCache
from vebi.evaluation.methods import CentreGaussian
from vebi.evaluation.metric_base import MeanOverImages, check_metric
from vebi.pipelines.evaluate import build_metrics


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    maps = torch.rand(9, 12, 12, generator=generator)
    masks = torch.rand(9, 12, 12, generator=generator) > 0.6
    masks[3] = False  # an image left out (empty mask)
    curves = torch.rand(9, 5, generator=generator, dtype=torch.float64)
    return maps, masks, curves


def _metrics() -> dict[str, MeanOverImages]:
    return {
        "iou": ThresholdIoU(),
        "iou_at_mean": MeanThresholdIoU(),
        "pointing": PointingGame(tolerance=1),
        "strict": StrictPointingGame(),
        "mass": RelevanceMass(),
        "deletion": DeletionArea(steps=4),
        "artefacts": CheckerboardScore([2]),
    }


def _update(metric: MeanOverImages, rows: slice) -> None:
    maps, masks, curves = _data()
    if isinstance(metric, DeletionArea):
        metric.update(curves=curves[rows])
    else:
        metric.update(maps[rows], masks[rows])


def test_every_mean_metric_keeps_one_total_and_count() -> None:
    for name, metric in _metrics().items():
        assert isinstance(metric, MeanOverImages), name
        assert {"total", "count"} <= set(metric.metric_state), name
        assert all(fx is dim_zero_sum for fx in metric._reductions.values()), name


def test_summed_states_of_two_halves_give_the_mean_of_all() -> None:
    """What ``dist_reduce_fx="sum"`` does under DDP: the states of two instances, each updated
    on one half (uneven: 5 and 4 images), summed into one; its compute and result are those of
    one instance updated on all 9 images."""
    for name in _metrics():
        whole, first, second = (_metrics()[name] for _ in range(3))
        _update(whole, slice(0, 9))
        _update(first, slice(0, 5))
        _update(second, slice(5, 9))
        for state in first.metric_state:
            setattr(first, state, getattr(first, state) + getattr(second, state))
        merged, expected = first.result(), whole.result()
        assert merged.keys() == expected.keys(), name
        for key, value in expected.items():
            assert np.allclose(merged[key], value, rtol=1e-12, atol=1e-12), (name, key)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_empty_means_are_as_before() -> None:
    """No image scored: NaN for localisation (no image had a mask), 0 for the others."""
    for name, metric in _metrics().items():
        if isinstance(metric, DeletionArea):
            assert metric.result()["deletion_auc"] == 0.0
        elif isinstance(metric, CheckerboardScore):
            assert metric.result() == {"artefact_score": 0.0}
        else:
            metric.update(torch.rand(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool))
            assert math.isnan(metric.result()[metric.name]), name


def test_update_and_compute_are_abstract() -> None:
    class NoUpdate(HeatmapMetric):
        name, group, higher_is_better = "none", "artefacts", True

        def compute(self) -> torch.Tensor:
            return torch.zeros(())

    class NoScores(MeanOverImages):
        name, group, higher_is_better = "none", "artefacts", True

    class Ones(MeanOverImages):
        name, group, higher_is_better = "ones", "artefacts", True

        def update(self, heatmaps: torch.Tensor, masks: torch.Tensor | None = None, **_) -> None:
            self._add_scores(torch.ones(len(heatmaps)))

    with pytest.raises(TypeError, match="abstract"):
        NoUpdate()
    with pytest.raises(TypeError, match="abstract"):
        NoScores()
    ones = Ones()
    ones.update(torch.rand(3, 4, 4))
    assert ones.result() == {"ones": 1.0}


def _counting_model() -> tuple[nn.Module, list[int]]:
    seen: list[int] = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    model.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    return model, seen


def test_endpoints_are_shared_through_an_explicit_cache() -> None:
    """With a cache the images' and the baseline's probabilities are computed once for every
    method; without one each call computes its own; the curves are the same either way."""
    torch.manual_seed(0)
    model, seen = _counting_model()
    images, classes = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    maps = [torch.rand(4, 4, 4) for _ in range(3)]
    alone = [perturbation_curves(model, images, m, classes, "deletion", 4) for m in maps]
    forwards_alone = sum(seen)
    seen.clear()
    cache = EndpointCache()
    shared = [
        perturbation_curves(model, images, m, classes, "deletion", 4, endpoints=cache) for m in maps
    ]
    assert sum(seen) == forwards_alone - 2 * 2 * len(images)  # ends of methods 2 and 3
    for one, other in zip(alone, shared, strict=True):
        assert torch.equal(one, other)
    # other images (another tensor): the cache starts again instead of serving stale ends
    doubled = images * 2
    other = perturbation_curves(model, doubled, maps[0], classes, "deletion", 4, endpoints=cache)
    assert torch.equal(other, perturbation_curves(model, doubled, maps[0], classes, "deletion", 4))
    cache.clear()
    assert cache._known == {} and cache._images is None and cache._model is None


def test_the_evaluation_shares_endpoints_between_methods_and_batches_do_not_mix() -> None:
    torch.manual_seed(0)
    model, seen = _counting_model()

    images, labels = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    data = EvaluationSet.from_tensors(images, labels)
    metrics = {"deletion": DeletionArea(steps=4), "insertion": InsertionArea(steps=4)}
    methods = {"a": CentreGaussian(None, None, 0.2), "b": CentreGaussian(None, None, 0.5)}
    results = HeatmapEvaluation(metrics, batch_size=4)(model, methods, data, progress=False)
    # per image: the image and the zero baseline once, 3 inner steps per method and metric
    assert sum(seen) == len(images) * (2 + 3 * 2 * 2)
    for name, method in methods.items():
        maps = method(images, labels)
        for metric in (DeletionArea(steps=4), InsertionArea(steps=4)):
            metric.update(maps, images=images, targets=labels, model=model)
            assert results[name][metric.name] == pytest.approx(metric.result()[metric.name])


def test_checkerboard_skip_reason_is_a_pure_check() -> None:
    strided = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2))
    flat = nn.Sequential(nn.Conv2d(1, 2, 3))
    metric = CheckerboardScore()
    assert metric.skip_reason(strided, has_masks=False) is None
    assert metric.periods is None
    assert metric.skip_reason(flat, has_masks=False) == (
        "artefact score skipped: the model has no strided layer"
    )
    assert metric.periods is None and metric.skip_reason(strided, has_masks=False) is None
    maps = torch.rand(3, 16, 16)
    metric.update(maps, model=strided)
    given = CheckerboardScore([2])
    given.update(maps)
    assert metric.result() == given.result() and metric.periods is None


def test_one_check_that_a_metric_is_a_heatmap_metric() -> None:
    message = r"evaluation.metrics.odd is a object, not a vebi HeatmapMetric"
    with pytest.raises(VebiError, match=message):
        HeatmapEvaluation({"odd": object()})
    assert check_metric(PointingGame(), "x").name == "pointing_game"
    partial = OmegaConf.create(
        {"metrics": {"odd": {"_target_": "vebi.evaluation.PointingGame", "_partial_": True}}}
    )
    with pytest.raises(VebiError, match=r"evaluation.metrics.odd is a \w+, not a vebi"):
        build_metrics(partial, ["localisation"])
