"""The dissection evaluator checked by construction: a hand-built network whose channels are
the indicators of known parts, one that fires everywhere, one that is constant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vebi.errors import VebiError
from vebi.evaluation import EvaluationSet, FeatureDissection
from vebi.mining.features import FeatureIndex
from vebi.mining.relevant import RelevantFeatures

PARTS = ("background", "petals", "leaves")


class PartIndicators(nn.Module):
    """Images whose channel k is the indicator of part k + 1 (channel 2: noise everywhere);
    ``detect`` copies them with a 1 x 1 convolution (plus a constant channel), then a pooled
    linear head (the 1 x 1 layer ``pool``)."""

    def __init__(self) -> None:
        super().__init__()
        self.detect = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.detect.weight.zero_()
            self.detect.bias.zero_()
            for k in range(3):
                self.detect.weight[k, k] = 1.0
            self.detect.bias[3] = 0.5  # channel 3: constant on every image
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.detect(x))))


def _planted(count: int = 12, side: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    parts = np.zeros((count, side, side), dtype=np.uint8)
    for n in range(count):
        y, x = rng.integers(2, 12, size=2)
        parts[n, y : y + 10, x : x + 10] = 1  # petals: a square
        parts[n, 24:30, rng.integers(0, 20) :][:, :8] = 2  # leaves: a bar at the bottom
    parts_t = torch.from_numpy(parts)
    images = torch.stack(
        [
            (parts_t == 1).float(),
            (parts_t == 2).float(),
            torch.from_numpy(rng.random((count, side, side))).float(),
        ],
        dim=1,
    )
    labels = torch.arange(count) % 2
    return images, labels, parts_t


def _relevant(features_per_class: list[list[int]]) -> RelevantFeatures:
    index = FeatureIndex(("detect", "pool"), (4, 4))
    weights = np.zeros((8, 2))
    for c, features in enumerate(features_per_class):
        for rank, f in enumerate(features):
            weights[f, c] = 1.0 - 0.1 * rank
    return RelevantFeatures(weights, index, ["0", "1"], mu=1.0)


def _run(relevant: RelevantFeatures, draws: int = 0, **options: float) -> dict:
    images, labels, parts = _planted()
    return FeatureDissection(draws=draws, progress=False, **options)(
        PartIndicators().eval(),
        relevant,
        EvaluationSet.from_tensors(images, labels),
        parts,
        PARTS,
        ("petals",),
    )


def test_a_part_indicator_gets_its_part_with_iou_one_and_nothing_else() -> None:
    result = _run(_relevant([[0, 1], [1]]))
    by_class = {(e["class"], e["channel"]): e for e in result["features"] if e["layer"] == "detect"}
    petals, leaves = by_class[("0", 0)], by_class[("0", 1)]
    assert petals["part"] == "petals" and petals["iou"] == pytest.approx(1.0)
    assert petals["ious"]["leaves"] == 0.0 and petals["ious"]["background"] < 0.3
    assert leaves["part"] == "leaves" and leaves["iou"] == pytest.approx(1.0)
    assert by_class[("1", 1)]["part"] == "leaves"
    rows = {r["class"]: r for r in result["per_class"]}
    # class 0: one of its two features on the deciding part, by count and by weight (1.0, 0.9)
    assert rows["0"]["deciding_share"] == 0.5
    assert rows["0"]["deciding_weight_share"] == pytest.approx(1.0 / 1.9)
    assert rows["1"]["deciding_share"] == 0.0
    assert result["label_counts"]["petals"] == 1 and result["label_counts"]["leaves"] == 2


def test_a_channel_that_fires_everywhere_gets_no_label_and_a_constant_one_is_said_so() -> None:
    result = _run(_relevant([[2, 3], []]))
    noise, constant = result["features"]
    # the top 0.5 % of uniform noise: scattered pixels, IoU < 0.04 with every part
    assert noise["part"] is None and noise["iou"] < 0.04 and "below" in noise["note"]
    assert constant["part"] is None and constant["note"] == "constant map on every image"
    # with a floor of 0 the noise channel's best match is the largest part, the background
    relaxed = _run(_relevant([[2], []]), iou_floor=0.0)
    assert relaxed["features"][0]["part"] == "background"


def test_pooled_features_are_placed_through_the_map_they_pool() -> None:
    """pool/0 (a global max pool of detect) is dissected as detect/0: petals, IoU 1; a vector
    that is not a pooling of a map (flatten) gets no label; random sets are drawn."""
    result = _run(_relevant([[0, 4], [1]]), draws=20)
    pooled = next(e for e in result["features"] if e["layer"] == "pool")
    assert pooled["part"] == "petals" and pooled["iou"] == pytest.approx(1.0)
    row = result["per_class"][0]
    assert row["features"] == 2 and row["spatial_features"] == 2 and row["deciding_share"] == 1.0
    # random sets of one detect and one pool channel: each petals with probability 1/4
    assert 0.05 < row["random_deciding_share_mean"] < 0.6
    index = FeatureIndex(("detect", "flatten"), (4, 4))
    weights = np.zeros((8, 2))
    weights[[0, 4], 0] = [1.0, 0.9]
    weights[1, 1] = 1.0
    flat = _run(RelevantFeatures(weights, index, ["0", "1"], mu=1.0))
    vector = next(e for e in flat["features"] if e["layer"] == "flatten")
    assert vector["part"] is None and vector["note"].startswith("no spatial map")


def test_bad_settings_and_inputs_are_refused() -> None:
    with pytest.raises(VebiError, match="quantile"):
        FeatureDissection(quantile=1.0)
    images, labels, parts = _planted()
    with pytest.raises(VebiError, match="part-label maps"):
        FeatureDissection(progress=False)(
            PartIndicators(),
            _relevant([[0], [1]]),
            EvaluationSet.from_tensors(images, labels),
            parts[:3],
            PARTS,
            ("petals",),
        )
