"""The Python API checks what it is given: Explainer targets, k and images; mining labels and
settings; the warning for a class without images; crafted relevant-features files."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from tests.mining_models import planted_colour_data, planted_colour_model
from vebi import Explainer, FeatureMiner, RelevantFeatures, VebiError, mine_features
from vebi.mining.features import FeatureIndex

CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, TensorDataset, Any]:
    """The planted colour task (3 classes) and its relevant features, mined by the API."""
    model, data = planted_colour_model(), planted_colour_data(per_class=20)
    cache = tmp_path_factory.mktemp("cache")
    relevant = mine_features(model, data, mu=5.0, progress=False, cache_dir=cache)
    return model, data, relevant


def two_features_for_red() -> RelevantFeatures:
    """Relevant features of the planted model's ``feat`` layer: 2 for red, 1 for the others."""
    weights = np.zeros((6, 3))
    weights[[0, 3], 0] = [0.6, 0.2]
    weights[1, 1] = weights[2, 2] = 0.5
    return RelevantFeatures(weights, FeatureIndex(("feat",), (6,)), CLASSES, mu=1.0)


# ------------------------------------------------------------------ A1. targets
def test_targets_must_be_one_class_id_per_image(planted) -> None:
    """Integer lists, arrays and tensors explain the same classes; negative, out-of-range,
    wrongly sized, float, bool and string targets are refused, naming what was wrong."""
    model, data, relevant = planted
    images = data.tensors[0][:2]
    explainer = Explainer(model, relevant, k=1)
    reference = explainer(images, torch.tensor([2, 2]))
    for targets in (
        [2, 2],
        np.array([2, 2], dtype=np.int32),
        torch.tensor([2, 2], dtype=torch.uint8),
    ):
        explanation = explainer(images, targets)
        assert explanation.classes.tolist() == [2, 2]
        torch.testing.assert_close(explanation.combined, reference.combined)
    refused = [
        ([-1, 0], r"integer class ids in 0\.\.2 .*got \[-1\]"),
        (torch.tensor([0, 3]), r"integer class ids in 0\.\.2 .*got \[3\]"),
        ([0], r"one class id per image: 2 image\(s\), but targets of shape \(1,\)"),
        ([0.0, 1.0], r"got torch\.float64 values \[0\.0, 1\.0\]"),
        ([True, False], r"got torch\.bool values"),
        (["red", "green"], r"targets must be integer class ids in 0\.\.2, got \['red', 'green'\]"),
    ]
    for targets, message in refused:
        with pytest.raises(VebiError, match=message):
            explainer(images, targets)


# ------------------------------------------------------------------ A2. k
def test_k_is_capped_at_the_largest_relevant_set_and_must_be_an_integer(planted) -> None:
    """k=10**9 becomes the 2 features red has (no (N, 10**9, H, W) allocation); the maps have
    that many slots; a relevant set without features gives k=1; bool/float/str k are refused."""
    model, data, _ = planted
    relevant = two_features_for_red()
    explainer = Explainer(model, relevant, k=10**9)
    assert explainer.k == 2
    images = data.tensors[0][::10]
    explanation = explainer(images)
    assert explanation.maps.shape == (len(images), 2, 8, 8)
    assert all(len(chosen) <= 2 for chosen in explanation.features)
    assert max(len(chosen) for chosen in explanation.features) == 2  # the red images
    assert explanation.combined.shape == (len(images), 8, 8)
    nothing = RelevantFeatures(np.zeros((6, 3)), FeatureIndex(("feat",), (6,)), CLASSES, mu=1.0)
    assert Explainer(model, nothing, k=5).k == 1
    for bad in (2.5, True, "3", 0):
        with pytest.raises(VebiError, match=r"k \(the features per explanation\) must be an int"):
            Explainer(model, relevant, k=bad)


# ------------------------------------------------------------------ A3. images
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("one_image", r"got shape \(3, 8, 8\): .*images\.unsqueeze\(0\)"),
        ("flat", r"must be a batch \(N, C, H, W\), got shape \(2, 192\)"),
        ("uint8", r"floats in \[0, 1\], got torch\.uint8: .*images\.float\(\) / 255"),
        ("numpy", r"must be a torch\.Tensor .*got ndarray.*torch\.from_numpy"),
        ("nan", r"images hold 2 NaN/Inf value\(s\) \(in image\(s\) \[1\]"),
        ("other_device", r"images are on meta but the model is on cpu: .*images\.to\('cpu'\)"),
    ],
)
def test_images_are_checked(planted, name: str, message: str) -> None:
    """Not a tensor, not (N, C, H, W), integer pixels, NaN/Inf or another device than the
    model's: a VebiError that says what to change (the device check on a ``meta`` tensor,
    which no computation accepts, against the CPU model)."""
    model, data, relevant = planted
    images = data.tensors[0][:2]
    nan = images.clone()
    nan[1, 0, 0, 0], nan[1, 2, 3, 4] = float("nan"), float("inf")
    bad = {
        "one_image": images[0],
        "flat": images.flatten(1),
        "uint8": (images * 255).to(torch.uint8),
        "numpy": images.numpy(),
        "nan": nan,
        "other_device": images.to("meta"),
    }[name]
    with pytest.raises(VebiError, match=message):
        Explainer(model, relevant)(bad)


