"""Mining where the real job runs: G chosen by the device's memory, passes on the device, the
cache as a choice (on/off/auto, float16), a full disk. The device code runs with device=cpu."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.mining_models import mnist_subset, seeded_lenet
from vebi.errors import VebiError
from vebi.explain.interpretation import top_images_per_feature
from vebi.mining import FeatureMiner
from vebi.mining import miner as miner_module
from vebi.mining.cache import ActivationCache, CacheDiskFullError
from vebi.mining.solver import DenseGram, lasso_objective

LENET_FEATURES = 1140  # m of the seeded LeNet's default layers


def _miner(cache_dir: Path, **kwargs) -> FeatureMiner:
    # every view of LeNet's default layers (m = 1140): these tests are about the solve and
    # the cache, not the layer choice
    options = {"batch_size": 50, "chunk_rows": 200, "progress": False, "cache_dir": cache_dir}
    return FeatureMiner(**{"views": "every", **options, **kwargs})


@pytest.fixture(scope="module")
def digits(mnist_root: Path):
    return mnist_subset(mnist_root, 600)


@pytest.fixture(scope="module")
def dense_reference(digits, tmp_path_factory):
    """W mined with the cache on and G dense: what every other choice must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    return _miner(folder, gram="dense", cache="on").mine(seeded_lenet(), digits)


def test_available_memory_is_the_machines_available_ram() -> None:
    total = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    free = miner_module.available_memory(torch.device("cpu"))
    assert 0 < free <= total


def test_gram_auto_follows_the_free_memory_of_the_device(monkeypatch) -> None:
    """auto: dense exactly while 8 m^2 bytes fit memory_share of the free memory; the
    reason names both sizes; dense (asked) or cache=off refuse a G that does not fit, saying
    what it needs and what to do."""
    m = 17_408  # ResNet-50: G = 2.26 GiB
    need = 8 * m * m
    seen: list[torch.device] = []

    def free_memory(device: torch.device) -> int:
        seen.append(device)
        return free["bytes"]

    free = {"bytes": 2 * need}
    monkeypatch.setattr(miner_module, "available_memory", free_memory)
    dense, why = FeatureMiner(memory_share=0.5).gram_choice(m, torch.device("cpu"))
    assert dense and "2.26 GB" in why and "4.52 GB free on cpu" in why and "50%" in why
    free["bytes"] = 2 * need - 8
    dense, why = FeatureMiner(memory_share=0.5).gram_choice(m, torch.device("cpu"))
    assert not dense and "G would need 2.26 GB" in why and "mining.layers" in why
    assert FeatureMiner(memory_share=1.0).gram_choice(m, torch.device("cpu"))[0]
    assert FeatureMiner(gram="streamed").gram_choice(m, torch.device("cpu")) == (
        False,
        "mining.gram=streamed",
    )
    for options in ({"gram": "dense"}, {"cache": "off"}):
        with pytest.raises(VebiError, match=r"needs G in memory.*2\.26 GB.*mining\.layers"):
            FeatureMiner(**options).gram_choice(m, torch.device("cpu"))
    # MPS has no float64: G is summed on the CPU, and the CPU's memory decides
    FeatureMiner().gram_choice(m, torch.device("mps"))
    assert seen[-1] == torch.device("cpu")
    for bad in ({"memory_share": 0}, {"memory_share": 1.5}, {"cache": "maybe"}):
        with pytest.raises(VebiError, match="memory_share|cache must be one of"):
            FeatureMiner(**bad)
    with pytest.raises(VebiError, match="streamed solve reads the activation cache"):
        FeatureMiner(gram="streamed", cache="off")


