"""vebi: visual explanation by interpretation of CNN classifiers (Oramas et al., ICLR 2019)."""

from vebi.checkpoint import load_classifier
from vebi.errors import VebiError
from vebi.modules.classifier import ClassifierModule

__all__ = ["ClassifierModule", "VebiError", "load_classifier"]
__version__ = "0.1.0"
