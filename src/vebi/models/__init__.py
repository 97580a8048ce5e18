"""Classifier networks; all take [0, 1] images and normalise inside."""

from vebi.models.lenet import LeNet
from vebi.models.normalize import Normalize
from vebi.models.timm_models import TimmClassifier
from vebi.models.torchvision_models import TorchvisionClassifier
from vebi.models.vgg import SmallVGG

__all__ = ["LeNet", "Normalize", "SmallVGG", "TimmClassifier", "TorchvisionClassifier"]
