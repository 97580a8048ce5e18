"""an8Flower-style data: synthetic flowers whose class is decided only by the colour of one or
two parts, with a pixel mask of the deciding part(s) (Oramas et al., ICLR 2019).

The published set cannot be downloaded here, so :class:`An8FlowerGenerator` draws data of the
same kind and writes it in the published layout, which :class:`An8FlowerDataModule` reads:

    <root>/<name>/<class>/<image>.png          the images
    <root>/<name>_MASK/<class>/<image>.png     the masks, class-deciding region dark
    <root>/<name>_PARTS/<class>/<image>.png    the part labels (generated data only): one uint8
                                               channel, 0 = background, 1..4 = PARTS in order
                                               (petals, centre, stem, leaves), as visible

The ``_PARTS`` folder is ours, not part of the published layout; the loaders of the published
layout ignore it, and :meth:`An8FlowerDataModule.part_labels` gives it aligned with the splits.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vebi.data.base import SplitDataModule
from vebi.errors import VebiError
from vebi.utils.io import IMAGE_READ_ERRORS, image_error_reason
from vebi.utils.log import get_logger

log = get_logger(__name__)

#: The flower parts, in the order of their labels (1..4) in the ``_PARTS`` files.
PARTS = ("petals", "centre", "stem", "leaves")
#: The names of the values of a part-label image: ``PART_LABELS[v]`` is the part of value ``v``.
PART_LABELS = ("background", *PARTS)
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


def part_label_map(visible: dict[str, np.ndarray]) -> np.ndarray:
    """The part labels (B, H, W) uint8 of visible part masks {part: (B, H, W) bool}: 0 where no
    part is visible, k where ``PARTS[k - 1]`` is. The masks must be disjoint (occlusion
    applied), as :meth:`An8FlowerGenerator.render` gives them."""
    stack = np.stack([visible[part] for part in PARTS])
    if (stack.sum(axis=0) > 1).any():
        raise VebiError("visible part masks overlap: occlusion must leave one part per pixel")
    labels = np.zeros(stack.shape[1:], dtype=np.uint8)
    for value, mask in enumerate(stack, start=1):
        labels[mask] = value
    return labels


class An8FlowerGenerator:
    """Draws an8Flower-style images, masks and part labels, vectorised over a batch,
    deterministic by (seed, class, image index).

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

    @staticmethod
    def file_name(class_id: int, index: int) -> str:
        """The file name of image ``index`` of class ``class_id`` (in all three folders)."""
        return f"class{class_id}_img{index}_p{index % 4}_r{index % 3}.png"

    def _batches(self, class_id: int) -> Iterator[tuple[range, np.ndarray, dict[str, np.ndarray]]]:
        """(indices, images, visible part masks) of class ``class_id``, batch by batch."""
        for start in range(0, self.images_per_class, self.batch_size):
            indices = range(start, min(start + self.batch_size, self.images_per_class))
            yield (indices, *self.render(class_id, indices))

    def _settings(self) -> str:
        return (
            f"variant={self.variant_name}, image_size={self.size}, "
            f"images_per_class={self.images_per_class}, seed={self.seed}"
        )

    def write(self, root: str | Path, name: str | None = None, progress: bool = True) -> Path:
        """Write ``<root>/<name>``, ``<root>/<name>_MASK`` and ``<root>/<name>_PARTS``
        (atomically: each is renamed from a temporary folder at the end, the images last).
        Returns the image folder."""
        root = Path(root)
        name = name or f"an8flower_{self.variant_name}"
        targets = [root / f"{name}{suffix}" for suffix in ("", "_MASK", "_PARTS")]
        existing = [t for t in targets if t.exists()]
        if existing:
            raise VebiError(
                f"{existing[0]} already exists: delete "
                + " and ".join(str(t) for t in existing)
                + " to generate it again"
            )
        target, target_masks, target_parts = targets
        root.mkdir(parents=True, exist_ok=True)
        staging = staging_folder(root, name)
        try:
            total = self.variant.num_classes * self.images_per_class
            with tqdm(
                total=total, desc=f"generating {name}", unit="img", disable=not progress
            ) as bar:
                for class_id in range(self.variant.num_classes):
                    class_name = self.variant.class_name(class_id)
                    for kind in ("images", "masks", "parts"):
                        (staging / kind / class_name).mkdir(parents=True)
                    for indices, images, visible in self._batches(class_id):
                        masks, labels = self.deciding_mask(visible), part_label_map(visible)
                        for image, mask, label, index in zip(
                            images, masks, labels, indices, strict=True
                        ):
                            filename = self.file_name(class_id, index)
                            Image.fromarray(image).save(staging / "images" / class_name / filename)
                            dark = np.where(mask, 0, 255).astype(np.uint8)  # relevant region dark
                            Image.fromarray(dark).save(staging / "masks" / class_name / filename)
                            Image.fromarray(label).save(staging / "parts" / class_name / filename)
                        bar.update(len(indices))
            os.replace(staging / "masks", target_masks)
            os.replace(staging / "parts", target_parts)
            os.replace(staging / "images", target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _refuse(self, folder: Path, reason: str) -> VebiError:
        masks = folder.with_name(folder.name + "_MASK")
        return VebiError(
            f"{folder} was not generated with these settings ({self._settings()}) or not by this "
            f"version of the generator: {reason}. So its part labels cannot be drawn again. "
            f"Delete {folder} and {masks} to generate the data again with part labels, or keep "
            "it and use it without part labels (data.generate=false)"
        )

    def check_folder(self, folder: str | Path) -> None:
        """Refuse (VebiError saying what differs) an image folder that is not what :meth:`write`
        writes with these settings: other class folders, other file names, or a first or last
        image of a class that is not byte-equal to the one drawn again."""
        folder = Path(folder)
        expected = [self.variant.class_name(c) for c in range(self.variant.num_classes)]
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if classes != expected:
            raise self._refuse(
                folder,
                f"its class folders are not the {len(expected)} of the {self.variant_name} "
                f"variant (found {len(classes)}, e.g. {classes[:2]})",
            )
        last = self.images_per_class - 1
        for class_id, class_name in enumerate(expected):
            names = {self.file_name(class_id, i) for i in range(self.images_per_class)}
            found = {p.name for p in (folder / class_name).iterdir() if p.is_file()}
            if found != names:
                raise self._refuse(
                    folder,
                    f"{folder / class_name} holds {len(found)} files, not the "
                    f"{self.images_per_class} images these settings name",
                )
            images, _ = self.render(class_id, [0, last])
            for index, image in zip((0, last), images, strict=True):
                self._check_image(folder, class_id, index, image)

    def _check_image(self, folder: Path, class_id: int, index: int, image: np.ndarray) -> None:
        path = folder / self.variant.class_name(class_id) / self.file_name(class_id, index)
        on_disk = _read(path, "RGB")
        if on_disk.shape != image.shape or not np.array_equal(on_disk, image):
            raise self._refuse(folder, f"{path} differs from the image drawn again")

    def write_parts(self, root: str | Path, name: str | None = None, progress: bool = True) -> Path:
        """Write only ``<root>/<name>_PARTS`` for an image folder that :meth:`write` wrote with
        these settings (data generated before part labels were written), by drawing the images
        again. The folder is checked first (:meth:`check_folder`), and every image again while
        its labels are written; a mismatch is a VebiError and leaves nothing behind. Atomic
        like :meth:`write`. Returns the part-label folder."""
        root = Path(root)
        name = name or f"an8flower_{self.variant_name}"
        folder, target = root / name, root / f"{name}_PARTS"
        if not folder.is_dir():
            raise VebiError(f"no an8Flower folder at {folder} to write part labels for")
        if target.exists():
            raise VebiError(f"{target} already exists: delete it to write it again")
        self.check_folder(folder)
        staging = staging_folder(root, f"{name}_PARTS")
        try:
            total = self.variant.num_classes * self.images_per_class
            with tqdm(
                total=total, desc=f"part labels of {name}", unit="img", disable=not progress
            ) as bar:
                for class_id in range(self.variant.num_classes):
                    class_dir = staging / "parts" / self.variant.class_name(class_id)
                    class_dir.mkdir(parents=True)
                    for indices, images, visible in self._batches(class_id):
                        labels = part_label_map(visible)
                        for image, label, index in zip(images, labels, indices, strict=True):
                            self._check_image(folder, class_id, index, image)
                            Image.fromarray(label).save(class_dir / self.file_name(class_id, index))
                        bar.update(len(indices))
            os.replace(staging / "parts", target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def staging_folder(root: Path, name: str) -> Path:
    """A new folder ``<root>/.<name>.<pid>.<random>`` to generate into before the rename;
    the staging folders of earlier generations whose process is gone (killed with SIGKILL,
    the machine lost power: no ``finally`` ran) are removed first, those of running ones
    kept."""
    for stale in root.glob(f".{name}.*"):
        parts = stale.name[len(name) + 2 :].split(".")
        if stale.is_dir() and parts[0].isdigit() and not _running(int(parts[0])):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", dir=root))


def _read(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode))
    except IMAGE_READ_ERRORS as error:
        raise VebiError(
            f"cannot read {path}: {image_error_reason(error)}; delete or replace the file"
        ) from error


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
                Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BILINEAR)
            )
            mask = np.asarray(
                Image.fromarray(mask).resize((image_size, image_size), Image.Resampling.NEAREST)
            )
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


