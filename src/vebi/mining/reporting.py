"""Saving a mining result and reporting it: console, files, Weights & Biases."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger

from vebi.mining.miner import MiningReport
from vebi.mining.relevant import RelevantFeatures
from vebi.utils.log import get_logger

log = get_logger(__name__)
ARTEFACT_NAME = "relevant_features.h5"


def console_summary(relevant: RelevantFeatures, top: int = 5) -> str:
    """A few lines per class: how many features are relevant and the top ones."""
    lines = [f"Relevant features (mu = {relevant.mu:g}, {relevant.index.size} features):"]
    width = max(len(name) for name in relevant.class_names)
    for c, name in enumerate(relevant.class_names):
        features = relevant.relevant(c)
        shown = ", ".join(f"{f.layer}/{f.channel} ({f.weight:.2f})" for f in features[:top])
        more = f", +{len(features) - top} more" if len(features) > top else ""
        lines.append(f"  class {name:>{width}}: {len(features):3d} | {shown}{more}")
    for key, value in relevant.metrics.items():
        if "accuracy" in key:
            lines.append(f"  {key}: {100 * value:.2f}%")
    return "\n".join(lines)


def save_and_log(report: MiningReport, output_dir: str | Path, loggers: list[Logger]) -> Path:
    """Write the artefact (+ JSON/markdown summaries) and log it to every logger."""
    relevant = report.relevant
    path = relevant.save(Path(output_dir) / ARTEFACT_NAME)
    metrics = {f"mining/{key}": value for key, value in relevant.metrics.items()}
    metrics.update({f"mining/{key}": value for key, value in report.timings.items()})
    metrics["mining/num_features"] = relevant.index.size
    metrics["mining/mean_relevant_per_class"] = float(relevant.relevant_mask().sum(0).mean())
    for logger in loggers:
        logger.log_metrics(metrics)
        if isinstance(logger, WandbLogger):
            _log_to_wandb(logger, relevant, report, path)
    log.info("Saved relevant features to %s", path)
    return path


def _log_to_wandb(
    logger: WandbLogger, relevant: RelevantFeatures, report: MiningReport, path: Path
) -> None:
    import wandb

    rows = [
        [name, f.rank, f.layer, f.channel, f.weight]
        for c, name in enumerate(relevant.class_names)
        for f in relevant.relevant(c)
    ]
    logger.log_table(
        "mining/relevant_features",
        columns=["class", "rank", "layer", "channel", "weight"],
        data=rows,
    )
    per_layer = relevant.per_layer_counts()
    logger.log_table(
        "mining/per_layer",
        columns=["layer", "channels", *relevant.class_names],
        data=[
            [layer, size, *per_layer[layer]]
            for layer, size in zip(relevant.index.layers, relevant.index.channels, strict=True)
        ],
    )
    if report.mu_path:
        logger.log_table(
            "mining/mu_path",
            columns=["mu", "sparse_accuracy"],
            data=[[p["mu"], p["sparse_accuracy"]] for p in report.mu_path],
        )
    artifact = wandb.Artifact(
        name=f"relevant-features-{logger.experiment.id}",
        type="relevant-features",
        metadata={"mu": relevant.mu, "layers": list(relevant.layers), **relevant.metrics},
    )
    for file in (path, path.with_suffix(".json"), path.with_suffix(".md")):
        artifact.add_file(str(file))
    logger.experiment.log_artifact(artifact)
