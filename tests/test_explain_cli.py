"""explain.py, image inputs, and interpretation galleries on the short MNIST run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli
from tests.wandb_offline import logged_values
from vebi.errors import VebiError
from vebi.explain.inputs import image_to_tensor, load_images


def test_image_conversion_any_size_and_mode(tmp_path: Path) -> None:
    rgba = Image.fromarray(np.full((40, 60, 4), 255, dtype=np.uint8), "RGBA")
    grey = image_to_tensor(rgba, (1, 28, 28))
    assert grey.shape == (1, 28, 28) and torch.allclose(grey, torch.ones_like(grey))
    palette = Image.fromarray(np.zeros((10, 10), dtype=np.uint8), "P")
    assert image_to_tensor(palette, (3, 16, 16)).shape == (3, 16, 16)
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    images, names, skipped = load_images(tmp_path, (1, 28, 28))
    assert images.shape == (1, 1, 28, 28) and names == ["a.png"]
    assert sorted(s.split(":")[0] for s in skipped) == ["broken.png", "notes.txt"]
    with pytest.raises(VebiError, match="cannot read"):
        load_images(tmp_path / "broken.png", (1, 28, 28))
    with pytest.raises(VebiError, match="neither an image file nor a folder"):
        load_images(tmp_path / "missing", (1, 28, 28))


def test_galleries_made_after_training(short_run: dict) -> None:
    galleries = Path(short_run["output_dir"]) / "mining" / "galleries"
    pngs = sorted(p for p in galleries.glob("class_*.png") if not p.stem.endswith("_top"))
    tops = sorted(galleries.glob("class_*_top.png"))
    assert len(pngs) == 10 and len(tops) == 10
    with Image.open(pngs[0]) as image:
        assert image.size[0] > 300 and image.size[1] > 100
    values = logged_values(Path(short_run["wandb_dir"]))
    assert values["interpretation/galleries/_type"][-1] == "images/separated"
    assert values["interpretation/galleries/count"][-1] == 10
    assert values["interpretation/top_images/count"][-1] == 10
    with Image.open(tops[0]) as image:  # a row per feature, 8 thumbnails each
        assert image.size[0] > 500


def test_explain_cli_writes_overlays_and_json(
    short_run: dict, mnist_root: Path, tmp_path: Path
) -> None:
    digits = tmp_path / "digits"
    digits.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(digits / "blank.jpg")
    (digits / "readme.md").write_text("# not an image")
    frames = [Image.fromarray(np.full((28, 28), v, dtype=np.uint8)) for v in (0, 255)]
    frames[0].save(digits / "moving.gif", save_all=True, append_images=frames[1:])
    # names are text, never mathtext, and a Latin-1 file name is drawn, not a crash
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(digits / "$\\undefinedcmd$.png")
    with open(os.fsencode(digits) + b"/caf\xe9.png", "wb") as latin1:
        Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(latin1, format="PNG")
    result = run_cli(
        "explain.py",
        f"ckpt_path={short_run['best_checkpoint']}",
        f"paths.data_dir={mnist_root}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "logger=none",
        f"input={digits}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 unreadable file(s): readme.md" in result.stdout
    # an animated GIF is explained from its first frame, and says so
    assert "warning: moving.gif: animated (2 frames): the first frame is explained" in (
        result.stdout + result.stderr
    )
    (folder,) = (tmp_path / "logs" / "explain" / "mnist").glob("*/explanations")
    records = json.loads((folder / "explanations.json").read_text())["explanations"]
    notes = {r["image"]: r.get("note") for r in records}
    assert notes == {
        "$\\undefinedcmd$.png": None,
        "blank.jpg": None,
        "caf\udce9.png": None,
        "moving.gif": "animated (2 frames): the first frame is explained",
    }
    assert len(list(folder.glob("*.png"))) == 4
    result = run_cli(
        "explain.py",
        f"ckpt_path={short_run['best_checkpoint']}",
        f"paths.data_dir={mnist_root}",
        f"paths.log_dir={tmp_path / 'logs2'}",
        "logger=none",
        "input=test",
        "num_images=4",
        "k=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = (tmp_path / "logs2" / "explain" / "mnist").glob("*/explanations")
    record = json.loads((folder / "explanations.json").read_text())
    assert [e["image"] for e in record["explanations"]] == [f"test_{i:05d}" for i in range(4)]
    assert record["rules"] == {
        "relu": "guided",
        "conv": "stride_fix",
        "pool": "standard",
        "activation": "guided",
    }
    for entry in record["explanations"]:
        assert 1 <= len(entry["features"]) <= 2 and Path(entry["figure"]).is_file()
    assert len(list(folder.glob("test_*.png"))) == 4


def test_checkpoints_carry_their_settings(short_run: dict, tmp_path: Path) -> None:
    """A job on a checkpoint takes the experiment, data choice, data overrides and experiment
    name it was trained with, unless the command line chooses an experiment itself."""
    from vebi.checkpoint import checkpoint_settings
    from vebi.pipelines.common import with_checkpoint_settings

    ckpt = short_run["best_checkpoint"]
    settings = checkpoint_settings(ckpt)
    assert settings is not None
    assert settings["experiment"] == "mnist" and settings["image_shape"] == [1, 28, 28]
    argv = ["explain.py", f"ckpt_path={ckpt}", "input=test"]
    assert with_checkpoint_settings(argv) == [
        *argv,
        "experiment=mnist",
        "data=mnist",
        "data.train_subset=4000",
        "experiment_name=mnist",
    ]
    given = [*argv, "data.train_subset=10", "experiment_name=mine"]
    assert with_checkpoint_settings(given) == [*given, "experiment=mnist", "data=mnist"]
    for unchanged in (
        [*argv, "experiment=an8flower_double"],
        ["evaluate.py", "-m", f"ckpt_path={ckpt},{ckpt}"],
        ["explain.py", f"ckpt_path={tmp_path / 'missing.ckpt'}"],
        ["explain.py", "input=test"],
    ):
        assert with_checkpoint_settings(unchanged) == unchanged
    # the wrong experiment chosen explicitly: one clear error naming the right one
    result = run_cli(
        "explain.py",
        f"ckpt_path={ckpt}",
        "experiment=an8flower_double",
        f"paths.log_dir={tmp_path}",
        "logger=none",
    )
    assert result.returncode == 1
    assert "trained on images shaped (1, 28, 28)" in result.stderr
    assert "experiment=mnist" in result.stderr


@pytest.mark.slow  # end to end through processes: make acceptance
def test_explain_under_ddp_gives_the_files_of_one_process(
    short_run: dict, mnist_root: Path, tmp_path: Path
) -> None:
    """explain.py on a folder under DDP (2 gloo processes): each process explains every other
    image and writes its overlays, one writes explanations.json: the same records (to 1e-6)
    and the same files as one process; with a single image one process has an empty shard
    and the job still completes."""
    from vebi.data import MNISTDataModule

    datamodule = MNISTDataModule(data_dir=mnist_root)
    datamodule.setup("test")
    digits = tmp_path / "digits"
    digits.mkdir()
    for i in range(3):
        image = (datamodule.data_test.tensors[0][i, 0] * 255).byte().numpy()
        Image.fromarray(image).save(digits / f"digit{i}.png")
    common = [f"ckpt_path={short_run['best_checkpoint']}", "logger=none", f"input={digits}"]
    common += ["trainer.accelerator=cpu", "batch_size=1"]
    ddp = ["trainer.devices=2", "trainer.strategy=ddp"]

    def explained(log_dir: Path, *extra: str) -> tuple[dict, set[str]]:
        result = run_cli("explain.py", *common, f"paths.log_dir={log_dir}", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        (folder,) = log_dir.glob("explain/*/*/explanations")
        record = json.loads((folder / "explanations.json").read_text())
        return record, {p.name for p in folder.glob("*.png")}

    one, one_files = explained(tmp_path / "one")
    two, two_files = explained(tmp_path / "two", *ddp)
    assert one_files == two_files and len(one_files) == 3
    assert [e["image"] for e in two["explanations"]] == [e["image"] for e in one["explanations"]]
    for a, b in zip(one["explanations"], two["explanations"], strict=True):
        assert (a["class"], a["fallback"]) == (b["class"], b["fallback"])
        assert b["probability"] == pytest.approx(a["probability"], abs=1e-6)
        assert [(f["layer"], f["channel"]) for f in a["features"]] == [
            (f["layer"], f["channel"]) for f in b["features"]
        ]
        for fa, fb in zip(a["features"], b["features"], strict=True):
            assert fb["score"] == pytest.approx(fa["score"], abs=1e-6)
    for path in list(digits.iterdir())[1:]:
        path.unlink()
    lone, lone_files = explained(tmp_path / "lone", *ddp)
    assert len(lone["explanations"]) == 1 and len(lone_files) == 1


def test_folder_entries_that_are_not_files_are_listed_not_hung_on(tmp_path: Path) -> None:
    """FIFOs and symbolic link loops inside an input folder used to be skipped unlisted."""
    import os

    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe.png")  # opening it would wait for a writer
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    os.symlink(tmp_path / "missing.png", tmp_path / "gone.png")
    (tmp_path / "sub").mkdir()
    images, names, skipped = load_images(tmp_path, (1, 28, 28))
    assert names == ["a.png"] and len(images) == 1
    assert sorted(skipped) == [
        "gone.png: a broken symbolic link",
        "loop.png: a symbolic link loop",
        "pipe.png: a FIFO (named pipe), not read",
        "sub: a folder (folders inside the input are not searched)",
    ]


def test_an_unreadable_input_folder_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to be reported as "cannot write to" (the tests run as root, for whom no
    permission bit blocks a read: the refusal is the one the OS gives other users)."""
    import errno

    def refuse(self: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(VebiError, match="cannot read the input folder .*Permission denied"):
        load_images(tmp_path, (1, 28, 28))


def test_animated_and_transparent_images_get_a_note(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((8, 8), v, dtype=np.uint8)) for v in (0, 255, 128)]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:])
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red under fully transparent pixels
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "plain.png")
    notes: dict[str, str] = {}
    images, names, _ = load_images(tmp_path, (3, 8, 8), notes)
    assert names == ["clear.png", "moving.gif", "plain.png"]
    assert notes["moving.gif"] == "animated (3 frames): the first frame is explained"
    assert notes["clear.png"].startswith("its transparency is dropped")
    assert "plain.png" not in notes
    assert torch.allclose(images[1], torch.zeros(3, 8, 8))  # the first frame