def read_part_labels(
    folder: str | Path,
    files: Sequence[str],
    image_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Read the part labels of ``files`` (paths relative to ``folder``, as
    :func:`read_an8flower_folder` returns them) from ``folder_PARTS``, in that order.

    Returns (N, H, W) uint8 with the values of :data:`PART_LABELS`. Labels are resized like
    the masks of :func:`read_an8flower_folder` (nearest neighbour to ``image_size`` when the
    image is of another size). A label file that is missing, unreadable, not a single 8-bit
    channel, of another size than its image, or holding a value above ``len(PARTS)`` is an
    error naming the file.
    """
    folder = Path(folder)
    part_folder = folder.with_name(folder.name + "_PARTS")
    hint = f"delete {part_folder} to have it written again (data.generate=true)"
    labels = []
    for file in tqdm(files, desc=f"reading {part_folder.name}", unit="img", disable=not progress):
        path = part_folder / file
        if not path.is_file():
            raise VebiError(f"no part labels {path} for {folder / file}; {hint}")
        try:
            with Image.open(folder / file) as image:
                width, height = image.size
            with Image.open(path) as label_image:
                mode = label_image.mode
                label = np.asarray(label_image)
        except IMAGE_READ_ERRORS as error:
            raise VebiError(f"cannot read {path}: {image_error_reason(error)}; {hint}") from error
        if mode not in ("L", "P"):
            raise VebiError(f"{path} is a {mode} image, not one 8-bit channel of labels; {hint}")
        if label.shape != (height, width):
            raise VebiError(
                f"{path} is {label.shape[1]}x{label.shape[0]} but its image is "
                f"{width}x{height}; {hint}"
            )
        if label.max(initial=0) > len(PARTS):
            raise VebiError(
                f"{path} holds the value {int(label.max())}; part labels are 0..{len(PARTS)} "
                f"({', '.join(PART_LABELS)}); {hint}"
            )
        if image_size and label.shape != (image_size, image_size):
            label = np.asarray(
                Image.fromarray(label).resize((image_size, image_size), Image.Resampling.NEAREST)
            )
        labels.append(label)
    if not labels:
        return torch.zeros((0, image_size or 0, image_size or 0), dtype=torch.uint8)
    if len({label.shape for label in labels}) > 1:
        raise VebiError(f"part labels in {part_folder} differ in size: set image_size")
    return torch.from_numpy(np.stack(labels))


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

    Part labels (``<name>_PARTS``, see the module) are given apart from the items, by
    :meth:`part_labels`. When ``generate`` is true and a folder in the generator's layout has
    none (data generated before they were written), ``prepare_data`` writes them by drawing the
    images again, after checking that they are the images on disk
    (:meth:`An8FlowerGenerator.write_parts`). Other folders simply have no part labels.
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
        self._files: list[str] = []
        self._split: dict[str, torch.Tensor] | None = None
        self._part_labels: dict[str, torch.Tensor] = {}

    @property
    def num_classes(self) -> int:
        return (
            len(self.class_names)
            if self.class_names
            else VARIANTS[self.hparams.variant].num_classes
        )

    @property
    def part_folder(self) -> Path:
        """The folder of the part labels, ``<data_dir>/<name>_PARTS``."""
        return self.folder.with_name(self.folder.name + "_PARTS")

    @property
    def part_names(self) -> tuple[str, ...]:
        """The name of each value of :meth:`part_labels` (:data:`PART_LABELS`)."""
        return PART_LABELS

    @property
    def deciding_parts(self) -> tuple[str, ...]:
        """The parts whose colours decide the class in this variant, e.g. ``("petals",)``."""
        return VARIANTS[self.hparams.variant].deciding

    def _generator(self) -> An8FlowerGenerator:
        return An8FlowerGenerator(
            self.hparams.variant,
            self.hparams.image_size,
            self.hparams.images_per_class,
            self.hparams.generator_seed,
        )

    def prepare_data(self) -> None:
        if self.folder.is_dir():
            if self.hparams.generate and not self.part_folder.exists():
                self._add_part_labels()
            return
        if not self.hparams.generate:
            raise VebiError(
                f"no an8Flower data at {self.folder}; set data.generate=true to make it"
            )
        self._generator().write(
            self.folder.parent, self.folder.name, progress=self.hparams.progress
        )

    def _add_part_labels(self) -> None:
        """Write the part labels of a folder the generator wrote before it wrote them; a folder
        whose class folders are not those of any variant is not ours and is left as it is."""
        classes = sorted(p.name for p in self.folder.iterdir() if p.is_dir())
        ours = any(
            classes == [v.class_name(c) for c in range(v.num_classes)] for v in VARIANTS.values()
        )
        if not ours:
            log.info(
                "%s is not in the an8Flower generator's layout: it has no part labels",
                self.folder,
            )
            return
        log.info("writing the part labels of %s into %s", self.folder, self.part_folder)
        self._generator().write_parts(
            self.folder.parent, self.folder.name, progress=self.hparams.progress
        )

    def part_labels(self, split: str) -> torch.Tensor | None:
        """The part labels (N, H, W) uint8 of the items of ``split`` (``train``, ``val`` or
        ``test``), in their order, with the values of :attr:`part_names`; None when the folder
        has no ``_PARTS`` folder. Read on the first call and kept."""
        if split not in ("train", "val", "test"):
            raise VebiError(f"unknown split {split!r}; choose train, val or test")
        if self._split is None:
            raise VebiError("the data module is not set up: call setup() first")
        if not self.part_folder.is_dir():
            return None
        if split not in self._part_labels:
            files = [self._files[i] for i in self._split[split].tolist()]
            self._part_labels[split] = read_part_labels(
                self.folder, files, self.hparams.image_size, self.hparams.progress
            )
        return self._part_labels[split]

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        images, labels, masks, self.class_names, self._files = read_an8flower_folder(
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
        self._split, self._part_labels = split, {}
        self.data_train, self.data_val, self.data_test = (
            MaskedImages(images[split[k]], labels[split[k]], masks[split[k]])
            for k in ("train", "val", "test")
        )
