"""Evaluation of explanations: localisation metrics as torchmetrics Metrics."""

from vebi.evaluation.localisation import MeanThresholdIoU, PointingGame, RelevanceMass, ThresholdIoU

__all__ = ["MeanThresholdIoU", "PointingGame", "RelevanceMass", "ThresholdIoU"]
