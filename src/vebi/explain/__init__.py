"""Explanations: deconvnet-family backward rules with the strided conv/pool fix."""

from vebi.explain.backprop import backprop_feature
from vebi.explain.rules import Rules, backward_rules

__all__ = ["Rules", "backprop_feature", "backward_rules"]
