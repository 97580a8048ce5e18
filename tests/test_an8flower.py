"""The an8Flower generator, the published layout it writes, and the data module reading it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vebi.data import An8FlowerDataModule, An8FlowerGenerator
from vebi.data.an8flower import (
    PART_LABELS,
    PARTS,
    VARIANTS,
    part_label_map,
    read_an8flower_folder,
    read_part_labels,
)
from vebi.errors import VebiError


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("an8")
    An8FlowerGenerator("double", image_size=64, images_per_class=12, seed=3).write(
        root, progress=False
    )
    return root


@pytest.fixture(scope="module")
def generated_single(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("an8single")
    An8FlowerGenerator("single", image_size=48, images_per_class=4, seed=2).write(
        root, progress=False
    )
    return root


def test_layout_and_masks(generated: Path) -> None:
    images, masks = generated / "an8flower_double", generated / "an8flower_double_MASK"
    classes = sorted(p.name for p in images.iterdir())
    assert len(classes) == 12 and classes == sorted(p.name for p in masks.iterdir())
    parts = generated / "an8flower_double_PARTS"
    assert classes == sorted(p.name for p in parts.iterdir())
    for name in classes:
        files = sorted(p.name for p in (images / name).iterdir())
        assert len(files) == 12 and files == sorted(p.name for p in (masks / name).iterdir())
        assert files == sorted(p.name for p in (parts / name).iterdir())
    first = sorted((images / classes[0]).iterdir())[0]
    mask = np.asarray(Image.open(masks / classes[0] / first.name))
    assert set(np.unique(mask)) == {0, 255} and 0 < (mask == 0).mean() < 0.3  # dark = relevant
    assert Image.open(first).size == (64, 64)


def test_deterministic_by_seed_and_independent_of_batching() -> None:
    a = An8FlowerGenerator("single", image_size=48, seed=5, batch_size=4).render(2, range(6))
    b = An8FlowerGenerator("single", image_size=48, seed=5, batch_size=64).render(2, [3, 4, 5])
    np.testing.assert_array_equal(a[0][3:], b[0])
    c = An8FlowerGenerator("single", image_size=48, seed=6).render(2, range(3))
    assert not np.array_equal(a[0][:3], c[0])


@pytest.mark.parametrize("variant", ["single", "double"])
def test_only_the_deciding_parts_separate_the_classes(variant: str) -> None:
    """Mean colour of each part per class: deciding parts differ by class, the others do not."""
    generator = An8FlowerGenerator(variant, image_size=64, seed=1)
    spec = VARIANTS[variant]
    stats: dict[str, list[np.ndarray]] = {}
    for class_id in range(spec.num_classes):
        images, visible = generator.render(class_id, range(150))
        for part, mask in visible.items():
            pixels = [img[m].mean(axis=0) for img, m in zip(images, mask, strict=True) if m.any()]
            stats.setdefault(part, []).append(np.mean(pixels, axis=0) / 255)
    for part, means in stats.items():
        spread = np.ptp(np.stack(means), axis=0).max()  # largest class-to-class difference
        if part in spec.deciding:
            assert spread > 0.3, (part, spread)
        else:
            assert spread < 0.1, (part, spread)


def test_data_module_reads_masks_and_splits(generated: Path) -> None:
    datamodule = An8FlowerDataModule(
        data_dir=generated, name="an8flower_double", image_size=64, generate=False, progress=False
    )
    datamodule.prepare_data()
    datamodule.setup()
    sizes = [len(datamodule.data_train), len(datamodule.data_val), len(datamodule.data_test)]
    assert sum(sizes) == 144 and sizes[1] == sizes[2] == 24  # 2 of 12 per class each
    image, label, mask = datamodule.data_test[0]
    assert image.shape == (3, 64, 64) and image.min() >= 0 and image.max() <= 1
    assert mask.shape == (64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0 < mask.mean() < 0.3  # 1 = the (small) deciding region
    assert datamodule.num_classes == 12 and datamodule.class_names[0].startswith("class00")
    again = An8FlowerDataModule(
        data_dir=generated, name="an8flower_double", image_size=64, generate=False, progress=False
    )
    again.setup()
    assert torch.equal(again.data_val.labels, datamodule.data_val.labels)


def _copy(generated: Path, tmp_path: Path, suffixes: tuple[str, ...] = ("", "_MASK")) -> Path:
    for suffix in suffixes:
        shutil.copytree(
            generated / f"an8flower_double{suffix}", tmp_path / f"an8flower_double{suffix}"
        )
    return tmp_path / "an8flower_double"


def test_bad_inputs_are_clear_errors(generated: Path, tmp_path: Path) -> None:
    folder = _copy(generated, tmp_path)
    first_class = sorted(folder.iterdir())[0]
    victim = sorted(first_class.iterdir())[0]
    mask_dir = tmp_path / "an8flower_double_MASK" / first_class.name

    victim.write_bytes(b"not a png")  # corrupt image
    with pytest.raises(VebiError, match=f"cannot read .*{victim.name}"):
        read_an8flower_folder(folder, progress=False)
    shutil.copy(generated / "an8flower_double" / first_class.name / victim.name, victim)

    (mask_dir / victim.name).rename(tmp_path / "moved.png")  # image without its mask
    with pytest.raises(VebiError, match="1 image\\(s\\) have no mask"):
        read_an8flower_folder(folder, progress=False)
    (tmp_path / "moved.png").rename(mask_dir / victim.name)

    Image.new("L", (32, 32), 255).save(mask_dir / victim.name)  # size mismatch
    with pytest.raises(VebiError, match="but its mask is 32x32"):
        read_an8flower_folder(folder, progress=False)
    shutil.copy(
        generated / "an8flower_double_MASK" / first_class.name / victim.name, mask_dir / victim.name
    )

    (folder / "zz_empty").mkdir()  # empty class folder
    with pytest.raises(VebiError, match="holds no images"):
        read_an8flower_folder(folder, progress=False)


def test_generation_on_first_use_and_refusals(tmp_path: Path) -> None:
    datamodule = An8FlowerDataModule(
        data_dir=tmp_path,
        name="flowers",
        variant="single",
        images_per_class=4,
        image_size=48,
        progress=False,
    )
    datamodule.prepare_data()
    assert len(list((tmp_path / "flowers").rglob("*.png"))) == 24
    assert len(list((tmp_path / "flowers_PARTS").rglob("*.png"))) == 24
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    with pytest.raises(VebiError, match="already exists"):
        An8FlowerGenerator("single", image_size=48, images_per_class=4).write(tmp_path, "flowers")
    with pytest.raises(VebiError, match="set data.generate=true"):
        An8FlowerDataModule(data_dir=tmp_path, name="absent", generate=False).prepare_data()
    with pytest.raises(VebiError, match="unknown an8Flower variant"):
        An8FlowerGenerator("triple")


def _labels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image)


def _module(root: Path, **overrides) -> An8FlowerDataModule:
    """A data module on the ``generated`` settings (double, 64 px, 12 per class, seed 3)."""
    settings = dict(
        data_dir=root,
        name="an8flower_double",
        variant="double",
        image_size=64,
        images_per_class=12,
        generator_seed=3,
        progress=False,
    )
    return An8FlowerDataModule(**{**settings, **overrides})


def test_part_labels_on_disk_are_what_render_drew(generated: Path) -> None:
    assert PART_LABELS == ("background", "petals", "centre", "stem", "leaves")
    generator = An8FlowerGenerator("double", image_size=64, images_per_class=12, seed=3)
    parts = generated / "an8flower_double_PARTS"
    for class_id in range(VARIANTS["double"].num_classes):
        _, visible = generator.render(class_id, range(12))
        for index in range(12):
            name = VARIANTS["double"].class_name(class_id)
            labels = _labels(parts / name / generator.file_name(class_id, index))
            assert labels.dtype == np.uint8 and labels.shape == (64, 64)
            drawn = np.zeros_like(labels)
            for value, part in enumerate(PARTS, start=1):
                np.testing.assert_array_equal(labels == value, visible[part][index])
                drawn[visible[part][index]] = value
            np.testing.assert_array_equal(labels, drawn)  # 0 exactly where no part is visible
            assert labels.max() <= 4
    overlapping = {part: np.ones((1, 4, 4), bool) for part in PARTS}
    with pytest.raises(VebiError, match="overlap"):
        part_label_map(overlapping)


@pytest.mark.parametrize("variant", ["single", "double"])
def test_deciding_parts_of_the_labels_are_the_mask(
    variant: str, generated: Path, generated_single: Path
) -> None:
    root = generated if variant == "double" else generated_single
    folder = root / f"an8flower_{variant}"
    deciding = [PART_LABELS.index(p) for p in VARIANTS[variant].deciding]
    files = sorted(folder.rglob("*.png"))
    assert len(files) == (144 if variant == "double" else 24)
    for path in files:
        relative = path.relative_to(folder)
        labels = _labels(folder.with_name(folder.name + "_PARTS") / relative)
        dark = np.asarray(Image.open(folder.with_name(folder.name + "_MASK") / relative)) == 0
        np.testing.assert_array_equal(np.isin(labels, deciding), dark, err_msg=str(relative))


def test_part_labels_align_with_the_splits(generated: Path) -> None:
    datamodule = _module(generated, generate=False)
    datamodule.prepare_data()
    datamodule.setup()
    assert datamodule.part_names == PART_LABELS
    assert datamodule.deciding_parts == ("centre", "leaves")
    assert _module(generated, variant="single").deciding_parts == ("petals",)
    deciding = [PART_LABELS.index(p) for p in datamodule.deciding_parts]
    for split, dataset in [
        ("train", datamodule.data_train),
        ("val", datamodule.data_val),
        ("test", datamodule.data_test),
    ]:
        labels = datamodule.part_labels(split)
        assert labels.dtype == torch.uint8 and labels.shape == (len(dataset), 64, 64)
        for i in range(len(dataset)):
            _, _, mask = dataset[i]
            assert torch.equal(torch.from_numpy(np.isin(labels[i].numpy(), deciding)), mask.bool())
    assert datamodule.part_labels("test") is datamodule.part_labels("test")  # read once
    with pytest.raises(VebiError, match="unknown split"):
        datamodule.part_labels("mining")
    with pytest.raises(VebiError, match="call setup"):
        _module(generated).part_labels("test")


def test_part_labels_resize_like_the_masks(generated: Path) -> None:
    datamodule = _module(generated, generate=False, image_size=48)
    datamodule.setup()
    labels = datamodule.part_labels("test")
    assert labels.shape == (len(datamodule.data_test), 48, 48)
    deciding = [PART_LABELS.index(p) for p in datamodule.deciding_parts]
    for i in range(len(datamodule.data_test)):
        mask = datamodule.data_test[i][2].bool()
        assert torch.equal(torch.from_numpy(np.isin(labels[i].numpy(), deciding)), mask)


def test_parts_only_regeneration_gives_the_same_labels(generated: Path, tmp_path: Path) -> None:
    folder = _copy(generated, tmp_path)  # a folder generated before part labels were written
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")}
    _module(tmp_path).prepare_data()
    parts = sorted((tmp_path / "an8flower_double_PARTS").rglob("*.png"))
    assert len(parts) == 144
    for path in parts:
        relative = path.relative_to(tmp_path / "an8flower_double_PARTS")
        reference = generated / "an8flower_double_PARTS" / relative
        np.testing.assert_array_equal(_labels(path), _labels(reference))
    assert before == {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")}  # images untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    with pytest.raises(VebiError, match="already exists"):
        An8FlowerGenerator("double", 64, 12, seed=3).write_parts(tmp_path, "an8flower_double")


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"generator_seed": 4}, "differs from the image drawn again"),
        ({"images_per_class": 10}, "holds 12 files, not the 10 images"),
        ({"variant": "single"}, "class folders are not the 6 of the single variant"),
    ],
)
def test_a_mismatching_folder_is_refused(
    generated: Path, tmp_path: Path, overrides: dict, reason: str
) -> None:
    _copy(generated, tmp_path)
    with pytest.raises(VebiError, match="was not generated with these settings") as error:
        _module(tmp_path, **overrides).prepare_data()
    assert reason in str(error.value) and "Delete" in str(error.value)
    assert "data.generate=false" in str(error.value)
    assert not (tmp_path / "an8flower_double_PARTS").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_part_label_files_are_refused(generated: Path, tmp_path: Path) -> None:
    folder = _copy(generated, tmp_path, ("", "_MASK", "_PARTS"))
    files = [str(p.relative_to(folder)) for p in sorted(folder.rglob("*.png"))]
    victim = tmp_path / "an8flower_double_PARTS" / files[5]
    original = victim.read_bytes()
    assert read_part_labels(folder, files).shape == (144, 64, 64)

    victim.write_bytes(b"not a png")
    with pytest.raises(VebiError, match=f"cannot read .*{victim.name}"):
        read_part_labels(folder, files)
    Image.new("L", (32, 32), 0).save(victim)
    with pytest.raises(VebiError, match=f"{victim.name} is 32x32 but its image is 64x64"):
        read_part_labels(folder, files, image_size=64)
    Image.new("L", (64, 64), 7).save(victim)
    with pytest.raises(VebiError, match=f"{victim.name} holds the value 7"):
        read_part_labels(folder, files)
    Image.new("RGB", (64, 64)).save(victim)
    with pytest.raises(VebiError, match=f"{victim.name} is a RGB image"):
        read_part_labels(folder, files)
    victim.unlink()
    with pytest.raises(VebiError, match=f"no part labels .*{victim.name}"):
        read_part_labels(folder, files)
    victim.write_bytes(original)

    datamodule = _module(tmp_path, generate=False)  # the same refusals through the data module
    datamodule.setup()
    (tmp_path / "an8flower_double_PARTS" / datamodule._files[datamodule._split["test"][0]]).unlink()
    with pytest.raises(VebiError, match="no part labels"):
        datamodule.part_labels("test")


def test_no_part_labels_without_the_parts_folder(generated: Path, tmp_path: Path) -> None:
    _copy(generated, tmp_path)
    datamodule = _module(tmp_path, generate=False)
    datamodule.prepare_data()
    datamodule.setup()
    assert not (tmp_path / "an8flower_double_PARTS").exists()
    assert datamodule.part_labels("test") is None and len(datamodule.data_test) == 24
    # a folder that is not in the generator's layout has none either, even with generate=true
    (tmp_path / "an8flower_double" / "class00_centre000_leaves029").rename(
        tmp_path / "an8flower_double" / "roses"
    )
    (tmp_path / "an8flower_double_MASK" / "class00_centre000_leaves029").rename(
        tmp_path / "an8flower_double_MASK" / "roses"
    )
    foreign = _module(tmp_path)
    foreign.prepare_data()
    foreign.setup()
    assert foreign.part_labels("train") is None
    assert not (tmp_path / "an8flower_double_PARTS").exists()
