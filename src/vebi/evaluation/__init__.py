"""Evaluators (docs/method.md, section 5): relevance by ablation, the sparse classifier, and heatmap
methods scored by localisation, faithfulness and artefacts (torchmetrics Metrics), and their
sanity check by cascading randomisation; dissection of the relevant features against part masks."""

from vebi.evaluation.ablation import AblationRelevance, ablated, sparse_classifier_accuracy
from vebi.evaluation.data import EvaluationImages, EvaluationSet
from vebi.evaluation.dissection import FeatureDissection
from vebi.evaluation.faithfulness import (
    CheckerboardScore,
    DeletionArea,
    InsertionArea,
    perturbation_curves,
)
from vebi.evaluation.heatmaps import HeatmapEvaluation
from vebi.evaluation.localisation import (
    MeanThresholdIoU,
    PointingGame,
    RelevanceMass,
    StrictPointingGame,
    ThresholdIoU,
)
from vebi.evaluation.methods import HeatmapMethod
from vebi.evaluation.metric_base import HeatmapMetric
from vebi.evaluation.sanity import CascadingRandomisation

__all__ = [
    "AblationRelevance",
    "CascadingRandomisation",
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
    "FeatureDissection",
    "EvaluationSet",
    "StrictPointingGame",
    "ThresholdIoU",
    "ablated",
    "perturbation_curves",
    "sparse_classifier_accuracy",
]
