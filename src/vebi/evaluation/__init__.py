"""Evaluators (docs/method.md, section 5): relevance by ablation, the sparse classifier, and heatmap
methods scored by localisation, faithfulness and artefacts (torchmetrics Metrics)."""

from vebi.evaluation.ablation import AblationRelevance, ablated, sparse_classifier_accuracy
from vebi.evaluation.data import EvaluationImages, EvaluationSet
from vebi.evaluation.faithfulness import (
    CheckerboardScore,
    DeletionArea,
    InsertionArea,
    perturbation_curves,
)
from vebi.evaluation.heatmaps import HeatmapEvaluation
from vebi.evaluation.localisation import MeanThresholdIoU, PointingGame, RelevanceMass, ThresholdIoU
from vebi.evaluation.methods import HeatmapMethod
from vebi.evaluation.metric_base import HeatmapMetric

__all__ = [
    "AblationRelevance",
    "CheckerboardScore",
    "DeletionArea",
    "HeatmapEvaluation",
    "HeatmapMethod",
    "HeatmapMetric",
    "InsertionArea",
    "MeanThresholdIoU",
    "PointingGame",
    "RelevanceMass",
    "EvaluationImages",
    "EvaluationSet",
    "ThresholdIoU",
    "ablated",
    "perturbation_curves",
    "sparse_classifier_accuracy",
]
