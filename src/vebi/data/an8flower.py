"""an8Flower-style data: synthetic flowers whose class is decided only by the colour of one or
two parts, with a pixel mask of the deciding part(s) (Oramas et al., ICLR 2019).

The published set cannot be downloaded here, so :class:`An8FlowerGenerator` draws data of the
same kind and writes it in the published layout, which :class:`An8FlowerDataModule` reads:

    <root>/<name>/<class>/<image>.png          the images
    <root>/<name>_MASK/<class>/<image>.png     the masks, class-deciding region dark

Each flower has petals (a rose curve with 4-8 petals), a centre disc, a stem and two leaves, at
a random position, scale and rotation, over a textured background (low-frequency colour noise)
under a random lighting ramp with pixel noise. The deciding part(s) take a class colour (a fixed
hue with a little jitter); every other part's colour comes from one distractor distribution
shared by all classes (uniform hue, random saturation and value), which also covers the class
hues. So nothing but the deciding parts separates the classes.

Variants: ``single``: 6 classes decided by the petal colour; ``double``: 12 classes decided by
the colours of the centre (3 hues) and the leaves (4 hues).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vebi.data.base import SplitDataModule
from vebi.errors import VebiError
from vebi.utils.log import get_logger

log = get_logger(__name__)

PARTS = ("petals", "centre", "stem", "leaves")
#: Hues of the class colours (0..1): red, orange, yellow, green, blue, purple.
SIX_HUES = (0.0, 0.08, 0.16, 0.33, 0.61, 0.78)


@dataclass(frozen=True)
class Variant:
    """Which parts decide the class, and the hues each deciding part can take."""

    deciding: tuple[str, ...]
    hues: tuple[tuple[float, ...], ...]

    @property
    def num_classes(self) -> int:
        return int(np.prod([len(h) for h in self.hues]))

    def class_hues(self, class_id: int) -> dict[str, float]:
        """The hue of each deciding part for ``class_id`` (mixed radix over the parts)."""
        hues, rest = {}, class_id
        for part, options in zip(reversed(self.deciding), reversed(self.hues), strict=True):
            rest, index = divmod(rest, len(options))
            hues[part] = options[index]
        return hues

    def class_name(self, class_id: int) -> str:
        hues = self.class_hues(class_id)
        return f"class{class_id:02d}_" + "_".join(
            f"{p}{int(round(hues[p] * 360)):03d}" for p in self.deciding
        )


VARIANTS = {
    "single": Variant(("petals",), (SIX_HUES,)),
    "double": Variant(("centre", "leaves"), ((0.0, 0.33, 0.61), (0.08, 0.16, 0.5, 0.78))),
}


def _rotate(x: np.ndarray, y: np.ndarray, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cos, sin = np.cos(angle), np.sin(angle)
    return cos * x + sin * y, -sin * x + cos * y


class An8FlowerGenerator:
    """Draws an8Flower-style images and masks, vectorised over a batch, deterministic by seed.

    Args:
        variant: ``single`` or ``double``.
        image_size: side of the square images (112 as in the paper).
        images_per_class: images written per class.
        seed: the same seed gives the same files, whatever the batch size.
    """

    def __init__(
        self,
        variant: str = "double",
        image_size: int = 112,
        images_per_class: int = 300,
        seed: int = 0,
        batch_size: int = 64,
    ) -> None:
        if variant not in VARIANTS:
            raise VebiError(
                f"unknown an8Flower variant {variant!r}; choose from {sorted(VARIANTS)}"
            )
        if image_size < 32 or images_per_class < 1:
            raise VebiError("image_size must be >= 32 and images_per_class >= 1")
        self.variant_name = variant
        self.variant = VARIANTS[variant]
        self.size = image_size
        self.images_per_class = images_per_class
        self.seed = seed
        self.batch_size = batch_size

    def render(
        self, class_id: int, indices: Sequence[int]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Images (B, H, W, 3) uint8 and visible part masks {part: (B, H, W) bool}."""
        rngs = [np.random.default_rng([self.seed, class_id, int(i)]) for i in indices]
        draw = lambda f: np.array([f(r) for r in rngs])  # noqa: E731 - one value per image
        b, s = len(rngs), self.size
        grid = (np.arange(s) + 0.5) / s
        gy, gx = np.meshgrid(grid, grid, indexing="ij")
        gx, gy = gx[None], gy[None]
        col = lambda v: v[:, None, None]  # noqa: E731

        # geometry (in units of the image side)
        radius = draw(lambda r: r.uniform(0.16, 0.24))
        cx, cy = draw(lambda r: r.uniform(0.3, 0.7)), draw(lambda r: r.uniform(0.25, 0.5))
        turn = draw(lambda r: r.uniform(0, 2 * np.pi))
        petals_n = draw(lambda r: r.integers(4, 9))
        stem_angle = draw(lambda r: r.uniform(-0.35, 0.35))  # from straight down
        stem_length = radius * draw(lambda r: r.uniform(1.6, 2.4))
        dx, dy = gx - col(cx), gy - col(cy)
        rho, phi = np.hypot(dx, dy), np.arctan2(dy, dx)
        petal_edge = col(radius) * (
            0.45 + 0.55 * np.abs(np.cos(col(petals_n) / 2 * (phi - col(turn)))) ** 0.8
        )
        masks = {"petals": rho < petal_edge, "centre": rho < 0.3 * col(radius)}
        # stem coordinates: sy runs down the (slightly tilted) stem from the centre, sx across it
        sx, sy = _rotate(dx, dy, col(stem_angle))
        stem_mask = (sy > 0) & (sy < col(stem_length)) & (np.abs(sx) < 0.07 * col(radius) + 0.008)
        masks["stem"] = stem_mask
        leaves = np.zeros_like(stem_mask)
        for side in (-1.0, 1.0):
            attach = col(stem_length * draw(lambda r: r.uniform(0.45, 0.75)))
            lx, ly = sx - side * 0.35 * col(radius), sy - attach
            ex, ey = _rotate(lx, ly, side * draw(lambda r: r.uniform(0.5, 1.0))[:, None, None])
            leaves |= (ex / (0.38 * col(radius))) ** 2 + (ey / (0.14 * col(radius))) ** 2 < 1
        masks["leaves"] = leaves
        # occlusion: centre over petals over leaves over stem
        visible = {"centre": masks["centre"]}
        covered = masks["centre"].copy()
        for part in ("petals", "leaves", "stem"):
            visible[part] = masks[part] & ~covered
            covered |= masks[part]

        # colours
        hues = self.variant.class_hues(class_id)
        colours = {}
        for part in PARTS:
            if part in hues:
                hsv = np.stack(
                    [
                        (hues[part] + draw(lambda r: r.uniform(-0.015, 0.015))) % 1.0,
                        draw(lambda r: r.uniform(0.75, 0.95)),
                        draw(lambda r: r.uniform(0.75, 0.95)),
                    ],
                    -1,
                )
            else:  # the shared distractor distribution
                hsv = np.stack(
                    [
                        draw(lambda r: r.uniform(0, 1)),
                        draw(lambda r: r.uniform(0.2, 0.95)),
                        draw(lambda r: r.uniform(0.45, 0.95)),
                    ],
                    -1,
                )
            colours[part] = hsv_to_rgb(hsv)  # (B, 3)

        # textured background: a random colour modulated by low-frequency waves
        base = hsv_to_rgb(
            np.stack(
                [
                    draw(lambda r: r.uniform(0, 1)),
                    draw(lambda r: r.uniform(0.05, 0.4)),
                    draw(lambda r: r.uniform(0.3, 0.8)),
                ],
                -1,
            )
        )
        texture = np.zeros((b, s, s))
        for _ in range(4):
            fx, fy = draw(lambda r: r.uniform(1, 6)), draw(lambda r: r.uniform(1, 6))
            phase = draw(lambda r: r.uniform(0, 2 * np.pi))
            texture += np.sin(2 * np.pi * (col(fx) * gx + col(fy) * gy) + col(phase)) / 4
        image = base[:, None, None, :] * (1 + 0.25 * texture[..., None])
        for part in ("stem", "leaves", "petals", "centre"):
            image = np.where(visible[part][..., None], colours[part][:, None, None, :], image)
        # lighting: a linear ramp in a random direction, then pixel noise
        light_angle = draw(lambda r: r.uniform(0, 2 * np.pi))
        strength = draw(lambda r: r.uniform(0.0, 0.35))
        ramp = np.cos(col(light_angle)) * (gx - 0.5) + np.sin(col(light_angle)) * (gy - 0.5)
        image = image * (1 + col(strength) * ramp)[..., None]
        noise = np.stack([r.normal(0, 0.03, (s, s, 3)) for r in rngs])
        image = np.clip(image + noise, 0, 1)
        return (image * 255 + 0.5).astype(np.uint8), visible

    def deciding_mask(self, visible: dict[str, np.ndarray]) -> np.ndarray:
        mask = np.zeros_like(visible["petals"])
        for part in self.variant.deciding:
            mask |= visible[part]
        return mask

    def write(self, root: str | Path, name: str | None = None, progress: bool = True) -> Path:
        """Write ``<root>/<name>`` and ``<root>/<name>_MASK`` (atomically: a temporary folder is
        renamed at the end). Returns the image folder."""
        root = Path(root)
        name = name or f"an8flower_{self.variant_name}"
        target, target_masks = root / name, root / f"{name}_MASK"
        if target.exists() or target_masks.exists():
            raise VebiError(f"{target} already exists: delete it to generate it again")
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            total = self.variant.num_classes * self.images_per_class
            with tqdm(
                total=total, desc=f"generating {name}", unit="img", disable=not progress
            ) as bar:
                for class_id in range(self.variant.num_classes):
                    class_name = self.variant.class_name(class_id)
                    (staging / "images" / class_name).mkdir(parents=True)
                    (staging / "masks" / class_name).mkdir(parents=True)
                    for start in range(0, self.images_per_class, self.batch_size):
                        indices = range(start, min(start + self.batch_size, self.images_per_class))
                        images, visible = self.render(class_id, indices)
                        masks = self.deciding_mask(visible)
                        for image, mask, index in zip(images, masks, indices, strict=True):
                            filename = f"class{class_id}_img{index}_p{index % 4}_r{index % 3}.png"
                            Image.fromarray(image).save(staging / "images" / class_name / filename)
                            dark = np.where(mask, 0, 255).astype(np.uint8)  # relevant region dark
                            Image.fromarray(dark).save(staging / "masks" / class_name / filename)
                        bar.update(len(indices))
            os.replace(staging / "masks", target_masks)
            os.replace(staging / "images", target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _read(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode))
    except (UnidentifiedImageError, OSError) as error:
        raise VebiError(f"cannot read {path}: {error}; delete or replace the file") from error