def test_the_choice_is_logged_and_a_g_too_big_for_the_memory_is_streamed(
    digits, dense_reference, tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(miner_module, "available_memory", lambda device: 8 * LENET_FEATURES**2)
    with caplog.at_level(logging.INFO):
        report = _miner(tmp_path, memory_share=0.5).mine(seeded_lenet(), digits)
    assert report.gram == "streamed" and report.timings["passes"] >= 2
    assert "G streamed from the activation cache: G would need 10 MB" in caplog.text
    np.testing.assert_allclose(report.relevant.weights, dense_reference.relevant.weights, atol=1e-6)
    assert dense_reference.gram == "dense" and dense_reference.timings["passes"] == 0
    assert "mining.gram=dense" not in dense_reference.gram_reason


def test_cache_off_writes_nothing_and_the_galleries_rank_on_a_second_pass(
    digits, dense_reference, tmp_path: Path
) -> None:
    model = seeded_lenet()
    report = _miner(tmp_path, cache="off").mine(model, digits)
    assert report.cache_path is None and not list(tmp_path.glob("*.h5*"))
    np.testing.assert_array_equal(report.relevant.weights, dense_reference.relevant.weights)
    assert "sparse_accuracy_train" not in report.relevant.metrics  # no cache to score on
    cache = ActivationCache(dense_reference.cache_path, "")
    from_cache = top_images_per_feature(dense_reference.relevant, cache, 5)
    again = top_images_per_feature(report.relevant, report.rows, 5)
    assert again == from_cache and len(again) > 10
    first = next(iter(report.rows.iter_chunks(fields=("features", "indices"))))
    np.testing.assert_array_equal(
        first["features"], cache.read("features")[: len(first["indices"])]
    )


def test_cache_auto_skips_a_cache_the_disk_should_not_hold(
    digits, dense_reference, tmp_path: Path, monkeypatch, caplog
) -> None:
    """auto: with G dense a cache over a quarter of the free disk is not written (said); a
    streamed G whose cache cannot fit the disk is refused before the forward pass."""
    monkeypatch.setattr(miner_module, "CACHE_DISK_SHARE", 1e-9)
    with caplog.at_level(logging.INFO):
        report = _miner(tmp_path / "auto").mine(seeded_lenet(), digits)
    assert report.cache_path is None and not list((tmp_path / "auto").glob("*.h5"))
    assert "No activation cache (mining.cache=auto): it would take 3 MB" in caplog.text
    np.testing.assert_array_equal(report.relevant.weights, dense_reference.relevant.weights)

    class Full:
        free = 1000

    monkeypatch.setattr(miner_module.shutil, "disk_usage", lambda path: Full())
    with pytest.raises(VebiError, match=r"cache needs 3 MB \(600 images x 1140 float32"):
        _miner(tmp_path / "streamed", gram="streamed").mine(seeded_lenet(), digits)


def test_a_full_disk_while_writing_the_cache_keeps_the_complete_rows(
    digits, dense_reference, tmp_path: Path, monkeypatch
) -> None:
    original = h5py.Dataset.__setitem__
    writes = {"count": 0}

    def failing_write(self, key, value):
        if self.name == "/features":
            writes["count"] += 1
            if writes["count"] == 2:  # the second chunk of rows: the disk is full
                raise OSError("Can't write data (file write failed: No space left on device)")
        return original(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", failing_write)
    with pytest.raises(CacheDiskFullError, match=r"disk of the activation cache .* is full"):
        _miner(tmp_path).mine(seeded_lenet(), digits)
    (partial,) = tmp_path.glob("*.h5.partial")
    with h5py.File(partial) as handle:
        assert handle.attrs["complete_rows"] == 200  # the first chunk, intact
    monkeypatch.setattr(h5py.Dataset, "__setitem__", original)
    resumed = _miner(tmp_path).mine(seeded_lenet(), digits)
    np.testing.assert_array_equal(resumed.relevant.weights, dense_reference.relevant.weights)


def test_a_float16_cache_halves_the_file_and_dense_and_streamed_agree(
    digits, dense_reference, tmp_path: Path
) -> None:
    """The features are rounded to float16 before anything uses them: the dense and the
    streamed solve see the same X; the optimum moves little from float32's (measured: the
    float32 objective at the float16 W is within 1e-4 of its optimum, relative)."""
    half = _miner(tmp_path / "dense", cache_dtype="float16", cache="on").mine(
        seeded_lenet(), digits
    )
    streamed = _miner(tmp_path / "streamed", cache_dtype="float16", gram="streamed").mine(
        seeded_lenet(), digits
    )
    np.testing.assert_allclose(streamed.relevant.weights, half.relevant.weights, atol=1e-6)
    with h5py.File(half.cache_path) as handle:
        assert handle["features"].dtype == np.float16
    assert half.cache_path != dense_reference.cache_path  # its own cache, never mixed up
    full = ActivationCache(dense_reference.cache_path, "").read("features").astype(np.float64)
    labels = ActivationCache(dense_reference.cache_path, "").read("labels")
    gram, cross = full.T @ full, full.T @ np.eye(10)[labels]
    at_full = lasso_objective(gram, cross, dense_reference.relevant.weights)
    at_half = lasso_objective(gram, cross, half.relevant.weights)
    assert np.all(at_half >= at_full - 1e-9)  # float32's optimum is the optimum
    assert np.max((at_half - at_full) / np.abs(at_full)) < 1e-4
    with pytest.raises(VebiError, match="HDF5 stores no bfloat16"):
        FeatureMiner(cache_dtype="bfloat16")


def test_dense_gram_on_a_tensor_gives_the_products_and_blocks_of_numpy() -> None:
    generator = np.random.default_rng(0)
    x = generator.random((300, 90))
    gram = x.T @ x
    sets = [np.sort(generator.choice(90, size, replace=False)) for size in (1, 5, 17, 40)]
    weights = [generator.random(len(s)) for s in sets]
    operator = DenseGram(torch.from_numpy(gram))
    expected = np.stack([gram[:, s] @ w for s, w in zip(sets, weights, strict=True)], axis=1)
    np.testing.assert_allclose(operator.products(sets, weights), expected, rtol=1e-12)
    for block, s in zip(operator.submatrices(sets), sets, strict=True):
        np.testing.assert_array_equal(block, gram[np.ix_(s, s)])
