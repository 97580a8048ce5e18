"""The an8Flower generator, the published layout it writes, and the data module reading it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vebi.data import An8FlowerDataModule, An8FlowerGenerator
from vebi.data.an8flower import VARIANTS, read_an8flower_folder
from vebi.errors import VebiError


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("an8")
    An8FlowerGenerator("double", image_size=64, images_per_class=12, seed=3).write(
        root, progress=False
    )
    return root


def test_layout_and_masks(generated: Path) -> None:
    images, masks = generated / "an8flower_double", generated / "an8flower_double_MASK"
    classes = sorted(p.name for p in images.iterdir())
    assert len(classes) == 12 and classes == sorted(p.name for p in masks.iterdir())
    for name in classes:
        files = sorted(p.name for p in (images / name).iterdir())
        assert len(files) == 12 and files == sorted(p.name for p in (masks / name).iterdir())
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


def _copy(generated: Path, tmp_path: Path) -> Path:
    for suffix in ("", "_MASK"):
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
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    with pytest.raises(VebiError, match="already exists"):
        An8FlowerGenerator("single", image_size=48, images_per_class=4).write(tmp_path, "flowers")
    with pytest.raises(VebiError, match="set data.generate=true"):
        An8FlowerDataModule(data_dir=tmp_path, name="absent", generate=False).prepare_data()
    with pytest.raises(VebiError, match="unknown an8Flower variant"):
        An8FlowerGenerator("triple")
