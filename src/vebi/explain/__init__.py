"""Explanations: deconvnet-family backward rules with the strided conv/pool fix."""

from vebi.explain.backprop import backprop_feature
from vebi.explain.explainer import (
    PAPER_STYLE,
    ChosenFeature,
    Explainer,
    Explanation,
    ExplanationStyle,
)
from vebi.explain.heatmaps import checkerboard_score, signal_to_heatmap, stride_periods
from vebi.explain.rules import Rules, backward_rules

__all__ = [
    "PAPER_STYLE",
    "ChosenFeature",
    "Explainer",
    "Explanation",
    "ExplanationStyle",
    "Rules",
    "backprop_feature",
    "backward_rules",
    "checkerboard_score",
    "signal_to_heatmap",
    "stride_periods",
]
