"""Bad input, faults and concurrency: each case gets a clear error (or works), never a raw
traceback, a silent misreading, or a half-written artefact."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset, TensorDataset

from tests.conftest import compose_config
from tests.mining_models import planted_colour_data, planted_colour_model, seeded_lenet
from tests.payloads import TouchOnLoad
from vebi import load_classifier, mine_features
from vebi.errors import CheckpointError, VebiError
from vebi.explain.inputs import load_images
from vebi.mining import FeatureMiner, RelevantFeatures
from vebi.mining.cache import ActivationCache
from vebi.mining.miner import dataset_fingerprint
from vebi.utils.cli import report_user_errors
from vebi.utils.io import strict_json


# ------------------------------------------------------------------ 1. resume runs no code
def test_resume_file_with_code_is_refused_whatever_the_environment(
    short_run: dict, mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vebi.pipelines.train import train

    checkpoint = torch.load(short_run["best_checkpoint"], weights_only=True)
    marker = tmp_path / "code-ran"
    checkpoint["payload"] = TouchOnLoad(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(checkpoint, evil)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cfg = compose_config(
        "train",
        [
            "experiment=mnist",
            f"paths.data_dir={mnist_root}",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"ckpt_path={evil}",
            "logger=none",
            "trainer.max_epochs=2",
            "data.train_subset=256",
        ],
        tmp_path / "run",
    )
    with pytest.raises(CheckpointError, match="refusing to load"):
        train(cfg)
    assert not marker.exists()


# ------------------------------------------------------------------ 2. concurrent mining
def _mine_in_process(cache_dir: str, out: str, barrier: multiprocessing.Barrier) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(1500, 1, 28, 28), torch.arange(1500) % 10)
    miner = FeatureMiner(mu=5.0, cache_dir=cache_dir, progress=False, chunk_rows=128)
    model = seeded_lenet()
    barrier.wait()  # both processes reach the cache together
    report = miner.mine(model, data)
    np.save(out, report.relevant.weights)


@pytest.mark.slow  # two spawned mining processes on one cache: make acceptance
def test_two_jobs_on_one_cache_both_finish_with_the_same_weights(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    outs = [str(tmp_path / f"weights{i}.npy") for i in range(2)]
    jobs = [
        context.Process(target=_mine_in_process, args=(str(tmp_path / "cache"), out, barrier))
        for out in outs
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=300)
    assert [job.exitcode for job in jobs] == [0, 0]
    first, second = (np.load(out) for out in outs)
    np.testing.assert_array_equal(first, second)
    assert len(list((tmp_path / "cache").glob("*.h5"))) == 1
    assert not list((tmp_path / "cache").glob("*.partial"))


def test_second_writer_waits_for_the_first_and_says_who(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = ActivationCache(tmp_path / "activations-x.h5", fingerprint="x")
    entered = threading.Event()

    def second() -> None:
        with cache.exclusive():
            entered.set()

    with caplog.at_level(logging.WARNING), cache.exclusive():
        waiting = threading.Thread(target=second)
        waiting.start()
        time.sleep(0.5)
        assert not entered.is_set()  # blocked while the first holds the cache
    waiting.join(timeout=10)
    assert entered.is_set()
    assert "is being written by process" in caplog.text


# ------------------------------------------------------------------ 3. one run dir per run
def test_runs_started_in_the_same_second_get_their_own_dirs(tmp_path: Path) -> None:
    dirs = {
        compose_config("explain", [f"paths.log_dir={tmp_path}"], tmp_path / "run").hydra.run.dir
        for _ in range(3)
    }
    assert len(dirs) == 3


# ------------------------------------------------------------------ 4. unique overlay names
def test_same_stem_different_suffix_gives_two_overlays(short_run: dict, tmp_path: Path) -> None:
    from vebi.pipelines.explain import explain

    folder = tmp_path / "images"
    folder.mkdir()
    digit = (np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)
    Image.fromarray(digit).save(folder / "a.png")
    Image.fromarray(255 - digit).save(folder / "a.jpg")
    cfg = compose_config(
        "explain",
        [
            f"ckpt_path={short_run['best_checkpoint']}",
            f"relevant_features={short_run['relevant_features']}",
            f"input={folder}",
            f"paths.log_dir={tmp_path / 'logs'}",
            "logger=none",
        ],
        tmp_path / "run",
    )
    result = explain(cfg)
    figures = [record["figure"] for record in result["explanations"]]
    assert len(set(figures)) == 2 and all(Path(f).is_file() for f in figures)
    written = json.loads((tmp_path / "run" / "explanations" / "explanations.json").read_text())
    assert [r["image"] for r in written["explanations"]] == ["a.jpg", "a.png"]


# ------------------------------------------------------------------ 5. 16-bit and float images
def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    Image.fromarray(np.full((20, 20), 30000, np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.full((20, 20), 0.25, np.float32)).save(tmp_path / "float.tiff")
    images, names, skipped = load_images(tmp_path, (3, 28, 28))
    assert names == ["deep.png", "float.tiff"] and not skipped
    assert images[0].mean().item() == pytest.approx(30000 / 65535, abs=1e-4)
    assert images[1].mean().item() == pytest.approx(0.25, abs=1e-6)
    Image.fromarray(np.full((20, 20), 7.0, np.float32)).save(tmp_path / "bad.tiff")
    with pytest.raises(VebiError, match=r"outside \[0, 1\]"):
        load_images(tmp_path / "bad.tiff", (1, 28, 28))


# ------------------------------------------------------------------ 6. decompression bombs
def test_decompression_bomb_is_skipped_in_a_folder_and_refused_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("L", (60, 60)).save(tmp_path / "bomb.png")  # 3600 pixels
    Image.new("L", (20, 20)).save(tmp_path / "ok.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a bomb is > 2x the limit
    images, names, skipped = load_images(tmp_path, (1, 28, 28))
    assert names == ["ok.png"] and skipped == ["bomb.png: DecompressionBombError"]
    with pytest.raises(VebiError, match="decompression bomb"):
        load_images(tmp_path / "bomb.png", (1, 28, 28))


# ------------------------------------------------------------------ 7. argument ranges
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("target=-1", r"target .* must be an integer in 0\.\.9"),
        ("target=10", r"target .* must be an integer in 0\.\.9"),
        ("num_images=0", "num_images must be an integer >= 1"),
        ("batch_size=0", "batch_size must be an integer >= 1"),
    ],
)
def test_explain_settings_out_of_range(
    short_run: dict, tmp_path: Path, override: str, message: str
) -> None:
    from vebi.pipelines.explain import explain

    cfg = compose_config(
        "explain",
        [
            f"ckpt_path={short_run['best_checkpoint']}",
            f"relevant_features={short_run['relevant_features']}",
            f"paths.log_dir={tmp_path}",
            "logger=none",
            override,
        ],
        tmp_path / "run",
    )
    with pytest.raises(VebiError, match=message):
        explain(cfg)


def test_evaluate_and_train_settings_out_of_range(tmp_path: Path) -> None:
    from vebi.pipelines.evaluate import evaluate
    from vebi.pipelines.train import train

    for override, allowed in (
        ("evaluation.heatmap_images=0", ">= 1"),
        ("evaluation.steps=0", "in 1..1000"),
        ("evaluation.batch_size_inference=0", ">= 1"),  # was a raw DataLoader error
        ("evaluation.panel_images_per_class=-1", ">= 0"),  # was a silent [:-1]
    ):
        cfg = compose_config("evaluate", [override, "logger=none"], tmp_path / "run")
        key = override.split("=")[0]
        with pytest.raises(VebiError, match=f"{key} must be an integer {allowed}"):
            evaluate(cfg)
    cfg = compose_config("train", ["trainer.max_epochs=-1", "logger=none"], tmp_path / "run")
    with pytest.raises(VebiError, match="max_epochs must be >= 1"):
        train(cfg)


# ------------------------------------------------------------------ 8. relevant_features.h5
def _rewrite(source: Path, target: Path, change) -> Path:
    with h5py.File(source, "r") as handle:
        weights, meta = handle["weights"][...], json.loads(handle.attrs["meta"])
    weights, meta = change(weights, meta)
    with h5py.File(target, "w") as handle:
        handle.create_dataset("weights", data=weights)
        handle.attrs["meta"] = json.dumps(meta)
    return target


def test_relevant_features_file_is_checked_on_load(short_run: dict, tmp_path: Path) -> None:
    source = Path(short_run["relevant_features"])

    def nan(weights, meta):
        weights[3, 2] = np.nan
        return weights, meta

    with pytest.raises(VebiError, match="NaN/Inf"):
        RelevantFeatures.load(_rewrite(source, tmp_path / "nan.h5", nan))

    def extra(weights, meta):
        return weights, {**meta, "surprise": 1}

    with pytest.raises(VebiError, match=r"unknown: \['surprise'\]"):
        RelevantFeatures.load(_rewrite(source, tmp_path / "extra.h5", extra))

    def missing(weights, meta):
        meta.pop("mu")
        return weights, meta

    with pytest.raises(VebiError, match=r"missing: \['mu'\]"):
        RelevantFeatures.load(_rewrite(source, tmp_path / "missing.h5", missing))

    def wider(weights, meta):  # one more channel in the first layer than LeNet has
        meta["channels"][0] += 1
        return np.vstack([np.zeros((1, weights.shape[1])), weights]), meta

    relevant = RelevantFeatures.load(_rewrite(source, tmp_path / "wider.h5", wider))
    model = load_classifier(short_run["best_checkpoint"]).net
    with pytest.raises(VebiError, match="do not belong to this network"):
        relevant.check_model(model, torch.rand(1, 1, 28, 28))
    RelevantFeatures.load(source).check_model(model, torch.rand(1, 1, 28, 28))  # the real one


# ------------------------------------------------------------------ 9. malformed checkpoints
def _variant(short_run: dict, tmp_path: Path, name: str, change) -> Path:
    checkpoint = torch.load(short_run["best_checkpoint"], weights_only=True)
    change(checkpoint)
    path = tmp_path / f"{name}.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("unexpected_argument", "cannot build the checkpoint's network"),
        ("no_num_classes", "no valid num_classes"),
        ("state_dict_not_a_dict", "not a mapping of names to tensors"),
        ("absurd_layer", "does not fit the network it names"),
        ("lookalike_package", "outside the trusted packages"),
    ],
)
def test_malformed_checkpoints_are_checkpoint_errors(
    short_run: dict, tmp_path: Path, name: str, message: str
) -> None:
    def change(checkpoint: dict) -> None:
        meta = checkpoint["vebi"]
        if name == "unexpected_argument":
            meta["architecture"] = {**meta["architecture"], "depth": 7}
        elif name == "no_num_classes":
            meta.pop("num_classes")
            checkpoint["hyper_parameters"].pop("num_classes")
        elif name == "state_dict_not_a_dict":
            checkpoint["state_dict"] = [1, 2, 3]
        elif name == "absurd_layer":  # 4 TB if it were built
            meta["architecture"] = {
                "_target_": "torch.nn.Linear",
                "in_features": 1_000_000,
                "out_features": 1_000_000,
            }
        else:
            meta["architecture"] = {"_target_": "torch.nnx.Linear"}

    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        load_classifier(_variant(short_run, tmp_path, name, change))
    assert time.perf_counter() - started < 30


def test_empty_file_and_folder_say_what_they_are(tmp_path: Path) -> None:
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty or truncated"):
        load_classifier(empty)
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_classifier(tmp_path)


# ------------------------------------------------------------------ 10. file-system faults
def test_cache_dir_that_is_a_file_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("")
    data = TensorDataset(torch.rand(8, 1, 28, 28), torch.arange(8) % 10)
    with pytest.raises(VebiError, match="is a file, not a folder"):
        FeatureMiner(cache_dir=blocker, progress=False).mine(seeded_lenet(), data)


def test_disk_full_is_one_line_and_exit_1(caplog: pytest.LogCaptureFixture) -> None:
    @report_user_errors
    def job() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/cache/activations.h5")

    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
        job()
    assert stop.value.code == 1
    assert "cannot write to /data/cache/activations.h5: No space left on device" in caplog.text

    @report_user_errors
    def bug() -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError):  # not about the machine: a bug keeps its traceback
        bug()


# ------------------------------------------------------------------ 11. stale activations
def test_changing_any_image_changes_the_cache_key(tmp_path: Path) -> None:
    images = torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(images, torch.arange(1000) % 10)
    before = dataset_fingerprint(Subset(data, range(900)))
    images[555, 0, 3, 3] += 0.5  # not one of the old fingerprint's 64 sampled images
    assert dataset_fingerprint(Subset(data, range(900))) != before

    from torchvision.datasets import ImageFolder

    for c in range(2):
        (tmp_path / f"class{c}").mkdir()
        for i in range(70):
            Image.new("L", (8, 8), color=i).save(tmp_path / f"class{c}" / f"{i:03d}.png")
    folder_before = dataset_fingerprint(ImageFolder(str(tmp_path)))
    Image.new("L", (8, 8), color=200).save(tmp_path / "class1" / "005.png")  # replaced
    assert dataset_fingerprint(ImageFolder(str(tmp_path))) != folder_before


def test_newest_checkpoint_includes_multirun_jobs(tmp_path: Path) -> None:
    """The README's multirun example writes multirun_<time>/<job>/checkpoints/best.ckpt:
    the newest-checkpoint lookup finds those as well as single runs."""
    import os

    from vebi.checkpoint import newest_checkpoint

    single = tmp_path / "2026-01-01_00-00-00" / "checkpoints" / "best.ckpt"
    job = tmp_path / "multirun_2026-01-02_00-00-00" / "1" / "checkpoints" / "best.ckpt"
    for age, path in ((100, single), (10, job)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (time.time() - age, time.time() - age))
    assert newest_checkpoint(tmp_path) == job
    os.utime(single, None)
    assert newest_checkpoint(tmp_path) == single
    with pytest.raises(CheckpointError, match="no checkpoint matches"):
        newest_checkpoint(tmp_path / "nothing")


def test_transforms_that_print_alike_get_their_own_cache(tmp_path: Path) -> None:
    """Two ``transforms.Lambda`` print the same once addresses are stripped: the second data
    set used to reuse the first one's activations (W identical to the first run)."""
    from torchvision import transforms

    base = planted_colour_data(20)

    class Transformed(torch.utils.data.Dataset):
        """Tensors in memory plus a transform, as most data sets are."""

        def __init__(self, transform: Any) -> None:
            self.images, self.labels = base.tensors
            self.transform = transform

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self.transform(self.images[index]), self.labels[index]

    squared = Transformed(transforms.Lambda(lambda x: x**2))
    rooted = Transformed(transforms.Lambda(lambda x: x.sqrt()))
    assert repr(squared.transform).split(" at ")[0] == repr(rooted.transform).split(" at ")[0]
    assert dataset_fingerprint(squared) != dataset_fingerprint(rooted)
    net = planted_colour_model()
    first = mine_features(net, squared, mu=1.0, cache_dir=tmp_path, progress=False)
    second = mine_features(net, rooted, mu=1.0, cache_dir=tmp_path, progress=False)
    fresh = mine_features(net, rooted, mu=1.0, progress=False)
    np.testing.assert_allclose(second.weights, fresh.weights, atol=1e-8)
    assert not np.allclose(first.weights, second.weights)
    assert len(list(tmp_path.glob("activations-*.h5"))) == 2


