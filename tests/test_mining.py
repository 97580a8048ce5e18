"""FeatureMiner end to end: planted features, resumable cache, DDP equality, artefacts."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.mining_models import (
    mnist_subset,
    planted_colour_data,
    planted_colour_model,
    seeded_lenet,
)
from vebi.errors import VebiError
from vebi.mining import FeatureMiner, RelevantFeatures
from vebi.mining.cache import ActivationCache
from vebi.mining.solver import lasso_objective
from vebi.testing import lasso_homotopy_reference


def test_planted_channel_is_mined_first(tmp_path: Path) -> None:
    model, data = planted_colour_model(), planted_colour_data()
    report = FeatureMiner(mu=5.0, layers=["feat"], cache_dir=tmp_path, progress=False).mine(
        model, data
    )
    for c in range(3):
        top = report.relevant.relevant(c)[0]
        assert (top.layer, top.channel) == ("feat", c)
    # over all default layers the deciding colour channel still ranks first
    every = FeatureMiner(mu=5.0, views="every", cache_dir=tmp_path, progress=False)
    report = every.mine(model, data)
    assert report.relevant.layers == ("feat", "relu", "pool")
    for c in range(3):
        assert report.relevant.relevant(c)[0].channel == c
    # one view per tensor: feat goes straight into relu, pool is a global pooling of relu
    one = FeatureMiner(mu=5.0, cache_dir=tmp_path, progress=False).mine(model, data).relevant
    assert one.layers == ("relu",)
    assert [one.relevant(c)[0].channel for c in range(3)] == [0, 1, 2]
    assert report.relevant.metrics["network_accuracy_train"] == 1.0


class _CountingModel(torch.nn.Module):
    """Wraps a model and counts the images it has seen."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        return self.model(images)


def _miner(cache_dir: Path, **kwargs) -> FeatureMiner:
    # every view of LeNet's default layers (m = 1140): these tests are about the solve and
    # the cache, not the layer choice
    options = {"batch_size": 50, "chunk_rows": 200, "progress": False, "cache_dir": cache_dir}
    return FeatureMiner(**{"views": "every", **options, **kwargs})


def test_interrupted_extraction_resumes(mnist_root: Path, tmp_path: Path, monkeypatch) -> None:
    data = mnist_subset(mnist_root, 1000)
    reference = _miner(tmp_path / "ref").mine(seeded_lenet(), data)

    writes = {"count": 0}
    original = ActivationCache.write_rows

    def interrupting_write(self, start, blocks):
        if writes["count"] == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the third chunk
        writes["count"] += 1
        return original(self, start, blocks)

    monkeypatch.setattr(ActivationCache, "write_rows", interrupting_write)
    model = _CountingModel(seeded_lenet())
    with pytest.raises(KeyboardInterrupt):
        _miner(tmp_path / "run").mine(model, data)
    (partial,) = (tmp_path / "run").glob("*.h5.partial")
    assert not list((tmp_path / "run").glob("*.h5"))  # no file that looks complete
    with h5py.File(partial) as handle:
        assert handle.attrs["complete_rows"] == 400
    monkeypatch.setattr(ActivationCache, "write_rows", original)

    model.seen = 0
    resumed = _miner(tmp_path / "run").mine(model, data)
    # 600 rows left, plus the single-image probes; the 400 complete rows were not recomputed
    assert 600 <= model.seen <= 603
    np.testing.assert_array_equal(resumed.relevant.weights, reference.relevant.weights)
    features = ActivationCache(resumed.cache_path, "").read("features")
    np.testing.assert_array_equal(
        features, ActivationCache(reference.cache_path, "").read("features")
    )


def test_cache_reused_only_when_fingerprint_matches(mnist_root: Path, tmp_path: Path) -> None:
    data = mnist_subset(mnist_root, 300)
    model = _CountingModel(seeded_lenet())
    first = _miner(tmp_path).mine(model, data)
    model.seen = 0
    again = _miner(tmp_path).mine(model, data)
    assert model.seen <= 3 and again.cache_path == first.cache_path  # only probes ran
    np.testing.assert_array_equal(again.relevant.weights, first.relevant.weights)
    other = _miner(tmp_path, aggregation="max").mine(model, data)
    assert other.cache_path != first.cache_path
    with torch.no_grad():
        model.model.conv1.weight.add_(0.01)
    model.seen = 0
    changed = _miner(tmp_path).mine(model, data)
    assert changed.cache_path != first.cache_path and model.seen >= 300
    with h5py.File(first.cache_path) as handle:
        assert set(handle) == {"features", "labels", "predictions", "indices"}
        np.testing.assert_array_equal(handle["indices"][...], np.arange(300))
        assert handle["features"].chunks[0] == 200


