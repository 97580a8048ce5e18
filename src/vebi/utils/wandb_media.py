"""Figures to W&B: one image panel per key, all images of a panel the same size.

W&B shows a list of images under one key as one panel with a slider, and warns ("Images sizes
do not match ... display incorrectly in the UI") when their sizes differ, as those of
galleries and explanation figures do. Each figure is therefore padded with white to the
largest width and height among them (nothing is scaled or cropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger
from PIL import Image


def padded_to_same_size(paths: Sequence[str | Path]) -> list[Image.Image]:
    """The images at ``paths`` as RGB, each centred on a white canvas of the largest size."""
    images = []
    for path in paths:
        with Image.open(path) as opened:
            images.append(opened.convert("RGB"))
    if not images:
        return []
    width = max(image.width for image in images)
    height = max(image.height for image in images)
    padded = []
    for image in images:
        canvas = Image.new("RGB", (width, height), "white")
        canvas.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
        padded.append(canvas)
    return padded


def log_figures(
    loggers: Sequence[Logger], key: str, paths: Sequence[str | Path], captions: Sequence[str]
) -> None:
    """Log the PNGs at ``paths`` under ``key`` to every W&B logger (one panel, same sizes)."""
    wandb_loggers = [logger for logger in loggers if isinstance(logger, WandbLogger)]
    if not wandb_loggers or not paths:
        return
    images = padded_to_same_size(paths)
    for logger in wandb_loggers:
        logger.log_image(key, images=images, caption=list(captions))
