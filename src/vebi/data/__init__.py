"""Data modules; each yields images in [0, 1] shaped (N, C, H, W)."""

from vebi.data.an8flower import An8FlowerDataModule, An8FlowerGenerator
from vebi.data.base import ClassificationData, SplitDataModule, check_data_contract
from vebi.data.fashion144k import Fashion144kDataModule
from vebi.data.image_folder import ImageFolderDataModule
from vebi.data.imagenet import ImageNetDataModule
from vebi.data.mnist import MNISTDataModule

__all__ = [
    "ClassificationData",
    "SplitDataModule",
    "check_data_contract",
    "An8FlowerDataModule",
    "An8FlowerGenerator",
    "Fashion144kDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "MNISTDataModule",
]