def test_float64_images_are_converted_to_the_model_dtype(planted) -> None:
    """float64 images explain as their float32 copies do (the model's parameters are float32)."""
    model, data, relevant = planted
    images = data.tensors[0][::15]
    explainer = Explainer(model, relevant)
    double = explainer(images.double())
    single = explainer(images)
    assert torch.equal(double.classes, single.classes)
    torch.testing.assert_close(double.combined, single.combined)


# ------------------------------------------------------------------ A4. mining labels
class _NamedLabels(Dataset):
    """The planted images with their class names as labels (image, "red")."""

    def __init__(self, data: TensorDataset) -> None:
        self.images, self.labels = data.tensors

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.images[index], CLASSES[int(self.labels[index])]


def test_string_and_float_labels_are_refused(planted, tmp_path: Path) -> None:
    """Labels that are class names or floats: a VebiError that says labels must be integer
    class ids 0..C-1 and shows what was found (before, strings were a raw ValueError and floats
    were truncated to ids silently)."""
    model, data, _ = planted
    with pytest.raises(VebiError, match=r"integer class ids 0\.\.2 .*str labels.*\['red'\]"):
        mine_features(model, _NamedLabels(data), mu=5.0, progress=False, cache_dir=tmp_path)
    images, labels = data.tensors
    floats = TensorDataset(images, labels.float() + 0.5)
    with pytest.raises(VebiError, match=r"integer class ids 0\.\.2 .*torch\.float32 labels"):
        mine_features(model, floats, mu=5.0, progress=False, cache_dir=tmp_path)


@pytest.mark.parametrize(("position", "value", "where"), [(0, -1, "item 0"), (-1, 3, "batch 2")])
def test_labels_outside_the_classes_are_refused_in_any_batch(
    planted, tmp_path: Path, position: int, value: int, where: str
) -> None:
    """A label outside 0..2 in the first item or in the last batch (rows 40..59 with
    batch_size 20): a VebiError that names the batch and the values found."""
    model, data, _ = planted
    images, labels = data.tensors
    labels = labels.clone()
    labels[position] = value
    dataset = TensorDataset(images, labels)
    message = rf"integer class ids 0\.\.2 .*{where}.* outside that range: \[{value}\]"
    with pytest.raises(VebiError, match=message):
        mine_features(model, dataset, mu=5.0, progress=False, cache_dir=tmp_path, batch_size=20)


# ------------------------------------------------------------------ A5. mining settings
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mu": "abc"}, r"mu must be a positive number .*got 'abc' \(str\)"),
        ({"mu": True}, r"mu must be a positive number .*got True \(bool\)"),
        ({"mu": None}, r"mu must be a positive number .*got None"),
        ({"mu_candidates": [1.0, "x"]}, r"mu must be a positive number .*'x'.* in mu_candidates"),
        ({"mu_candidates": [2.0, False]}, r"mu must be a positive number .*False.* in mu_cand"),
        ({"mu_candidates": "1.0"}, r"mu_candidates must be a list of positive numbers"),
        ({"mu_candidates": 5.0}, r"mu_candidates must be a list of positive numbers, got 5\.0"),
        ({"tolerance": -1}, r"tolerance must be a finite number >= 0, got -1 \(int\)"),
        ({"tolerance": math.nan}, r"tolerance must be a finite number >= 0, got nan"),
        ({"tolerance": "0.1"}, r"tolerance must be a finite number >= 0, got '0\.1' \(str\)"),
        ({"mu_tolerance": "a"}, r"mu_tolerance must be a finite number >= 0, got 'a'"),
        ({"mu_tolerance": None}, r"mu_tolerance must be a finite number >= 0, got None"),
    ],
)
def test_mining_settings_are_checked(settings: dict[str, Any], message: str) -> None:
    """Non-numeric, boolean, missing, negative or NaN mu / mu_candidates / tolerance /
    mu_tolerance: a VebiError naming the setting (before: raw TypeErrors, or accepted)."""
    with pytest.raises(VebiError, match=message):
        FeatureMiner(**settings)


def test_mine_features_checks_mu_before_reading_data(planted) -> None:
    """``mine_features(mu="abc")``: the VebiError comes before any forward pass."""
    model, data, _ = planted
    with pytest.raises(VebiError, match=r"mu must be a positive number"):
        mine_features(model, data, mu="abc", progress=False)


