"""Explanation job: overlays and a JSON of the chosen features for some images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from vebi.data.base import ClassificationData
from vebi.errors import VebiError, require_int_in_range
from vebi.explain.explainer import Explainer, ExplanationStyle
from vebi.explain.figures import explanation_figure, save_figure
from vebi.explain.inputs import ImageFiles
from vebi.explain.rules import Rules
from vebi.mining.miner import model_fingerprint
from vebi.mining.relevant import RelevantFeatures
from vebi.pipelines.common import (
    check_class_count,
    instantiate_data,
    load_model,
    relevant_features_for,
)
from vebi.pipelines.report import report_run
from vebi.utils.distributed import ShardSampler, gather_objects, is_main_process
from vebi.utils.instantiate import instantiate_checked, instantiate_trainer
from vebi.utils.io import atomic_path, unique_file_names
from vebi.utils.log import get_logger
from vebi.utils.task import task
from vebi.utils.torch_api import dataset_size
from vebi.utils.wandb_media import log_figures

log = get_logger(__name__)


class _TestImages(Dataset):
    """The first ``count`` test images as :class:`~vebi.explain.inputs.ImageFiles` items."""

    def __init__(self, dataset: Dataset, count: int) -> None:
        self.dataset, self.count = dataset, count
        self.names = [f"test_{i:05d}" for i in range(count)]
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str, str]:
        return torch.as_tensor(self.dataset[index][0]), index, "", ""


def _inputs(
    cfg: DictConfig, datamodule: ClassificationData, labels: dict[str, int]
) -> ImageFiles | _TestImages:
    """The images of ``cfg.input``, read as the loop asks for them; ``labels`` receives the
    true class of test images (image files have none)."""
    if str(cfg.input) == "test":
        datamodule.prepare_data()
        datamodule.setup("test")
        dataset = datamodule.data_test
        if dataset is None:
            raise VebiError("the data module has no test split after setup('test')")
        count = min(require_int_in_range("num_images", cfg.num_images, 1), dataset_size(dataset))
        test = _TestImages(dataset, count)
        labels.update({name: int(dataset[i][1]) for i, name in enumerate(test.names)})
        return test
    return ImageFiles(cfg.input, datamodule.image_shape)


def _first_image(images: ImageFiles | _TestImages) -> torch.Tensor:
    """The first readable image, (1, C, H, W), to check the network against; an error when no
    file can be read."""
    skipped = list(images.skipped)
    for index in range(len(images)):
        image, _, _, problem = images[index]
        if not problem:
            return image[None]
        if isinstance(images, ImageFiles) and not images.source.is_dir():
            images.read(index)  # one file given: its whole reason (PIL's explanation too)
        skipped.append(f"{images.names[index]}: {problem}")
    source = getattr(images, "source", "the test split")
    raise VebiError(f"no readable image in {source} (skipped: {', '.join(skipped) or 'none'})")


class ExplanationStep(L.LightningModule):
    """Lightning's predict loop over explain.py's images: under DDP each process explains its
    shard (:class:`~vebi.utils.distributed.ShardSampler`) and writes those overlays; the
    records are gathered afterwards. A predict step returns (position, record) pairs."""

    def __init__(
        self,
        explainer: Explainer,
        names: list[str],
        files: list[str],
        output_dir: Path,
        target: int | None,
    ) -> None:
        super().__init__()
        self.net = explainer.model  # a submodule: Lightning puts it on the process's device
        self.explainer = explainer
        self.names, self.files, self.output_dir, self.target = names, files, output_dir, target
        # fewer images than processes: some shards are empty, and the gather still completes
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def predict_step(self, batch: list[Any], batch_idx: int) -> list[tuple[int, dict]]:
        """(position, record) per image of the batch; an unreadable file gives a record
        ``{"image", "skipped"}`` with the reason."""
        images, positions, notes, problems = batch
        readable = [n for n, problem in enumerate(problems) if not problem]
        entries: list[tuple[int, dict]] = [
            (int(positions[n]), {"image": self.names[int(positions[n])], "skipped": problem})
            for n, problem in enumerate(problems)
            if problem
        ]
        if not readable:
            return entries
        images, positions = images[readable], positions[readable]
        notes = [notes[n] for n in readable]
        targets = None if self.target is None else torch.full((len(images),), self.target)
        explanation = self.explainer(images, targets)
        probabilities = explanation.logits.softmax(1)
        class_names = self.explainer.relevant.class_names
        for n, position in enumerate(positions.tolist()):
            name, class_id = self.names[position], int(explanation.classes[n])
            if notes[n]:
                log.warning("%s: %s", name, notes[n])
            chosen = explanation.features[n]
            titles = [f"{f.layer}/{f.channel} s={f.score:.3f}" for f in chosen]
            probability = float(probabilities[n, class_id])
            heading = f"{name}: class {class_names[class_id]} (p={probability:.3f})"
            if explanation.fallback[n]:
                heading += " - no relevant feature fired, highest-weight ones shown"
            figure = explanation_figure(
                images[n].cpu(),
                explanation.maps[n, : len(chosen)].cpu(),
                explanation.combined[n].cpu(),
                titles,
                heading,
            )
            path = save_figure(figure, self.output_dir / f"{self.files[position]}.png")
            entries.append(
                (
                    position,
                    {
                        "image": name,
                        "class": class_names[class_id],
                        "class_id": class_id,
                        "probability": probability,
                        "fallback": bool(explanation.fallback[n]),
                        "features": [vars(f) for f in chosen],
                        "figure": str(path),
                        **({"note": notes[n]} if notes[n] else {}),
                    },
                )
            )
        return entries


def explain(cfg: DictConfig) -> dict[str, Any]:
    """Explain ``cfg.input`` with the checkpoint's relevant features; write PNGs and JSON.

    Runs in Lightning's predict loop: with ``trainer.devices=N trainer.strategy=ddp`` each of
    the N processes explains every N-th image and writes its overlays, and the first process
    writes ``explanations.json`` with the records of all (in input order)."""
    batch_size = require_int_in_range("batch_size", cfg.batch_size, 1)
    require_int_in_range("k", cfg.k, 1)
    datamodule = instantiate_data(cfg.data)
    model = load_model(cfg, datamodule)
    module = model.module
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
    labels: dict[str, int] = {}
    images = _inputs(cfg, datamodule, labels)
    if str(cfg.input) == "test":  # the data's folders are read now
        check_class_count(module, datamodule, model.source)
    names = images.names
    relevant.check_model(module.net, _first_image(images))
    rules = Rules.from_config(cfg.rules)
    style = instantiate_checked(cfg.explanation, ExplanationStyle, "explanation")
    explainer = Explainer(module.net, relevant, k=int(cfg.k), rules=rules, style=style)
    output_dir = Path(cfg.paths.output_dir) / "explanations"
    step = ExplanationStep(explainer, names, unique_file_names(names), output_dir, target)
    loader = DataLoader(images, batch_size=batch_size, sampler=ShardSampler(len(images)))
    trainer: L.Trainer = instantiate_trainer(
        cfg.trainer,
        logger=False,
        callbacks=[],
        use_distributed_sampler=False,
        inference_mode=False,  # explanations need autograd
        enable_model_summary=False,
    )
    page = None
    with task(cfg, "explain.py", ["explaining", "explanations.json"], model=model.source) as run:
        run.progress.keep(f"the overlays written so far are complete files in {output_dir}")
        batches = trainer.predict(step, dataloaders=loader) or []
        run.progress.done("explaining", f"{len(images)} image(s)")
        mine = [entry for batch in batches for entry in batch]
        entries = sorted(
            (entry for part in gather_objects(mine) for entry in part), key=lambda e: e[0]
        )
        records = [record for _, record in entries if "skipped" not in record]
        skipped = [*images.skipped]
        skipped += [f"{r['image']}: {r['skipped']}" for _, r in entries if "skipped" in r]
        class_names = relevant.class_names
        for record in records:
            if record["image"] in labels:  # a test image: its true class
                record["label"] = class_names[labels[record["image"]]]
                record["correct"] = record["class_id"] == labels[record["image"]]
        result = {
            "checkpoint": str(model.ckpt_path) if model.ckpt_path else None,
            "model": model.source,
            "rules": rules.choices(),
            "rules_preset": rules.preset,
            "k": int(cfg.k),
            "explanations": records,
            "skipped": skipped,
        }
        if is_main_process():
            with atomic_path(output_dir / "explanations.json") as tmp:
                tmp.write_text(json.dumps(result, indent=2))
            run.progress.done("explanations.json")
            figures = [Path(record["figure"]) for record in records]
            log_figures(run.loggers, "explanations", figures, [r["image"] for r in records])
            page = report_run(cfg.paths.output_dir, run.loggers)
        wandb_dir = run.wandb_dir
    if not is_main_process():
        return result
    lines = [f"\nExplained {len(records)} image(s) with k = {cfg.k} features ({rules.describe()}):"]
    for record in records:
        features = ", ".join(
            f"{f['layer']}/{f['channel']} ({f['score']:.3f})" for f in record["features"]
        )
        lines.append(f"  {record['image']}: class {record['class']} <- {features}")
        if record.get("note"):
            lines.append(f"    note: {record['note']}")
    if skipped:
        lines.append(f"  skipped {len(skipped)} unreadable file(s): {'; '.join(skipped)}")
    lines.append(f"  overlays and explanations.json: {output_dir}")
    if page:
        lines.append(f"  report: {page}")
    if wandb_dir:
        lines.append(f"  W&B run: {wandb_dir}")
    log.info("\n".join(lines))
    return result
