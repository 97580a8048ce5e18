from vebi.modules.classifier import ClassifierModule

__all__ = ["ClassifierModule"]
