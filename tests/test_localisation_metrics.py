"""Localisation metrics against hand-computed oracles."""

from __future__ import annotations

import pytest
import torch

from vebi.evaluation import MeanThresholdIoU, PointingGame, RelevanceMass, ThresholdIoU


def _square_mask() -> torch.Tensor:
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:6, 2:6] = 1  # 16 pixels
    return mask


def test_map_equal_to_the_mask_scores_one() -> None:
    mask = _square_mask()
    for metric in (ThresholdIoU(), MeanThresholdIoU(), PointingGame(), RelevanceMass()):
        metric.update(mask.clone(), mask)
        result = metric.compute()
        value = result["mean"] if isinstance(result, dict) else result
        assert value.item() == pytest.approx(1.0), type(metric).__name__
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
    mask = _square_mask().repeat(2, 1, 1)
    heatmaps = torch.zeros(2, 8, 8)
    heatmaps[0, 3, 3] = 1.0  # peak inside
    heatmaps[1, 7, 7] = 1.0  # peak outside
    game = PointingGame()
    game.update(heatmaps[:1], mask[:1])
    assert game.compute().item() == 1.0
    game.update(heatmaps[1:], mask[1:])
    assert game.compute().item() == 0.5  # accumulated over batches


def test_bad_shapes_and_values() -> None:
    with pytest.raises(ValueError, match="both be \\(N, H, W\\)"):
        PointingGame().update(torch.zeros(1, 8, 8), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        RelevanceMass().update(torch.full((1, 2, 2), float("nan")), torch.ones(1, 2, 2))
