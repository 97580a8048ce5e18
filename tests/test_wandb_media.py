"""Figures of different sizes reach W&B as one panel of same-size images, without warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from tests.wandb_offline import logged_values
from vebi.utils.wandb_media import log_figures, padded_to_same_size


def _png(path: Path, height: int, width: int, value: int) -> Path:
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(path)
    return path


def test_figures_are_padded_not_scaled(tmp_path: Path) -> None:
    small = _png(tmp_path / "small.png", 10, 20, 0)
    large = _png(tmp_path / "large.png", 30, 40, 100)
    padded = padded_to_same_size([small, large])
    assert [image.size for image in padded] == [(40, 30), (40, 30)]
    pixels = np.asarray(padded[0])
    assert (pixels[10:20, 10:30] == 0).all()  # the small image, centred, unscaled
    assert (pixels[:10] == 255).all() and (pixels[:, :10] == 255).all()  # white padding
    assert (np.asarray(padded[1]) == 100).all()


def test_one_panel_without_the_size_warning(tmp_path: Path, capfd) -> None:
    paths = [_png(tmp_path / f"{i}.png", 20 + 7 * i, 30, 50 * i) for i in range(3)]
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="vebi-test")
    log_figures([logger], "galleries", paths, ["a", "b", "c"])
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    assert "sizes do not match" not in capfd.readouterr().err
    values = logged_values(run_dir)
    assert values["galleries/count"][-1] == 3
    assert values["galleries/captions"][-1] == ["a", "b", "c"]