def test_class_without_samples_warns_and_is_empty(mnist_root: Path, tmp_path: Path) -> None:
    data = mnist_subset(mnist_root, 600)
    keep = data.tensors[1] != 7
    data = torch.utils.data.TensorDataset(data.tensors[0][keep], data.tensors[1][keep])
    with pytest.warns(UserWarning, match="class '7' has no samples"):
        report = _miner(tmp_path).mine(seeded_lenet(), data)
    assert report.relevant.relevant(7) == []
    assert report.relevant.class_counts[7] == 0


def test_mu_validation_and_label_source() -> None:
    for bad in (0, -2.0, float("nan")):
        with pytest.raises(VebiError, match="mu must be a positive number"):
            FeatureMiner(mu=bad)
    with pytest.raises(VebiError, match="mu must be a positive number"):
        FeatureMiner(mu_candidates=[1.0, 0.0])
    with pytest.raises(VebiError, match="labels must be one of"):
        FeatureMiner(labels="soft")


def test_mu_chosen_by_held_out_accuracy(mnist_root: Path, tmp_path: Path) -> None:
    data = mnist_subset(mnist_root, 1200)
    train = torch.utils.data.TensorDataset(data.tensors[0][:900], data.tensors[1][:900])
    val = torch.utils.data.TensorDataset(data.tensors[0][900:], data.tensors[1][900:])
    report = _miner(tmp_path, mu_candidates=[0.1, 1.0, 10.0]).mine(seeded_lenet(), train, val)
    accuracies = {p["mu"]: p["sparse_accuracy"] for p in report.mu_path}
    assert set(accuracies) == {0.1, 1.0, 10.0}
    best = max(accuracies.values())  # the smallest mu within 1 point of the best accuracy
    assert report.relevant.mu == min(mu for mu, a in accuracies.items() if a >= best - 0.01)
    chosen = accuracies[report.relevant.mu]
    assert report.relevant.metrics["sparse_accuracy_val"] == pytest.approx(chosen)
    strict = _miner(tmp_path, mu_candidates=[0.1, 1.0, 10.0], mu_tolerance=0.0)
    assert strict.mine(seeded_lenet(), train, val).relevant.mu == max(
        accuracies, key=lambda mu: (accuracies[mu], -mu)
    )
    with pytest.raises(VebiError, match="needs a validation set"):
        _miner(tmp_path, mu_candidates=[1.0]).mine(seeded_lenet(), train)


def test_relevant_features_round_trip(tmp_path: Path) -> None:
    report = FeatureMiner(mu=5.0, views="every", cache_dir=tmp_path, progress=False).mine(
        planted_colour_model(), planted_colour_data(), class_names=["red", "green", "blue"]
    )
    path = report.relevant.save(tmp_path / "out" / "relevant_features.h5")
    loaded = RelevantFeatures.load(path)
    np.testing.assert_array_equal(loaded.weights, report.relevant.weights)
    assert loaded.index == report.relevant.index and loaded.class_names == ["red", "green", "blue"]
    assert loaded.relevant(2) == report.relevant.relevant(2)
    assert loaded.fingerprint == report.relevant.fingerprint and loaded.mu == 5.0
    summary = path.with_suffix(".json").read_text()
    assert '"red"' in summary and "feat" in summary
    assert "| blue |" in path.with_suffix(".md").read_text()


def test_failed_save_leaves_no_artefact(tmp_path: Path, monkeypatch) -> None:
    report = FeatureMiner(mu=5.0, cache_dir=tmp_path, progress=False).mine(
        planted_colour_model(), planted_colour_data()
    )

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", broken)
    with pytest.raises(OSError, match="disk full"):
        report.relevant.save(tmp_path / "out" / "relevant_features.h5")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(VebiError, match="no relevant-features file"):
        RelevantFeatures.load(tmp_path / "out" / "relevant_features.h5")


# ------------------------------------------------------------------------------ DDP


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, images, labels, out_dir: str, gram: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        data = torch.utils.data.TensorDataset(images, labels)
        if gram == "auto, too little memory on rank 1":
            from vebi.mining import miner as miner_module

            room = 2**40 if rank == 0 else 2**10  # G (10 MB) fits rank 0's device only
            miner_module.available_memory = lambda device: room
            gram = "auto"
        report = _miner(Path(out_dir) / "cache", gram=gram).mine(seeded_lenet(), data)
        (Path(out_dir) / f"gram{rank}.txt").write_text(report.gram)
        np.save(Path(out_dir) / f"weights{rank}.npy", report.relevant.weights)
        np.save(Path(out_dir) / f"counts{rank}.npy", np.asarray(report.relevant.class_counts))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # end to end through processes: make acceptance