def test_random_transforms_are_never_reused_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Noisy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return torch.rand(1, 4, 4), index % 2

    with caplog.at_level("WARNING"):
        assert dataset_fingerprint(Noisy()) != dataset_fingerprint(Noisy())
    assert "will not be reused" in caplog.text


def test_mu_too_small_or_too_large_is_one_clear_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """mu=1e-12 used to end with no relevant feature for any class and exit 0; mu=1e12 with
    100 lines of solver messages and "did not converge"."""
    data, net = planted_colour_data(20), planted_colour_model()
    with pytest.raises(VebiError, match=r"mu=1e-12 leaves no class a relevant feature.*mu=10"):
        mine_features(net, data, mu=1e-12, progress=False)
    caplog.clear()
    huge = FeatureMiner(mu=1e12, progress=False, solvers=["CLARABEL"], cache_dir=tmp_path)
    with caplog.at_level("WARNING"), pytest.raises(VebiError, match="between 1 and 100"):
        huge.mine(net, data)
    solver_lines = [r for r in caplog.records if "CLARABEL" in r.getMessage()]
    assert 1 <= len(solver_lines) <= 2, [r.getMessage() for r in solver_lines]
    assert list(tmp_path.glob("activations-*.h5"))  # kept for the rerun with a better mu


