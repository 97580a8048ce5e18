"""Pictures: jet overlays of heatmaps on images, explanation panels, interpretation galleries."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.text
import matplotlib.ticker
import numpy as np
import torch
from matplotlib.figure import Figure

from vebi.utils.io import atomic_path

# Figures are made with matplotlib's object-oriented API (``Figure``, no pyplot), so no GUI
# backend is ever chosen or needed: saving renders with Agg, and importing vebi leaves the
# user's matplotlib backend alone.


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) image in [0, 1] -> (H, W, 3) float array (grey images repeated)."""
    array = image.detach().cpu().float().clamp(0, 1).numpy()
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    return array[:3].transpose(1, 2, 0)


def overlay(image: torch.Tensor, heatmap: torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] heatmap, coloured with matplotlib's ``jet``, over the image (H, W, 3)."""
    values = heatmap.detach().cpu().float().clamp(0, 1).numpy()
    colours = matplotlib.colormaps["jet"](values)[..., :3]
    return (1 - alpha) * to_rgb(image) + alpha * colours


def drawable(text: str) -> str:
    """``text`` as a font can draw it: lone surrogates (the undecodable bytes of a Latin-1
    file name) written as ``\\udce9`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _DrawableLabels(matplotlib.ticker.Formatter):
    """A tick formatter whose labels pass through :func:`drawable`."""

    def __init__(self, inner: matplotlib.ticker.Formatter) -> None:
        self.inner = inner

    def set_axis(self, axis: Any) -> None:
        super().set_axis(axis)
        self.inner.set_axis(axis)

    def __call__(self, x: float, pos: int | None = None) -> str:
        return drawable(str(self.inner(x, pos)))

    def format_ticks(self, values: Any) -> list[str]:
        return [drawable(str(label)) for label in self.inner.format_ticks(values)]

    def get_offset(self) -> str:
        return drawable(str(self.inner.get_offset()))


def as_plain_text(figure: Figure) -> Figure:
    """Every text of ``figure`` drawn as the characters it holds: names from the data (class
    folders, file names) are never read as mathtext (``$\\notacmd$`` used to fail the whole
    job) and never hold characters no font can draw. Texts made while drawing (tick labels)
    are plain too when the figure is saved by :func:`save_figure`."""
    for text in figure.findobj(matplotlib.text.Text):
        text.set_parse_math(False)
        text.set_text(drawable(text.get_text()))
    for axes in figure.axes:
        for axis in (axes.xaxis, axes.yaxis):
            formatter = axis.get_major_formatter()
            if not isinstance(formatter, _DrawableLabels):
                axis.set_major_formatter(_DrawableLabels(formatter))
    return figure


def save_figure(figure: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save atomically as PNG, every text as plain text (:func:`as_plain_text`)."""
    path = Path(path)
    as_plain_text(figure)
    with atomic_path(path) as tmp, matplotlib.rc_context({"text.parse_math": False}):
        figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def explanation_figure(
    image: torch.Tensor,
    maps: torch.Tensor,
    combined: torch.Tensor,
    titles: Sequence[str],
    heading: str,
) -> Figure:
    """Input | combined overlay | one overlay per chosen feature ("decoupled" maps)."""
    panels = 2 + len(titles)
    figure = Figure(figsize=(2.2 * panels, 2.6))
    axes = figure.subplots(1, panels, squeeze=False)
    axes = axes[0]
    axes[0].imshow(to_rgb(image))
    axes[0].set_title("input", fontsize=8)
    axes[1].imshow(overlay(image, combined))
    axes[1].set_title("combined", fontsize=8)
    for axis, heatmap, title in zip(axes[2:], maps, titles, strict=False):
        axis.imshow(overlay(image, heatmap))
        axis.set_title(title, fontsize=7)
    for axis in axes:
        axis.axis("off")
    figure.suptitle(heading, fontsize=9)
    return figure


def gallery_figure(
    average_maps: Sequence[torch.Tensor],
    average_images: Sequence[torch.Tensor],
    titles: Sequence[str],
    heading: str,
    columns: int = 6,
) -> Figure:
    """A class's relevant features: each tile the average visualisation (jet) over the average
    of the images it was computed on, with the average image beside it, labelled."""
    count = max(len(titles), 1)
    columns = min(columns, count)
    rows = (count + columns - 1) // columns
    figure = Figure(figsize=(2.4 * columns, 1.45 * rows + 0.5))
    axes = figure.subplots(rows, 2 * columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for i, (heatmap, image, title) in enumerate(
        zip(average_maps, average_images, titles, strict=True)
    ):
        row, column = divmod(i, columns)
        left, right = axes[row, 2 * column], axes[row, 2 * column + 1]
        left.imshow(matplotlib.colormaps["jet"](heatmap.cpu().numpy())[..., :3])
        left.set_title(title, fontsize=6)
        right.imshow(to_rgb(image))
        right.set_title("avg image", fontsize=6)
    if not titles:
        axes[0, 0].text(0.5, 0.5, "no relevant features", ha="center", va="center")
    figure.suptitle(heading, fontsize=9)
    return figure


def top_images_figure(
    images: Sequence[Sequence[torch.Tensor]], titles: Sequence[str], heading: str
) -> Figure:
    """A class's relevant features, a row each: the feature's label, then the training
    images it responds to most, largest response first."""
    rows = max(len(images), 1)
    columns = max((len(row) for row in images), default=1)
    height = 1.1 * rows + 0.5
    figure = Figure(figsize=(1.1 * columns + 1.4, height))
    axes = figure.subplots(rows, columns + 1, squeeze=False)
    figure.subplots_adjust(top=1 - 0.45 / height, bottom=0.02, left=0.02, right=0.98)
    for axis in axes.flat:
        axis.axis("off")
    for r, (row, title) in enumerate(zip(images, titles, strict=True)):
        axes[r, 0].text(0.95, 0.5, title, ha="right", va="center", fontsize=7)
        for c, image in enumerate(row):
            axes[r, c + 1].imshow(to_rgb(image))
    figure.suptitle(heading, fontsize=9)
    return figure


def show_explanation(
    image: torch.Tensor,
    explanation: Any,
    index: int = 0,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """The figure of image ``index`` of an :class:`~vebi.explain.Explanation`: the input, the
    combined map and one map per chosen feature (``figure.savefig(...)`` or display it in a
    notebook)."""
    class_id = int(explanation.classes[index])
    chosen = explanation.features[index]
    name = class_names[class_id] if class_names else str(class_id)
    return explanation_figure(
        image,
        explanation.maps[index, : len(chosen)].cpu(),
        explanation.combined[index].cpu(),
        [f"{f.layer}/{f.channel} s={f.score:.3f}" for f in chosen],
        f"class {name}" + (" (no relevant feature fired)" if explanation.fallback[index] else ""),
    )