@pytest.mark.parametrize("gram", ["dense", "streamed", "auto, too little memory on rank 1"])
def test_ddp_two_processes_match_one(mnist_root: Path, tmp_path: Path, gram: str) -> None:
    """Each process extracts its shard; the dense G, or the streamed passes over each shard's
    cache, are all-reduced: every process gets the W of one process (a dense solve). With
    gram=auto the processes agree: G too big for one process's device is streamed by all."""
    data = mnist_subset(mnist_root, 1001)  # odd: the shards differ in size, none is padded
    single = _miner(tmp_path / "single", gram="dense").mine(seeded_lenet(), data)
    images, labels = data.tensors
    mp.spawn(
        _ddp_worker,
        args=(2, _free_port(), images, labels, str(tmp_path), gram),
        nprocs=2,
        join=True,
    )
    cache = ActivationCache(single.cache_path, "")
    x = cache.read("features").astype(np.float64)
    gram_matrix, cross = x.T @ x, x.T @ np.eye(10)[cache.read("labels")]
    optimum = lasso_objective(gram_matrix, cross, single.relevant.weights)
    reference = lasso_homotopy_reference(gram_matrix, cross, 10.0, len(x))
    np.testing.assert_allclose(optimum, lasso_objective(gram_matrix, cross, reference), rtol=1e-6)
    for rank in range(2):
        weights = np.load(tmp_path / f"weights{rank}.npy")
        # a dense G's classes are shared among the processes (each solves every second one,
        # in other cvxpy stacks than one process does): the same optimum, and W within the
        # interior-point solver's tolerance
        tolerance = 1e-6 if gram != "dense" else 2e-5
        np.testing.assert_allclose(weights, single.relevant.weights, atol=tolerance, rtol=0)
        objective = lasso_objective(gram_matrix, cross, weights)
        np.testing.assert_allclose(objective, optimum, rtol=1e-8)
        assert np.load(tmp_path / f"counts{rank}.npy").sum() == 1001
        expected = "dense" if gram == "dense" else "streamed"
        assert (tmp_path / f"gram{rank}.txt").read_text() == expected
    shards = sorted((tmp_path / "cache").glob("*.h5"))
    assert sorted(p.name.split("-")[-1] for p in shards) == ["rank0of2.h5", "rank1of2.h5"]


def test_model_fingerprint_covers_buffers_of_any_shape() -> None:
    from vebi.mining.miner import model_fingerprint
    from vebi.models import SmallVGG

    torch.manual_seed(0)
    model = SmallVGG(num_classes=3, in_channels=3)  # BatchNorm: a 0-dim num_batches_tracked
    before = model_fingerprint(model)
    assert before == model_fingerprint(model)
    model.bn3.num_batches_tracked += 1
    assert model_fingerprint(model) != before


def test_cache_is_deleted_after_use_when_asked(tmp_path: Path, caplog) -> None:
    import logging

    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.rand(64, 1, 28, 28), torch.arange(64) % 10)
    for keep in (True, False):
        miner = FeatureMiner(
            mu=5.0, cache_dir=tmp_path / str(keep), progress=False, keep_cache=keep
        )
        with caplog.at_level(logging.INFO):
            report = miner.mine(seeded_lenet(), data)
        assert report.cache_path.is_file() and "Activation cache:" in caplog.text
        miner.release(report)
        assert report.cache_path.is_file() == keep


def test_caches_follow_the_log_dir(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg("train", ["experiment=mnist", f"paths.log_dir={tmp_path / 'elsewhere'}"])
    assert cfg.mining.cache_dir == str(tmp_path / "elsewhere" / "cache")
    assert cfg.mining.keep_cache is True


def test_streamed_mining_equals_dense_mining(mnist_root: Path, tmp_path: Path, caplog) -> None:
    """gram=streamed (G never formed, as for big networks) mines the W of gram=dense; the
    feature counts are printed before extraction; big m gets smaller cache chunks."""
    import logging

    data = mnist_subset(mnist_root, 600)
    dense = _miner(tmp_path / "dense", gram="dense").mine(seeded_lenet(), data)
    with caplog.at_level(logging.INFO):
        streamed = _miner(tmp_path / "streamed", gram="streamed").mine(seeded_lenet(), data)
    np.testing.assert_allclose(streamed.relevant.weights, dense.relevant.weights, atol=1e-6)
    assert streamed.relevant.metrics["sparse_accuracy_train"] == pytest.approx(
        dense.relevant.metrics["sparse_accuracy_train"]
    )
    assert "Mining 1140 features of 6 layers for 10 classes (G streamed" in caplog.text
    assert "relu3" in caplog.text and "   500" in caplog.text
    miner = FeatureMiner()  # chunks of at most 4096 rows and 64 MB
    assert miner._dense(1140) and not miner._dense(2**20)  # G of 8 TB
    assert miner._chunk_rows(1140) == 4096 and miner._chunk_rows(70400) == 238
    with pytest.raises(VebiError, match="gram must be one of"):
        FeatureMiner(gram="sparse")