# ------------------------------------------------------------------ A6. class without images
def test_a_class_without_images_warns_the_caller_and_logs(
    planted, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning points at the user's ``mine_features`` call (not at a line inside vebi,
    where Python shows it once per process) and is also in the log."""
    model, data, _ = planted
    images, labels = data.tensors
    keep = labels != 2
    dataset = TensorDataset(images[keep], labels[keep])
    with (
        caplog.at_level(logging.WARNING, logger="vebi.mining.miner"),
        pytest.warns(UserWarning, match="class '2' has no samples") as caught,
    ):
        relevant = mine_features(model, dataset, mu=5.0, progress=False, cache_dir=tmp_path)
    (warning,) = [w for w in caught if "has no samples" in str(w.message)]
    assert warning.filename == __file__
    logged = [r for r in caplog.records if "class '2' has no samples" in r.getMessage()]
    assert logged and logged[0].levelno == logging.WARNING
    assert relevant.class_counts[2] == 0 and relevant.relevant(2) == []


# ------------------------------------------------------------------ B. crafted files
def _crafted(
    source: Path, target: Path, change: dict[str, Any], dataset: dict[str, Any] | None
) -> Path:
    """``source`` rewritten with ``change`` merged into its metadata and, given ``dataset``,
    a ``weights`` dataset made by ``create_dataset(**dataset)`` (a shape without data writes
    nothing: the file stays small whatever the shape)."""
    with h5py.File(source, "r") as handle:
        weights, meta = handle["weights"][...], json.loads(handle.attrs["meta"])
    with h5py.File(target, "w") as handle:
        handle.create_dataset("weights", **(dataset or {"data": weights}))
        handle.attrs["meta"] = json.dumps({**meta, **change})
    return target


CRAFTED = {
    "weights_strings": ({}, "'weights' must hold real floating-point numbers, holds \\|S3"),
    "weights_complex": ({}, "'weights' must hold real floating-point numbers, holds complex128"),
    "weights_integers": ({}, "'weights' must hold real floating-point numbers, holds int64"),
    "weights_huge": ({}, r"'weights' has shape \(10000000, 1000000\), but the metadata describe"),
    "weights_unwritten": ({}, "'weights' stores less data than its shape declares"),
    "tolerance_string": ({"tolerance": "abc"}, "'tolerance' must be a finite number >= 0"),
    "tolerance_negative": ({"tolerance": -1.0}, "'tolerance' must be a finite number >= 0"),
    "tolerance_nan": ({"tolerance": math.nan}, "'tolerance' must be a finite number >= 0"),
    "mu_bool": ({"mu": True}, "'mu' must be a finite number > 0, is True"),
    "mu_zero": ({"mu": 0}, "'mu' must be a finite number > 0, is 0"),
    "nonnegative_string": ({"nonnegative": "yes"}, "'nonnegative' must be true or false"),
    "normalize_layers_int": ({"normalize_layers": 1}, "'normalize_layers' must be true or false"),
    "class_counts_strings": ({"class_counts": ["a", "b", "c"]}, "'class_counts' must be a list"),
    "class_counts_length": ({"class_counts": [20, 20]}, "'class_counts' has 2 counts for 3"),
    "class_names_ints": ({"class_names": [0, 1, 2]}, "'class_names' must be a list of strings"),
    "channels_fraction": (None, "'channels' must be a list of channel counts >= 1"),
    "aggregation_unknown": ({"aggregation": ["energy"]}, "'aggregation' must be one of"),
    "label_source_unknown": ({"label_source": "soft"}, "'label_source' must be one of"),
    "metrics_string": ({"metrics": {"mu": "five"}}, "'metrics' must map names to numbers"),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_relevant_features_files_are_refused(planted, tmp_path: Path, name: str) -> None:
    """Metadata of the wrong type or value, and weights that are not real floats, do not
    match the metadata's shape or are not stored: one VebiError naming the file and the entry
    and saying to mine again, decided on the dataset's header (the 72.8 TiB one is 8 kB on
    disk and refused at once)."""
    _, _, relevant = planted
    source = relevant.save(tmp_path / "relevant_features.h5")
    change, message = CRAFTED[name]
    shape = relevant.weights.shape
    if change is None:  # the first layer's count plus 0.5: int() rounded it away before
        channels = list(relevant.index.channels)
        change = {"channels": [channels[0] + 0.5, *channels[1:]]}
    dataset = {
        "weights_strings": {"data": np.full(shape, b"abc", dtype="S3")},
        "weights_complex": {"data": relevant.weights.astype(np.complex128)},
        "weights_integers": {"data": np.ones(shape, dtype=np.int64)},
        "weights_huge": {"shape": (10**7, 10**6), "dtype": np.float64},
        "weights_unwritten": {"shape": shape, "dtype": np.float64},
    }.get(name)
    path = _crafted(source, tmp_path / f"{name}.h5", change, dataset)
    assert path.stat().st_size < 64 * 2**10
    started = time.perf_counter()
    expected = rf"{re.escape(str(path))}: the entry {message}.*mine the features again"
    with pytest.raises(VebiError, match=expected):
        RelevantFeatures.load(path)
    assert time.perf_counter() - started < 5
    RelevantFeatures.load(source)  # the file they were made from loads
