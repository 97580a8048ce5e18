"""Data modules; each yields images in [0, 1] shaped (N, C, H, W)."""

from vebi.data.mnist import MNISTDataModule

__all__ = ["MNISTDataModule"]
