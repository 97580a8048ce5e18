"""Reading user images for explanation: any size and mode, converted to what the model takes."""

from __future__ import annotations

import errno
import stat
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vebi.errors import VebiError
from vebi.utils.io import IMAGE_READ_ERRORS, image_error_reason

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


#: Single-channel modes with more than 8 bits, scaled by their range instead of clipped to 255.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _high_depth_grey(image: Image.Image, size: tuple[int, int]) -> np.ndarray | None:
    """(H, W) float32 in [0, 1] at ``size`` = (W, H) for 16-bit, 32-bit integer and float
    images; None otherwise.

    16-bit images are divided by 65535; 32-bit integer ones (how PIL opens some 16-bit files)
    must hold values in 0..65535 and are divided by 65535 too; float images must hold values
    in [0, 1]. Anything else is refused rather than silently clipped. Integer images are
    checked (``getextrema``) and resized in their own mode before any float copy: a
    12000 x 12000 16-bit PNG costs its own 288 MB, not gigabytes of float64.
    """
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        low, high = cast(tuple[float, float], image.getextrema())  # one band
        if low < 0 or high > 65535:
            raise VebiError(
                f"32-bit integer image with values {low:g}..{high:g}: only "
                "values in 0..65535 (16-bit) are understood; save it as an 8- or 16-bit image"
            )
        resized = image.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.float32) / np.float32(65535.0)
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all() or (
            values.size and (values.min() < 0 or values.max() > 1)
        ):
            raise VebiError(
                "floating-point image with values outside [0, 1] (or NaN/Inf): scale it to "
                "[0, 1] or save it as an 8- or 16-bit image"
            )
        return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    return None


def image_to_tensor(image: Image.Image, shape: tuple[int, int, int]) -> torch.Tensor:
    """Convert a PIL image to the model's input: ``shape`` = (C, H, W), values in [0, 1].

    1-channel models get greyscale (``L``), 3-channel models RGB (alpha dropped, palettes
    expanded, grey repeated); the image is resized to H x W with bilinear filtering, aspect
    ratio not kept. 8-bit values are divided by 255, 16-bit ones by 65535, float images are
    taken as they are (they must lie in [0, 1]). Colours are not inverted: MNIST models expect
    white digits on a black background.
    """
    channels, height, width = shape
    if channels not in (1, 3):
        raise VebiError(f"models with {channels} input channels are not supported for image files")
    grey = _high_depth_grey(image, (width, height))
    if grey is not None:
        array = np.clip(grey, 0.0, 1.0)[None]
        array = np.repeat(array, channels, axis=0)
        return torch.from_numpy(np.ascontiguousarray(array))
    converted = image.convert("L" if channels == 1 else "RGB").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    array = np.asarray(converted, dtype=np.float32) / 255.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def _not_a_file(path: Path) -> str | None:
    """Why a folder entry is not read as an image (a FIFO, a link loop, ...); None for a
    regular file. Nothing is opened: opening a FIFO would wait for a writer."""
    try:
        mode = path.stat().st_mode  # follows symbolic links
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a symbolic link loop"
        if path.is_symlink():
            return "a broken symbolic link"
        return f"cannot be read ({error.strerror or error})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder (folders inside the input are not searched)"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not read"
    if stat.S_ISSOCK(mode):
        return "a socket, not read"
    return "a device file, not read"


def _conversion_note(image: Image.Image) -> str | None:
    """What reading ``image`` leaves out (animation frames, transparency), None if nothing."""
    notes = []
    frames = int(getattr(image, "n_frames", 1) or 1)
    if getattr(image, "is_animated", False) and frames > 1:
        notes.append(f"animated ({frames} frames): the first frame is explained")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        notes.append(
            "its transparency is dropped: the colours under transparent pixels are used as they are"
        )
    return "; ".join(notes) or None


def list_image_files(source: str | Path) -> tuple[list[Path], list[str]]:
    """(the regular files of a folder, sorted, not recursive, or the one file ``source``;
    the folder entries that are not files, with the reason). Nothing is opened."""
    source = Path(source)
    if source.is_file():
        return [source], []
    if not source.is_dir():
        raise VebiError(f"input {source} is neither an image file nor a folder")
    try:
        entries = sorted(source.iterdir())
    except OSError as error:
        raise VebiError(
            f"cannot read the input folder {source}: {error.strerror or error} (check that "
            "it may be listed by this user)"
        ) from None
    files, skipped = [], []
    for path in entries:
        reason = _not_a_file(path)
        if reason is None:
            files.append(path)
        else:
            skipped.append(f"{path.name}: {reason}")
    return files, skipped


class ImageFiles(Dataset):
    """The images of a file or a folder (:func:`list_image_files`), each read when it is asked
    for, so a folder of any size is explained in flat memory. An item is (image (C, H, W),
    index, note, problem): ``note`` says what reading it left out (animation frames,
    transparency; "" if nothing); an unreadable file gives a blank image and the reason as
    ``problem`` ("" for a readable one), so a loop can skip it and say why."""

    def __init__(self, source: str | Path, shape: tuple[int, int, int]) -> None:
        self.source = Path(source)
        self.shape = (int(shape[0]), int(shape[1]), int(shape[2]))
        self.files, self.skipped = list_image_files(self.source)
        self.names = [path.name for path in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> tuple[torch.Tensor, str]:
        """(image, note) of file ``index``; a VebiError naming the file if it cannot be read."""
        path = self.files[index]
        try:
            with Image.open(path) as image:
                return image_to_tensor(image, self.shape), _conversion_note(image) or ""
        except (*IMAGE_READ_ERRORS, VebiError) as error:
            reason = image_error_reason(error)
            raise UnreadableImage(path, reason, type(error).__name__) from error

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str, str]:
        try:
            image, note = self.read(index)
        except UnreadableImage as error:
            return torch.zeros(self.shape), index, "", error.kind
        return image, index, note, ""


class UnreadableImage(VebiError):
    """An image file that cannot be read (``kind``: the reader's exception type)."""

    def __init__(self, path: Path, reason: str, kind: str) -> None:
        super().__init__(f"cannot read {path} as an image: {reason}")
        self.path, self.reason, self.kind = path, reason, kind


def load_images(
    source: str | Path, shape: tuple[int, int, int], notes: dict[str, str] | None = None
) -> tuple[torch.Tensor, list[str], list[str]]:
    """All images of a file or a folder in memory (:class:`ImageFiles` reads them one at a
    time instead).

    Returns (images (N, C, H, W), names, skipped) where ``skipped`` lists the entries of the
    folder that were not read as images, with the reason (unreadable files, folders, FIFOs,
    link loops). ``notes`` (when given) receives, by name, what reading an image left out:
    the frames of an animated image after the first, an alpha channel. A single file that
    cannot be read is an error.
    """
    files = ImageFiles(source, shape)
    tensors, names, skipped = [], [], list(files.skipped)
    for index, name in enumerate(files.names):
        try:
            image, note = files.read(index)
        except UnreadableImage as error:
            if not files.source.is_dir():
                raise
            skipped.append(f"{name}: {error.kind}")
            continue
        tensors.append(image)
        names.append(name)
        if note and notes is not None:
            notes[name] = note
    if not tensors:
        raise VebiError(f"no readable image in {source} (skipped: {', '.join(skipped) or 'none'})")
    return torch.stack(tensors), names, skipped
