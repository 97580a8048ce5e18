"""Turning input-space signals into heatmaps, and measuring their checkerboard artefacts."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def signal_to_heatmap(signal: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) input-space signal -> (N, H, W) map in [0, 1] (docs/method.md, 4, step 4).

    Positive part per colour channel, L2 norm over the colour channels, min-max per image
    (an all-zero signal gives an all-zero map).
    """
    return min_max_scale(signal.clamp_min(0).pow(2).sum(dim=1).sqrt())


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