def read_an8flower_folder(
    folder: str | Path, image_size: int | None = None, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Read the published layout: ``folder/<class>/*`` and ``folder_MASK/<class>/*``.

    Returns (images uint8 (N, 3, H, W), labels (N,), masks bool (N, H, W) with True = the
    class-deciding region (the dark pixels of the mask files), class names, file names). Images
    are resized to ``image_size`` when given (masks with nearest neighbour). Every image needs
    a mask of the same size; empty class folders and unreadable files are errors.
    """
    folder = Path(folder)
    mask_folder = folder.with_name(folder.name + "_MASK")
    if not folder.is_dir():
        raise VebiError(f"no an8Flower folder at {folder}")
    if not mask_folder.is_dir():
        raise VebiError(f"no mask folder {mask_folder} next to {folder}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise VebiError(f"{folder} has no class folders")
    files = []
    for label, name in enumerate(classes):
        members = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not members:
            raise VebiError(f"class folder {folder / name} holds no images")
        files += [(label, p) for p in members]
    missing = [p for _, p in files if not (mask_folder / p.parent.name / p.name).is_file()]
    if missing:
        raise VebiError(
            f"{len(missing)} image(s) have no mask in {mask_folder}, e.g. "
            + ", ".join(str(p.relative_to(folder)) for p in missing[:3])
        )
    images, masks = [], []
    for _, path in tqdm(files, desc=f"reading {folder.name}", unit="img", disable=not progress):
        image, mask = _read(path, "RGB"), _read(mask_folder / path.parent.name / path.name, "L")
        if image.shape[:2] != mask.shape:
            raise VebiError(
                f"{path} is {image.shape[1]}x{image.shape[0]} but its mask is "
                f"{mask.shape[1]}x{mask.shape[0]}"
            )
        if image_size and image.shape[:2] != (image_size, image_size):
            image = np.asarray(
                Image.fromarray(image).resize((image_size, image_size), Image.BILINEAR)
            )
            mask = np.asarray(Image.fromarray(mask).resize((image_size, image_size), Image.NEAREST))
        images.append(image)
        masks.append(mask < 128)  # dark = relevant
    if len({i.shape for i in images}) > 1:
        raise VebiError(f"images in {folder} differ in size: set image_size to resize them")
    return (
        torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
        torch.tensor([label for label, _ in files]),
        torch.from_numpy(np.stack(masks)),
        classes,
        [str(p.relative_to(folder)) for _, p in files],
    )


class MaskedImages(Dataset):
    """(image float [0, 1] (3, H, W), label, mask float (H, W), 1 = deciding region)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> None:
        self.images, self.labels, self.masks = images, labels, masks

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.images[index].float() / 255.0, self.labels[index], self.masks[index].float()


class An8FlowerDataModule(SplitDataModule):
    """an8Flower in the published layout, as (image, label, mask) with 1 = deciding region.

    ``prepare_data`` generates the data with :class:`An8FlowerGenerator` when ``generate`` is
    true and the folder is absent. Splits are stratified and fixed by ``split_seed``
    (``val_fraction``/``test_fraction`` of each class). Images are held in memory as uint8.
    """

    def __init__(
        self,
        data_dir: str | Path = "data",
        name: str = "an8flower_double",
        variant: str = "double",
        generate: bool = True,
        images_per_class: int = 300,
        image_size: int = 112,
        generator_seed: int = 0,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        num_workers: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if not (
            0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1
        ):
            raise VebiError("val_fraction and test_fraction must be in (0, 1) and sum below 1")
        self.save_hyperparameters(logger=False)
        self.folder = Path(data_dir) / name
        self.class_names: list[str] = []

    @property
    def num_classes(self) -> int:
        return (
            len(self.class_names)
            if self.class_names
            else VARIANTS[self.hparams.variant].num_classes
        )

    def prepare_data(self) -> None:
        if self.folder.is_dir():
            return
        if not self.hparams.generate:
            raise VebiError(
                f"no an8Flower data at {self.folder}; set data.generate=true to make it"
            )
        An8FlowerGenerator(
            self.hparams.variant,
            self.hparams.image_size,
            self.hparams.images_per_class,
            self.hparams.generator_seed,
        ).write(self.folder.parent, self.folder.name, progress=self.hparams.progress)

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        images, labels, masks, self.class_names, _ = read_an8flower_folder(
            self.folder, self.hparams.image_size, self.hparams.progress
        )
        generator = torch.Generator().manual_seed(self.hparams.split_seed)
        parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
        for label in range(len(self.class_names)):
            members = (labels == label).nonzero().flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            n_val = max(1, round(self.hparams.val_fraction * len(members)))
            n_test = max(1, round(self.hparams.test_fraction * len(members)))
            parts["val"].append(members[:n_val])
            parts["test"].append(members[n_val : n_val + n_test])
            parts["train"].append(members[n_val + n_test :])
        split = {k: torch.cat(v).sort().values for k, v in parts.items()}
        self.data_train, self.data_val, self.data_test = (
            MaskedImages(images[split[k]], labels[split[k]], masks[split[k]])
            for k in ("train", "val", "test")
        )
