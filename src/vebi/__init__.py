"""vebi: visual explanation by interpretation of CNN classifiers (Oramas et al., ICLR 2019).

The Python API in five lines (docs/method.md, sections 2 and 4)::

    relevant = vebi.mine_features(net, train_dataset, mu=10, class_names=names)
    explanation = vebi.Explainer(net, relevant, k=3)(images)
    figure = vebi.show_explanation(images[0], explanation, 0, names)
    rgb = vebi.overlay(images[0], explanation.combined[0])   # (H, W, 3) for imshow
"""

from vebi.checkpoint import load_classifier
from vebi.errors import VebiError
from vebi.explain.explainer import Explainer, Explanation
from vebi.explain.figures import overlay, show_explanation
from vebi.mining.miner import FeatureMiner, mine_features
from vebi.mining.relevant import RelevantFeatures
from vebi.modules.classifier import ClassifierModule

__all__ = [
    "ClassifierModule",
    "Explainer",
    "Explanation",
    "FeatureMiner",
    "RelevantFeatures",
    "VebiError",
    "load_classifier",
    "mine_features",
    "overlay",
    "show_explanation",
]
__version__ = "0.1.0"
