"""Mining class-relevant internal features (docs/method.md, sections 1-2)."""

from vebi.mining.callback import FeatureMiningCallback
from vebi.mining.features import FeatureExtractor, FeatureIndex, default_feature_layers
from vebi.mining.miner import FeatureMiner, MiningReport
from vebi.mining.relevant import RelevantFeature, RelevantFeatures
from vebi.mining.solver import mu_lasso
from vebi.mining.statistics import GramStatistics

__all__ = [
    "FeatureExtractor",
    "FeatureIndex",
    "FeatureMiner",
    "FeatureMiningCallback",
    "GramStatistics",
    "MiningReport",
    "RelevantFeature",
    "RelevantFeatures",
    "default_feature_layers",
    "mu_lasso",
]