def test_results_json_is_strict_json_with_few_images(short_run: dict, tmp_path: Path) -> None:
    """evaluate.py on 5 images used to write NaN tokens that strict JSON parsers reject."""
    from vebi.pipelines.evaluate import evaluate

    cfg = compose_config(
        "evaluate",
        [
            f"ckpt_path={short_run['best_checkpoint']}",
            f"paths.log_dir={tmp_path / 'logs'}",
            "logger=none",
            "evaluation.max_images=5",
            "evaluation.select=[vebi,gradient]",
        ],
        tmp_path / "run",
    )
    evaluate(cfg)

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    results = json.loads((tmp_path / "run" / "results.json").read_text(), parse_constant=refuse)
    notes = [n for n in results["notes"] if "undefined (NaN or Inf" in n]
    assert len(notes) == 1 and "written as null" in notes[0]
    assert strict_json({"a": [1.0, float("nan")], "b": {"c": float("inf")}}) == (
        json.dumps({"a": [1.0, None], "b": {"c": None}}, indent=2),
        ["a/1", "b/c"],
    )


def test_class_names_that_collide_as_file_names_keep_their_own_panels() -> None:
    """ "zero/one" and "zero_one" were both written to panels/zero_one.png."""
    from types import SimpleNamespace

    from vebi.evaluation.reporting import class_panels

    images = SimpleNamespace(images=torch.rand(2, 1, 8, 8), masks=None)
    rows = {0: torch.tensor([0]), 1: torch.tensor([1])}
    panels = class_panels(images, rows, {"m": torch.rand(2, 8, 8)}, ["zero/one", "zero_one"])
    assert list(panels) == ["zero_one", "zero_one-2"]


def test_control_characters_in_names_are_escaped_on_the_console() -> None:
    from vebi.utils.log import ConsoleFormatter

    record = logging.LogRecord("x", logging.WARNING, "", 0, "class %s", ("\x1b[2Jevil\r",), None)
    line = ConsoleFormatter().format(record)
    assert line == "warning: class \\x1b[2Jevil\\r" and "\x1b" not in line
