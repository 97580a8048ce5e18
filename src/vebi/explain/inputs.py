"""Reading user images for explanation: any size and mode, converted to what the model takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vebi.errors import VebiError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def image_to_tensor(image: Image.Image, shape: tuple[int, int, int]) -> torch.Tensor:
    """Convert a PIL image to the model's input: ``shape`` = (C, H, W), values in [0, 1].

    1-channel models get greyscale (``L``), 3-channel models RGB (alpha dropped, palettes
    expanded); the image is resized to H x W with bilinear filtering, aspect ratio not kept.
    Colours are not inverted: MNIST models expect white digits on a black background.
    """
    channels, height, width = shape
    if channels not in (1, 3):
        raise VebiError(f"models with {channels} input channels are not supported for image files")
    converted = image.convert("L" if channels == 1 else "RGB").resize(
        (width, height), Image.BILINEAR
    )
    array = np.asarray(converted, dtype=np.float32) / 255.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def load_images(
    source: str | Path, shape: tuple[int, int, int]
) -> tuple[torch.Tensor, list[str], list[str]]:
    """Images from a file or a folder (sorted, not recursive).

    Returns (images (N, C, H, W), names, skipped) where ``skipped`` lists the files of the
    folder that could not be read as images, with the reason.
    """
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file())
    elif source.is_file():
        files = [source]
    else:
        raise VebiError(f"input {source} is neither an image file nor a folder")
    tensors, names, skipped = [], [], []
    for path in files:
        try:
            with Image.open(path) as image:
                tensors.append(image_to_tensor(image, shape))
            names.append(path.name)
        except (UnidentifiedImageError, OSError, ValueError) as error:
            if not source.is_dir():
                raise VebiError(f"cannot read {path} as an image: {error}") from error
            skipped.append(f"{path.name}: {type(error).__name__}")
    if not tensors:
        raise VebiError(f"no readable image in {source} (skipped: {', '.join(skipped) or 'none'})")
    return torch.stack(tensors), names, skipped
