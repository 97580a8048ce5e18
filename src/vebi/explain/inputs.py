"""Reading user images for explanation: any size and mode, converted to what the model takes."""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vebi.errors import VebiError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


#: Single-channel modes with more than 8 bits, scaled by their range instead of clipped to 255.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _high_depth_grey(image: Image.Image) -> np.ndarray | None:
    """(H, W) float32 in [0, 1] for 16-bit, 32-bit integer and float images; None otherwise.

    16-bit images are divided by 65535; 32-bit integer ones (how PIL opens some 16-bit files)
    must hold values in 0..65535 and are divided by 65535 too; float images must hold values
    in [0, 1]. Anything else is refused rather than silently clipped.
    """
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise VebiError(
                f"32-bit integer image with values {values.min():g}..{values.max():g}: only "
                "values in 0..65535 (16-bit) are understood; save it as an 8- or 16-bit image"
            )
        return (values / 65535.0).astype(np.float32)
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all() or (
            values.size and (values.min() < 0 or values.max() > 1)
        ):
            raise VebiError(
                "floating-point image with values outside [0, 1] (or NaN/Inf): scale it to "
                "[0, 1] or save it as an 8- or 16-bit image"
            )
        return values
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
    grey = _high_depth_grey(image)
    if grey is not None:
        resized = Image.fromarray(grey).resize((width, height), Image.Resampling.BILINEAR)
        array = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)[None]
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


def load_images(
    source: str | Path, shape: tuple[int, int, int], notes: dict[str, str] | None = None
) -> tuple[torch.Tensor, list[str], list[str]]:
    """Images from a file or a folder (sorted, not recursive).

    Returns (images (N, C, H, W), names, skipped) where ``skipped`` lists the entries of the
    folder that were not read as images, with the reason (unreadable files, folders, FIFOs,
    link loops). ``notes`` (when given) receives, by name, what reading an image left out:
    the frames of an animated image after the first, an alpha channel.
    """
    source = Path(source)
    tensors, names, skipped = [], [], []
    if source.is_dir():
        try:
            entries = sorted(source.iterdir())
        except OSError as error:
            raise VebiError(
                f"cannot read the input folder {source}: {error.strerror or error} (check that "
                "it may be listed by this user)"
            ) from None
        files = []
        for path in entries:
            reason = _not_a_file(path)
            if reason is None:
                files.append(path)
            else:
                skipped.append(f"{path.name}: {reason}")
    elif source.is_file():
        files = [source]
    else:
        raise VebiError(f"input {source} is neither an image file nor a folder")
    for path in files:
        try:
            with Image.open(path) as image:
                tensors.append(image_to_tensor(image, shape))
                note = _conversion_note(image)
            names.append(path.name)
            if note and notes is not None:
                notes[path.name] = note
        except (
            UnidentifiedImageError,
            Image.DecompressionBombError,
            OSError,
            ValueError,
            VebiError,
        ) as error:
            reason = str(error)
            if isinstance(error, Image.DecompressionBombError):
                reason = (
                    f"{error} (PIL refuses images this large as a possible decompression bomb; "
                    "shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file)"
                )
            if not source.is_dir():
                raise VebiError(f"cannot read {path} as an image: {reason}") from error
            skipped.append(f"{path.name}: {type(error).__name__}")
    if not tensors:
        raise VebiError(f"no readable image in {source} (skipped: {', '.join(skipped) or 'none'})")
    return torch.stack(tensors), names, skipped
