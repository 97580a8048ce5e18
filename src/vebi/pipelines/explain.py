"""Explanation job: overlays and a JSON of the chosen features for some images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from vebi.errors import require_int_in_range
from vebi.explain.explainer import Explainer
from vebi.explain.figures import explanation_figure, save_figure
from vebi.explain.inputs import load_images
from vebi.explain.rules import Rules
from vebi.mining.miner import model_fingerprint
from vebi.mining.relevant import RelevantFeatures
from vebi.pipelines.common import load_model, relevant_features_for
from vebi.utils.cli import finish_loggers, wandb_run_dir
from vebi.utils.instantiate import device_for, flat_config, instantiate_loggers
from vebi.utils.io import atomic_path, unique_file_names
from vebi.utils.log import get_logger
from vebi.utils.wandb_media import log_figures

log = get_logger(__name__)


def _inputs(cfg: DictConfig, datamodule: Any) -> tuple[torch.Tensor, list[str], list[str]]:
    if str(cfg.input) == "test":
        datamodule.prepare_data()
        datamodule.setup("test")
        dataset = datamodule.data_test
        count = min(require_int_in_range("num_images", cfg.num_images, 1), len(dataset))
        images = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(count)])
        return images, [f"test_{i:05d}" for i in range(count)], []
    return load_images(cfg.input, tuple(datamodule.image_shape))


def explain(cfg: DictConfig) -> dict[str, Any]:
    """Explain ``cfg.input`` with the checkpoint's relevant features; write PNGs and JSON."""
    batch_size = require_int_in_range("batch_size", cfg.batch_size, 1)
    require_int_in_range("k", cfg.k, 1)
    datamodule = instantiate(cfg.data)
    model = load_model(cfg, datamodule)
    device = device_for(cfg.trainer)
    module = model.module.to(device)
    target = require_int_in_range(
        f"target (a class id of the model's {module.hparams.num_classes})",
        cfg.get("target"),
        0,
        module.hparams.num_classes - 1,
        allow_none=True,
    )
    relevant = RelevantFeatures.load(relevant_features_for(model, cfg.get("relevant_features")))
    if relevant.fingerprint.get("model") not in (None, model_fingerprint(module.net)):
        log.warning("the relevant features were mined from other weights than %s", model.source)
    images, names, skipped = _inputs(cfg, datamodule)
    relevant.check_model(module.net, images[:1].to(device))
    rules = Rules.from_config(cfg.rules)
    explainer = Explainer(module.net, relevant, k=int(cfg.k), rules=rules)
    targets = None if target is None else torch.full((len(images),), target)
    files = unique_file_names(names)
    output_dir = Path(cfg.paths.output_dir) / "explanations"
    loggers = instantiate_loggers(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams({**flat_config(cfg), "model": model.source})
    records, figures, failed = [], [], True
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            batch_targets = None if targets is None else targets[start : start + len(batch)]
            explanation = explainer(batch.to(device), batch_targets)
            probabilities = explanation.logits.softmax(1)
            for n in range(len(batch)):
                name, class_id = names[start + n], int(explanation.classes[n])
                chosen = explanation.features[n]
                titles = [f"{f.layer}/{f.channel} s={f.score:.3f}" for f in chosen]
                heading = (
                    f"{name}: class {relevant.class_names[class_id]} "
                    f"(p={float(probabilities[n, class_id]):.3f})"
                    + (
                        " - no relevant feature fired, highest-weight ones shown"
                        if explanation.fallback[n]
                        else ""
                    )
                )
                figure = explanation_figure(
                    batch[n],
                    explanation.maps[n, : len(chosen)].cpu(),
                    explanation.combined[n].cpu(),
                    titles,
                    heading,
                )
                figures.append(save_figure(figure, output_dir / f"{files[start + n]}.png"))
                records.append(
                    {
                        "image": name,
                        "class": relevant.class_names[class_id],
                        "class_id": class_id,
                        "probability": float(probabilities[n, class_id]),
                        "fallback": bool(explanation.fallback[n]),
                        "features": [vars(f) for f in chosen],
                        "figure": str(figures[-1]),
                    }
                )
        result = {
            "checkpoint": str(model.ckpt_path) if model.ckpt_path else None,
            "model": model.source,
            "rules": rules.choices(),
            "rules_preset": rules.preset,
            "k": int(cfg.k),
            "explanations": records,
            "skipped": skipped,
        }
        with atomic_path(output_dir / "explanations.json") as tmp:
            tmp.write_text(json.dumps(result, indent=2))
        log_figures(loggers, "explanations", figures, [r["image"] for r in records])
        wandb_dir = wandb_run_dir(loggers)
        failed = False
    finally:
        finish_loggers(loggers, failed=failed)
    lines = [f"\nExplained {len(records)} image(s) with k = {cfg.k} features ({rules.describe()}):"]
    for record in records:
        features = ", ".join(
            f"{f['layer']}/{f['channel']} ({f['score']:.3f})" for f in record["features"]
        )
        lines.append(f"  {record['image']}: class {record['class']} <- {features}")
    if skipped:
        lines.append(f"  skipped {len(skipped)} unreadable file(s): {'; '.join(skipped)}")
    lines.append(f"  overlays and explanations.json: {output_dir}")
    if wandb_dir:
        lines.append(f"  W&B run: {wandb_dir}")
    log.info("\n".join(lines))
    return result
