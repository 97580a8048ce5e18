"""Turning input-space signals into heatmaps, and measuring their checkerboard artefacts."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

#: How input-space maps are brought to [0, 1] before they are compared, thresholded or combined.
CALIBRATIONS = ("percentile", "min_max")
#: The percentile calibration divides by this quantile of a map's pixels: at most 0.5 % of
#: them saturate at 1, so a few hot pixels cannot push the rest of the map towards 0.
CALIBRATION_QUANTILE = 0.995


def signal_to_heatmap(signal: torch.Tensor, calibration: str = "percentile") -> torch.Tensor:
    """(N, C, H, W) input-space signal -> (N, H, W) map in [0, 1] (docs/method.md, 4, step 4).

    Positive part per colour channel, L2 norm over the colour channels, then
    :func:`calibrate` per image (an all-zero signal gives an all-zero map).
    """
    positive = signal.clamp_min(0)
    # scaled to a maximum of 1 first (calibration does not see the scale): squares of a
    # 1e-20 signal would underflow to 0 in float32
    peak = positive.flatten(1).amax(dim=1).clamp_min(1e-30) if positive.numel() else None
    if peak is not None:
        positive = positive / peak.view(-1, *([1] * (positive.ndim - 1)))
    return calibrate(positive.pow(2).sum(dim=1).sqrt(), calibration)


def calibrate(maps: torch.Tensor, calibration: str = "percentile") -> torch.Tensor:
    """Each (H, W) map of (N, H, W) brought to [0, 1].

    ``percentile`` (the default): m -> min(max(m, 0) / q, 1) with q the
    :data:`CALIBRATION_QUANTILE` quantile of max(m, 0) over the map's P pixels (its
    ceil(0.995 P)-th smallest value) (its maximum when
    that quantile is 0: a map with fewer non-zero pixels than 0.5 %). Robust to a few hot
    pixels, as Captum's and Zennit's visualisers scale (by a high percentile), and a map's
    zero stays zero. ``min_max`` (the paper's): (m - min) / (max - min). Constant maps become 0.
    """
    if calibration == "min_max":
        return min_max_scale(maps)
    if calibration != "percentile":
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    positive = maps.clamp_min(0)
    flat = positive.flatten(1).float()
    if flat.shape[1] == 0:
        return positive
    rank = max(1, math.ceil(round(CALIBRATION_QUANTILE * flat.shape[1], 6)))  # order statistic
    high = flat.kthvalue(rank, dim=1).values
    top = flat.max(dim=1).values
    scale = torch.where(high > 0, high, top).view(-1, *([1] * (maps.ndim - 1)))
    scaled = torch.where(scale > 0, positive / scale.clamp_min(1e-30), torch.zeros_like(positive))
    return scaled.clamp(0, 1).to(maps.dtype)


def min_max_scale(maps: torch.Tensor) -> torch.Tensor:
    """Scale each (H, W) map of (N, H, W) to [0, 1]; constant maps become 0."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    span = flat.max(dim=1).values.view(-1, 1, 1) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-30), torch.zeros_like(maps))


def stride_periods(model: nn.Module) -> list[int]:
    """Cumulative strides of the strided convolutions and poolings, in module order.

    For a chain of stride-2 layers this is [2, 4, 8, ...]: the periods at which their
    backward passes can leave grid patterns in a heatmap. The finest, ``[periods[0]]``, is the
    default of the artefact score: coarser grids fall into the band where the image content
    itself lives (on a 28-pixel digit a period-8 grid has a bin at 3.5 cycles per image).
    """
    periods, total = [], 1
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            stride = module.stride if isinstance(module.stride, int) else max(module.stride)
            if stride > 1:
                total *= stride
                periods.append(total)
    return periods


def checkerboard_score(heatmaps: torch.Tensor, periods: Iterable[int]) -> torch.Tensor:
    """Share of each heatmap's spectral energy at the stride frequencies and their harmonics.

    For a map h of H x W pixels with its mean removed, E(u, v) = |FFT2(h)(u, v)|^2. A pattern
    repeating every p pixels puts its energy at the frequencies u = i H / p, v = j W / p
    (i, j = 0..p-1, rounded to the nearest bin). The score is the energy at those bins, over
    all given periods, divided by the total energy (the zero frequency excluded):

        score = sum_{(u, v) in grid, (u, v) != (0, 0)} E(u, v) / sum_{(u, v) != (0, 0)} E(u, v).

    0 means no energy at the stride grid; a map made only of a period-p pattern scores 1. A map
    without structure scores about (number of grid bins) / (H W). Returns a tensor (N,).
    """
    maps = heatmaps.float()
    if maps.ndim == 2:
        maps = maps[None]
    height, width = maps.shape[-2:]
    energy = torch.fft.fft2(maps - maps.mean(dim=(-2, -1), keepdim=True)).abs().pow(2)
    grid = torch.zeros(height, width, dtype=torch.bool)
    for period in periods:
        rows = {round(i * height / period) % height for i in range(period)}
        cols = {round(j * width / period) % width for j in range(period)}
        for u in rows:
            grid[u, list(cols)] = True
    grid[0, 0] = False
    total = energy.flatten(1).sum(dim=1)
    at_grid = energy[:, grid.to(energy.device)].sum(dim=1)
    return torch.where(total > 0, at_grid / total.clamp_min(1e-30), torch.zeros_like(total))
