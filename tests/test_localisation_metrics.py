"""Localisation metrics against hand-computed oracles, TorchRay's pointing game and Quantus."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vebi.errors import VebiError
from vebi.evaluation import (
    MeanThresholdIoU,
    PointingGame,
    RelevanceMass,
    StrictPointingGame,
    ThresholdIoU,
)
from vebi.evaluation.localisation import WITHOUT_MASK_KEY, dilate


def _square_mask() -> torch.Tensor:
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:6, 2:6] = 1  # 16 pixels
    return mask


def _all_metrics() -> list:
    return [
        ThresholdIoU(thresholds=torch.tensor([0.25, 0.75])),
        MeanThresholdIoU(),
        PointingGame(),
        StrictPointingGame(),
        RelevanceMass(),
    ]


def _value(metric) -> float:
    result = metric.compute()
    return float(result["mean"] if isinstance(result, dict) else result)


def test_map_equal_to_the_mask_scores_one() -> None:
    mask = _square_mask()
    for metric in _all_metrics():
        metric.update(mask.clone(), mask)
        assert _value(metric) == pytest.approx(1.0), type(metric).__name__
        assert metric.higher_is_better


def test_hand_computed_values() -> None:
    mask = _square_mask()
    heatmap = torch.zeros(1, 8, 8)
    heatmap[0, 4:8, 4:8] = 1.0  # overlaps the mask in 4 of 16 + 16 - 4 = 28 pixels
    heatmap[0, 0, 0] = 0.5
    iou = ThresholdIoU(thresholds=torch.tensor([0.25, 0.75]))
    iou.update(heatmap, mask)
    result = iou.compute()
    # t = 0.25: 17 pixels on (the square + the corner): 4 / (17 + 16 - 4); t = 0.75: 4 / 28
    torch.testing.assert_close(result["curve"], torch.tensor([4 / 29, 4 / 28], dtype=torch.float64))
    mass = RelevanceMass()
    mass.update(heatmap, mask)
    assert mass.compute().item() == pytest.approx(4 / 16.5)
    own_mean = MeanThresholdIoU()
    own_mean.update(heatmap, mask)  # mean = 16.5 / 64: both the square and the corner pass
    assert own_mean.compute().item() == pytest.approx(4 / 29)


def test_pointing_game_inside_and_outside() -> None:
    # 8 x 8 maps: every pixel is within the default 15 px of the mask, so no tolerance here
    mask = _square_mask().repeat(2, 1, 1)
    heatmaps = torch.zeros(2, 8, 8)
    heatmaps[0, 3, 3] = 1.0  # peak inside
    heatmaps[1, 7, 7] = 1.0  # peak outside
    for game in (PointingGame(tolerance=0), StrictPointingGame()):
        game.update(heatmaps[:1], mask[:1])
        assert game.compute().item() == 1.0
        game.update(heatmaps[1:], mask[1:])
        assert game.compute().item() == 0.5  # accumulated over batches
    within = PointingGame()  # (7, 7) is 2.8 px from the mask's corner (5, 5)
    within.update(heatmaps, mask)
    assert within.compute().item() == 1.0


def _one_peak(y: int, x: int, side: int = 32) -> torch.Tensor:
    heatmap = torch.zeros(1, side, side)
    heatmap[0, y, x] = 1.0
    return heatmap


def test_pointing_game_tolerance_is_euclidean_and_strictly_less() -> None:
    """A hit when the peak is at distance < tolerance from the mask (TorchRay's
    ``(u^2 + v^2) < tolerance^2``): 14 and 14.87 px hit, exactly 15 px and 16 px miss."""
    mask = torch.zeros(1, 32, 32)
    mask[0, 5, 5] = 1  # one pixel
    cases = {
        (5, 19): True,  # 14 px along a row
        (5, 20): False,  # exactly 15 px
        (21, 5): False,  # 16 px along a column
        (15, 16): True,  # sqrt(10^2 + 11^2) = 14.87 px
        (14, 17): False,  # sqrt(9^2 + 12^2) = 15 px exactly, off the axes
        (5, 5): True,  # on the mask
    }
    for (y, x), hit in cases.items():
        game = PointingGame(tolerance=15)
        game.update(_one_peak(y, x), mask)
        assert game.compute().item() == float(hit), (y, x)
    on_the_mask = PointingGame(tolerance=0)
    on_the_mask.update(_one_peak(5, 6), mask)  # 1 px off: a miss without tolerance
    assert on_the_mask.compute().item() == 0.0
    with pytest.raises(VebiError, match="tolerance"):
        PointingGame(tolerance=-1)
    with pytest.raises(VebiError, match="tolerance"):
        PointingGame(tolerance=1.5)  # type: ignore[arg-type]


def _torchray_hit(mask: torch.Tensor, point: tuple[int, int], tolerance: int) -> bool:
    """TorchRay's ``PointingGame.evaluate`` (torchray/benchmark/pointing_game.py) for a point
    (u, v) = (column, row): a hit if the disk ``(v - row)^2 + (u - col)^2 < tolerance^2``
    around the point meets the mask."""
    v, u = torch.meshgrid(
        (torch.arange(mask.shape[0], dtype=torch.float32) - point[1]) ** 2,
        (torch.arange(mask.shape[1], dtype=torch.float32) - point[0]) ** 2,
        indexing="ij",
    )
    return bool((mask.bool() & ((v + u) < tolerance**2)).any())


def test_pointing_game_matches_torchray_on_maps_with_one_maximum() -> None:
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(40, 24, 30, generator=generator)  # continuous: one maximum each
    masks = torch.zeros(40, 24, 30, dtype=torch.bool)
    for i in range(40):  # a random box each
        top, left = torch.randint(0, 20, (2,), generator=generator).tolist()
        height, width = torch.randint(1, 5, (2,), generator=generator).tolist()
        masks[i, top : top + height, left : left + width] = True
    for tolerance in (1, 2, 5, 9, 15):
        expected = []
        for heatmap, mask in zip(maps, masks, strict=True):
            row, col = divmod(int(heatmap.argmax()), heatmap.shape[1])
            expected.append(_torchray_hit(mask, (col, row), tolerance))
        game = PointingGame(tolerance=tolerance)
        game.update(maps, masks)
        assert game.compute().item() == pytest.approx(np.mean(expected), abs=1e-12), tolerance
        assert 0 < np.mean(expected) < 1, tolerance  # the cases are not all alike


def test_dilation_is_the_disk_of_distances_below_the_radius() -> None:
    mask = torch.zeros(1, 21, 21, dtype=torch.bool)
    mask[0, 10, 10] = True
    rows, cols = torch.meshgrid(torch.arange(21), torch.arange(21), indexing="ij")
    squared = (rows - 10) ** 2 + (cols - 10) ** 2
    for radius in (1, 3, 7):
        assert torch.equal(dilate(mask, radius)[0], squared < radius**2), radius
    assert torch.equal(dilate(mask, 0), mask)


def test_ties_any_maximum_counts_but_the_strict_game_takes_the_first() -> None:
    mask = torch.zeros(1, 32, 32)
    mask[0, 20, 20] = 1
    heatmap = torch.zeros(1, 32, 32)
    heatmap[0, 0, 0] = 1.0  # the first maximum in raster order: 28 px from the mask
    heatmap[0, 20, 25] = 1.0  # another maximum, 5 px from the mask
    tolerant, strict = PointingGame(tolerance=15), StrictPointingGame()
    tolerant.update(heatmap, mask)
    strict.update(heatmap, mask)
    assert tolerant.compute().item() == 1.0 and strict.compute().item() == 0.0
    heatmap[0, 20, 25], heatmap[0, 20, 20] = 0.0, 1.0  # the second maximum on the mask
    inside, strict = PointingGame(tolerance=0), StrictPointingGame()
    inside.update(heatmap, mask)
    strict.update(heatmap, mask)
    assert inside.compute().item() == 1.0 and strict.compute().item() == 0.0


def test_constant_maps() -> None:
    """No location in a constant map: nothing selected at its mean, a miss in both pointing
    games (even with the mask on pixel (0, 0)); fixed thresholds and mass as stated."""
    mask = torch.zeros(1, 8, 8)
    mask[0, 0:4, 0:4] = 1  # 16 of 64 pixels, around the first pixel
    for value in (0.0, 0.5, 1.0):
        heatmap = torch.full((1, 8, 8), value)
        for metric in (MeanThresholdIoU(), PointingGame(), StrictPointingGame()):
            metric.update(heatmap, mask)
            assert metric.compute().item() == 0.0, (type(metric).__name__, value)
        iou = ThresholdIoU(thresholds=torch.tensor([0.25, 0.75]))
        iou.update(heatmap, mask)
        # selects the whole image where t <= value: IoU = 16 / 64
        expected = [0.25 * (value >= 0.25), 0.25 * (value >= 0.75)]
        assert iou.compute()["curve"].tolist() == pytest.approx(expected), value
        mass = RelevanceMass()
        mass.update(heatmap, mask)
        assert mass.compute().item() == pytest.approx(0.25 if value > 0 else 0.0), value


def test_empty_masks_are_left_out_and_counted() -> None:
    """No object, no localisation: such images are left out of the mean, counted under one key
    shared by the metrics (their rows merge), and an all-empty set is NaN. (Before, an empty
    mask scored 0, or IoU 1 with an empty map.)"""
    masks = _square_mask().repeat(3, 1, 1)
    masks[1] = 0
    heatmaps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    heatmaps[1] = 0  # an empty map on an empty mask (IoU 1 before)
    row: dict = {}
    for metric, reference in zip(_all_metrics(), _all_metrics(), strict=True):
        metric.update(heatmaps[:2], masks[:2])
        metric.update(heatmaps[2:], masks[2:])
        reference.update(heatmaps[[0, 2]], masks[[0, 2]])
        assert _value(metric) == pytest.approx(_value(reference)), type(metric).__name__
        result = metric.result()
        assert result[WITHOUT_MASK_KEY] == 1 and reference.result()[WITHOUT_MASK_KEY] == 0
        row |= result
    assert row[WITHOUT_MASK_KEY] == 1
    for metric in _all_metrics():
        metric.update(heatmaps, torch.zeros(3, 8, 8))
        result = metric.result()
        assert math.isnan(result[metric.name]) and result[WITHOUT_MASK_KEY] == 3
    iou = ThresholdIoU(thresholds=torch.tensor([0.25, 0.75]))
    iou.update(heatmaps, torch.zeros(3, 8, 8))
    assert all(math.isnan(v) for v in iou.result()["iou_curve"])


def test_the_count_is_summed_across_processes() -> None:
    """torchmetrics merges states with their dist_reduce_fx, as DDP all-reduces them."""
    masks = _square_mask().repeat(2, 1, 1)
    masks[0] = 0
    first, second = RelevanceMass(), RelevanceMass()
    first.update(torch.rand(2, 8, 8), masks)
    second.update(torch.rand(2, 8, 8), torch.zeros(2, 8, 8))
    first.merge_state(second)
    assert first.result()[WITHOUT_MASK_KEY] == 3


def test_bad_shapes_and_values() -> None:
    with pytest.raises(ValueError, match="both be \\(N, H, W\\)"):
        PointingGame().update(torch.zeros(1, 8, 8), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        RelevanceMass().update(torch.full((1, 2, 2), float("nan")), torch.ones(1, 2, 2))


def _quantus_scores(metric_class, maps: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    metric = metric_class(abs=False, normalise=False, disable_warnings=True)
    scores = metric(
        model=None,
        x_batch=np.zeros((len(maps), 1, *maps.shape[1:])),
        y_batch=np.zeros(len(maps), dtype=int),
        a_batch=maps[:, None].double().numpy(),
        s_batch=masks[:, None].double().numpy(),
        channel_first=True,
    )
    return np.asarray(scores, dtype=np.float64)


def _ours(metric_class, maps: torch.Tensor, masks: torch.Tensor, **kwargs: object) -> np.ndarray:
    scores = []
    for heatmap, mask in zip(maps, masks, strict=True):
        metric = metric_class(**kwargs)
        metric.update(heatmap[None], mask[None])
        scores.append(metric.compute().item())
    return np.asarray(scores)


def test_pointing_game_and_relevance_mass_match_quantus() -> None:
    """On non-empty masks and non-constant maps: Quantus' PointingGame (any maximum inside the
    mask, no tolerance) is ours at tolerance 0, and the strict game where the maximum is
    unique; RelevanceMassAccuracy is ours. (Quantus scores an empty mask NaN in relevance mass
    but True in the pointing game, and a constant map a hit; ours leaves out / misses them.)"""
    quantus = pytest.importorskip("quantus")
    generator = torch.Generator().manual_seed(0)
    # twelve levels: about ten maxima per map
    tied = torch.randint(0, 12, (30, 10, 12), generator=generator).float() / 11
    smooth = torch.rand(30, 10, 12, generator=generator)
    masks = torch.rand(60, 10, 12, generator=generator) > 0.9
    masks[:, 0, 0] = True  # non-empty
    maps = torch.cat([tied, smooth])
    assert not bool((maps.flatten(1).amax(1) == maps.flatten(1).amin(1)).any())
    pointing = _quantus_scores(quantus.PointingGame, maps, masks)
    assert 0 < pointing[:30].mean() < 1  # the tied maps are not all alike
    np.testing.assert_allclose(_ours(PointingGame, maps, masks, tolerance=0), pointing, atol=1e-8)
    np.testing.assert_allclose(_ours(StrictPointingGame, smooth, masks[30:]), pointing[30:])
    strict_on_ties = _ours(StrictPointingGame, tied, masks[:30])
    assert (strict_on_ties < pointing[:30]).any()  # a first maximum outside, another inside
    mass = _quantus_scores(quantus.RelevanceMassAccuracy, maps, masks)
    np.testing.assert_allclose(_ours(RelevanceMass, maps, masks), mass, rtol=0, atol=1e-8)
