"""Evaluation job: test a checkpoint, then run the evaluators (docs/method.md, section 5).

Network accuracy (Lightning ``Trainer.test``), the sparse classifier, relevance by ablation,
the heatmap methods of ``evaluation.methods`` scored by localisation (where masks exist),
deletion/insertion and the artefact score, and their sanity check (cascading randomisation).
Results go to ``results.json`` / ``results.md`` / PNGs in the run dir and to W&B.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from vebi.checkpoint import load_classifier
from vebi.data.base import ClassificationData
from vebi.errors import VebiError, require_int_in_range
from vebi.evaluation.ablation import (
    AblationRelevance,
    sparse_classifier_accuracy,
    summarise_ablation,
)
from vebi.evaluation.data import ClassImages, EvaluationSet
from vebi.evaluation.dissection import FeatureDissection, part_masks
from vebi.evaluation.heatmaps import (
    HeatmapEvaluation,
    balanced_subset,
    explained_classes,
    metric_info,
)
from vebi.evaluation.methods import HeatmapMethod
from vebi.evaluation.metric_base import GROUPS, HeatmapMetric, check_metric
from vebi.evaluation.peers import CRPClassPick, PeerUnavailable
from vebi.evaluation.reporting import (
    class_panels,
    log_to_wandb,
    panel_rows,
    results_markdown,
    save_figures,
)
from vebi.evaluation.sanity import CascadingRandomisation, seeded_subset
from vebi.mining.callback import mining_datasets
from vebi.mining.miner import FeatureMiner
from vebi.mining.relevant import RelevantFeatures
from vebi.mining.reporting import console_summary
from vebi.mining.reuse import load_or_mine
from vebi.models.hooks import to_device
from vebi.modules.classifier import ClassifierModule
from vebi.pipelines.common import (
    LoadedModel,
    check_class_count,
    instantiate_data,
    load_model,
    mined_features_path,
)
from vebi.pipelines.report import report_run
from vebi.utils.distributed import ShardSampler, is_main_process
from vebi.utils.instantiate import device_for, instantiate_checked, instantiate_trainer
from vebi.utils.io import atomic_path, strict_json
from vebi.utils.log import get_logger
from vebi.utils.signals import JobProgress
from vebi.utils.task import Task, task
from vebi.utils.torch_api import dataset_size

log = get_logger(__name__)

EVALUATORS = ("sparse", "ablation", *GROUPS, "sanity", "dissection")
#: the evaluators that need the heatmap methods
METHOD_EVALUATORS = (*GROUPS, "sanity")


def build_metrics(settings: DictConfig, groups: list[str]) -> dict[str, HeatmapMetric]:
    """The heatmap metrics of ``evaluation.metrics`` whose group is among ``groups``: each
    ``_target_`` checked before it is called, and what it made checked again (Hydra's
    ``_partial_: true`` makes a ``functools.partial``, not a metric)."""
    metrics = {}
    for name, spec in (settings.get("metrics") or {}).items():
        where = f"evaluation.metrics.{name}"
        metric = check_metric(instantiate_checked(spec, HeatmapMetric, where), where)
        if metric.group in groups:
            metrics[name] = metric
    return metrics


def build_methods(
    cfg: DictConfig,
    net: torch.nn.Module,
    relevant: RelevantFeatures,
    notes: list[str] | None = None,
    training: ClassImages | None = None,
) -> dict[str, HeatmapMethod]:
    """Instantiate the methods of ``evaluation.methods`` named in ``evaluation.select`` for
    the network ``net`` and its relevant features. A peer whose library is not installed is
    left out with a note in ``notes`` (once per library); methods that learn from training
    images (CRAFT) are fitted on ``training`` (left out with a note without it)."""
    available = cfg.evaluation.get("methods") or {}
    chosen = list(cfg.evaluation.get("select") or available)
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise VebiError(f"unknown heatmap method(s) {unknown}; available: {list(available)}")
    notes = [] if notes is None else notes
    methods = {}
    for name in chosen:
        # partial first: Hydra would turn the RelevantFeatures dataclass into a config
        factory = instantiate_checked(
            available[name], HeatmapMethod, f"evaluation.methods.{name}", _partial_=True
        )
        try:
            method = factory(model=net, relevant=relevant)
        except PeerUnavailable as error:
            notes.append(f"{name} skipped: {error}")
            continue
        if getattr(method, "needs_training_images", False):
            if training is None:
                notes.append(f"{name} skipped: it learns from training images, none given")
                continue
            try:
                method.fit(training)
            except Exception as error:  # a peer refusing the model: a noted row
                notes.append(f"{name} failed while fitting: {type(error).__name__}: {error}")
                continue
        methods[name] = method
    return methods


def training_images(cfg: DictConfig, datamodule: ClassificationData | None) -> ClassImages | None:
    """The training images of each class, for the methods that learn from them (a seeded
    pick of the mining split, set up only when first asked for); None without a data module."""
    if datamodule is None:
        return None

    def mining_split() -> torch.utils.data.Dataset:
        datamodule.setup("fit")
        return mining_datasets(datamodule)[0]

    return ClassImages(mining_split, seed=int(cfg.seed))


def run_evaluators(
    cfg: DictConfig,
    module: ClassifierModule,
    relevant: RelevantFeatures,
    test: EvaluationSet,
    methods: dict[str, HeatmapMethod],
    progress: JobProgress | None = None,
    datamodule: ClassificationData | None = None,
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(results, panel figures, notes) of the evaluators listed in ``evaluation.evaluators``
    (settings checked by :func:`_check_settings`; ``sanity`` mines again on the training
    images of ``datamodule``); each finished one is told to ``progress``."""
    progress = progress or JobProgress("evaluate.py", list(cfg.evaluation.evaluators))
    settings = cfg.evaluation
    evaluators = list(settings.evaluators)
    net = module.net.eval()
    results: dict[str, Any] = {}
    notes: list[str] = []
    if "sparse" in evaluators:
        results["sparse"] = sparse_classifier_accuracy(
            net, relevant, test, int(settings.batch_size_inference)
        )
        progress.done("sparse")
    if "ablation" in evaluators:
        ablation: AblationRelevance = instantiate_checked(
            settings.ablation, AblationRelevance, "evaluation.ablation"
        )
        forwards = ablation.planned_forwards(test.labels, relevant, int(bool(ablation.crp_images)))
        log.info(
            "Ablation: %d image forwards (%d draws, drop on other classes from %s test images)",
            forwards,
            ablation.draws,
            ablation.other_images or "all",
        )
        compare: dict[str, CRPClassPick] = {}
        if ablation.crp_images:
            compare, skipped = _crp_class_pick(net, relevant, cfg, datamodule, ablation.crp_images)
            notes += skipped
        records = ablation(net, relevant, test, compare=compare)
        results["ablation"] = {
            "draws": ablation.draws,
            "num_images": len(test),
            "other_images": ablation.other_images,
            "forwards": forwards,
            "per_class": [r.row() for r in records],
            "average": summarise_ablation(records),
        }
        progress.done("ablation")
    heatmap_evaluators = [e for e in evaluators if e in GROUPS]
    panels: dict[str, Any] = {}
    if heatmap_evaluators:
        metrics = build_metrics(settings, heatmap_evaluators)
        scorer = HeatmapEvaluation(metrics, batch_size=int(settings.batch_size))
        applicable, skipped = scorer.applicable(net, test.has_masks)
        notes += skipped
        limit = settings.get("heatmap_images")
        subset = test.select(balanced_subset(test.labels, limit, int(cfg.seed)))
        scores = scorer(net, methods, subset, settings.target)
        failed = scorer.failed
        notes += [f"{name} failed: {reason}" for name, reason in failed.items()]
        working = {name: method for name, method in methods.items() if name not in failed}
        rows = panel_rows(subset.labels, int(settings.panel_images_per_class))
        rows = {c: members for c, members in rows.items() if len(members)}  # 0 per class: none
        if rows and is_main_process():
            panels = _panels(net, working, subset, rows, settings.target, relevant.class_names)
        method_notes = {
            name: list(getattr(method, "notes", None) or []) for name, method in methods.items()
        }
        notes += [f"{name}: {note}" for name, items in method_notes.items() for note in items]
        results["heatmaps"] = {
            "num_images": len(subset),
            "target": settings.target,
            "metrics": metric_info(applicable),
            "methods": scores,
            "failed": failed,
            "method_notes": {name: items for name, items in method_notes.items() if items},
        }
        for evaluator in heatmap_evaluators:
            progress.done(evaluator)
    if "sanity" in evaluators:
        results["sanity"] = run_sanity(cfg, net, relevant, test, datamodule)
        notes += results["sanity"].pop("notes")
        progress.done("sanity")
    if "dissection" in evaluators:
        masks = part_masks(datamodule, "test")
        if masks is None:
            notes.append("dissection skipped: the data set has no part masks")
        else:
            dissection: FeatureDissection = instantiate_checked(
                settings.dissection, FeatureDissection, "evaluation.dissection"
            )
            results["dissection"] = dissection(
                net, relevant, test, masks.labels[test.rows], masks.names, masks.deciding
            )
        progress.done("dissection")
    return results, panels, notes


def _crp_class_pick(
    net: torch.nn.Module,
    relevant: RelevantFeatures,
    cfg: DictConfig,
    datamodule: ClassificationData | None,
    images_per_class: int,
) -> tuple[dict[str, CRPClassPick], list[str]]:
    """({"crp": CRP's class-level pick} to ablate next to the relevant features, or nothing and
    a note saying why: zennit-crp missing, no training split, CRP refusing the network (tried
    on the first class with relevant features before the ablation starts)."""
    try:
        training = training_images(cfg, datamodule)
        if training is None:
            raise PeerUnavailable("no training images to rank CRP's channels on")
        pick = CRPClassPick(net, training, images_per_class)
        first = next((c for c in range(relevant.num_classes) if relevant.relevant(c)), None)
        if first is not None:
            pick(first, {relevant.relevant(first)[0].layer: 1})
    except Exception as error:  # a peer refusing the model: the comparison is a note
        return {}, [f"ablation of CRP's class-level pick skipped: {type(error).__name__}: {error}"]
    return {"crp": pick}, []


def run_sanity(
    cfg: DictConfig,
    net: torch.nn.Module,
    relevant: RelevantFeatures,
    test: EvaluationSet,
    datamodule: ClassificationData | None,
) -> dict[str, Any]:
    """The cascading randomisation test of ``evaluation.sanity`` on a seeded, class-balanced
    subset of the test images, W mined again at every step on a seeded subset of the training
    images (``mining`` settings, this W's mu, a temporary activation cache)."""
    check: CascadingRandomisation = instantiate_checked(
        cfg.evaluation.sanity, CascadingRandomisation, "evaluation.sanity"
    )
    subset = test.select(balanced_subset(test.labels, check.images, int(cfg.seed)))
    device = next(net.parameters()).device
    classes = torch.cat(
        [
            explained_classes(
                net, b.images.to(device), b.labels.to(device), cfg.evaluation.target
            ).cpu()
            for b in subset.batches(check.batch_size)
        ]
    )
    notes: list[str] = []
    remine = None
    if check.remine:
        if datamodule is None:
            raise VebiError("evaluation.sanity.remine=true needs the data module's training images")
        datamodule.setup("fit")
        dataset, _ = mining_datasets(datamodule)
        mining_set, clamped = seeded_subset(dataset, check.mining_images, int(cfg.seed))
        notes += [clamped] if clamped else []
        check.mining_images = dataset_size(mining_set)
        miner: FeatureMiner = instantiate_checked(
            cfg.mining,
            FeatureMiner,
            "mining",
            mu=relevant.mu,
            mu_candidates=None,
            cache_dir=None,
            progress=False,
        )

        def remine(randomised: torch.nn.Module) -> RelevantFeatures:
            return miner.mine(randomised, mining_set, None, relevant.class_names).relevant

    data_randomised = None
    if check.data_randomised_checkpoint:
        data_randomised = _label_permuted_network(
            Path(check.data_randomised_checkpoint), net, relevant
        )
    result = check(
        net,
        relevant,
        subset,
        classes,
        lambda network, features: build_methods(
            cfg, network, features, training=training_images(cfg, datamodule)
        ),
        remine,
        data_randomised=data_randomised,
    )
    if data_randomised is not None:
        result["data_randomised_checkpoint"] = str(check.data_randomised_checkpoint)
    result["notes"] = notes + result["notes"]
    return result


def _label_permuted_network(
    path: Path, net: torch.nn.Module, relevant: RelevantFeatures
) -> tuple[torch.nn.Module, RelevantFeatures]:
    """The network of checkpoint ``path`` (trained on permuted labels) on ``net``'s device,
    with the relevant features mined in its training run; refused unless both exist and it
    has ``net``'s classes."""
    if not path.is_file():
        raise VebiError(f"evaluation.sanity.data_randomised_checkpoint={path}: no such file")
    other = load_classifier(path)
    features = mined_features_path(path)
    if not features.is_file():
        raise VebiError(
            f"{path} has no relevant features next to it ({features}): train it with the "
            "feature_mining callback (the default) or mine them with python mine.py "
            f"ckpt_path={path}"
        )
    other_relevant = RelevantFeatures.load(features)
    if other_relevant.num_classes != relevant.num_classes:
        raise VebiError(
            f"{path} has {other_relevant.num_classes} classes, the evaluated network "
            f"{relevant.num_classes}: train the label-permuted one on the same data"
        )
    device = next(net.parameters()).device
    return other.net.to(device).eval(), other_relevant


def _panels(
    net: torch.nn.Module,
    methods: dict[str, HeatmapMethod],
    subset: EvaluationSet,
    rows: dict[int, torch.Tensor],
    target: str,
    class_names: list[str],
) -> dict[str, Any]:
    """Per class, the maps of every method on its first panel images (only those are read)."""
    shown = subset.load(torch.cat(list(rows.values())))
    device = next(net.parameters()).device
    images = shown.images.to(device)
    classes = explained_classes(net, images, shown.labels.to(device), target)
    maps = {name: method(images, classes).cpu() for name, method in methods.items()}
    positions, start = {}, 0
    for c, members in rows.items():
        positions[c] = torch.arange(start, start + len(members))
        start += len(members)
    return class_panels(shown, positions, maps, class_names)


#: Most deletion / insertion steps (:func:`_check_settings`).
MAX_CURVE_STEPS = 1000


def _check_settings(settings: DictConfig) -> None:
    """Refuse impossible evaluation settings before any work is done."""
    unknown = set(settings.evaluators) - set(EVALUATORS)
    if unknown:
        raise VebiError(f"unknown evaluator(s) {sorted(unknown)}; choose from {list(EVALUATORS)}")
    require_int_in_range(
        "evaluation.heatmap_images", settings.get("heatmap_images"), 1, allow_none=True
    )
    require_int_in_range("evaluation.max_images", settings.get("max_images"), 1, allow_none=True)
    # every step is one forward pass of every scored image per method and curve; beyond a
    # thousand the curves' AUC no longer moves (a step is then under a tenth of a percent)
    require_int_in_range("evaluation.steps", settings.get("steps"), 1, MAX_CURVE_STEPS)
    require_int_in_range("evaluation.batch_size", settings.get("batch_size"), 1)
    require_int_in_range("evaluation.batch_size_inference", settings.get("batch_size_inference"), 1)
    require_int_in_range(
        "evaluation.panel_images_per_class", settings.get("panel_images_per_class"), 0
    )
    if settings.target not in ("label", "predicted"):
        raise VebiError(
            f"evaluation.target must be 'label' or 'predicted', got {settings.target!r}"
        )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test the checkpoint and run the evaluators; write ``results.json`` and ``results.md``."""
    _check_settings(cfg.evaluation)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    datamodule = instantiate_data(cfg.data)
    model = load_model(cfg, datamodule)
    _check_classes(model, datamodule, cfg)
    planned = ["test", "features", *cfg.evaluation.evaluators, "results.json"]
    with task(cfg, "evaluate.py", planned, model=model.source) as run:
        test, metrics = _test_network(cfg, model.module, datamodule, run.loggers)
        run.progress.done("test")
        module = to_device(model.module, device_for(cfg.trainer))
        relevant, relevant_path = _relevant_features(cfg, model, module, datamodule, test, run)
        run.progress.done("features", str(relevant_path))
        # the heatmap methods are built before any evaluator runs: a model they cannot explain
        # (a module without backward rule) is refused now, not after the ablation
        heatmaps = set(cfg.evaluation.evaluators) & set(METHOD_EVALUATORS)
        built: list[str] = []
        methods = (
            build_methods(
                cfg, module.net, relevant, built, training=training_images(cfg, datamodule)
            )
            if heatmaps
            else {}
        )
        evaluations, panels, notes = run_evaluators(
            cfg, module, relevant, test, methods, run.progress, datamodule
        )
        notes = built + notes
        result = {
            "checkpoint": str(model.ckpt_path) if model.ckpt_path else None,
            "model": model.source,
            "num_test_images": dataset_size(test.dataset),
            "relevant_features": str(relevant_path),
            "mu": relevant.mu,
            "k": cfg.get("k"),
            "metrics": metrics | {f"test/{k}": v for k, v in evaluations.pop("sparse", {}).items()},
            **evaluations,
            "notes": notes,
            "config": OmegaConf.to_container(cfg.evaluation, resolve=True),
            "output_dir": str(cfg.paths.output_dir),
        }
        _publish(result, panels, cfg, run)
    _print_summary(result)
    return result


def _check_classes(model: LoadedModel, datamodule: ClassificationData, cfg: DictConfig) -> None:
    """Refuse a network whose class count is not the data's."""
    data_classes = datamodule.num_classes
    predicted = model.module.hparams.num_classes
    if data_classes != predicted:
        raise VebiError(
            f"{model.source} predicts {predicted} classes but the data "
            f"({cfg.data._target_}) has {data_classes}: pick the matching experiment=..."
        )


def _test_network(
    cfg: DictConfig,
    module: ClassifierModule,
    datamodule: ClassificationData,
    loggers: list[Logger],
) -> tuple[EvaluationSet, dict[str, float]]:
    """(the evaluation images, the network's test metrics from Lightning's test loop). Test
    batches are sharded without padding (ShardSampler): under DDP the test metrics are those
    of one process."""
    trainer: L.Trainer = instantiate_trainer(
        cfg.trainer, logger=loggers or False, callbacks=[], use_distributed_sampler=False
    )
    datamodule.prepare_data()
    datamodule.setup("test")
    check_class_count(module, datamodule, "the network")  # the folders are read now
    test_dataset = datamodule.test_dataloader().dataset
    # refuses an empty test split before anything runs
    test = EvaluationSet.from_dataset(
        test_dataset,
        cfg.evaluation.get("max_images"),
        int(cfg.seed),
        int(cfg.evaluation.batch_size_inference),
        datamodule.num_workers,
    )
    loader = DataLoader(
        test_dataset,
        batch_size=datamodule.batch_size,
        sampler=ShardSampler(dataset_size(test_dataset)),
        num_workers=datamodule.num_workers,
    )
    if dataset_size(test_dataset) < trainer.world_size:  # Lightning's test loop needs a batch each
        raise VebiError(
            f"the test split has {dataset_size(test_dataset)} image(s), fewer than the "
            f"{trainer.world_size} processes of trainer.devices x trainer.num_nodes: run on "
            "fewer devices (the evaluators after the test pass cope with empty shards)"
        )
    (metrics,) = trainer.test(module, dataloaders=loader)
    return test, {k: float(v) for k, v in metrics.items()}


def _relevant_features(
    cfg: DictConfig,
    model: LoadedModel,
    module: ClassifierModule,
    datamodule: ClassificationData,
    test: EvaluationSet,
    run: Task,
) -> tuple[RelevantFeatures, Path]:
    """The relevant features of ``relevant_features=``, of the checkpoint's training run, or
    mined now (:func:`~vebi.mining.reuse.load_or_mine`), checked against the network."""
    explicit = cfg.get("relevant_features")
    relevant, relevant_path, obtained = load_or_mine(
        instantiate_checked(cfg.mining, FeatureMiner, "mining"),
        module.net,
        module.class_names,
        datamodule,
        Path(explicit) if explicit else model.saved_features(),
        explicit=bool(explicit),
        output_dir=Path(cfg.paths.output_dir) / "mining",
        loggers=run.loggers,
        named_classes=module.hparams.get("class_names"),
    )
    probe = test.select(torch.arange(1)).load().images
    relevant.check_model(module.net, probe.to(device_for(cfg.trainer)))
    log.info("\n%s\n  (%s: %s)", console_summary(relevant), obtained, relevant_path)
    return relevant, relevant_path


def _publish(result: dict[str, Any], panels: dict[str, Any], cfg: DictConfig, run: Task) -> None:
    """Figures, W&B, ``results.json``/``results.md`` and the report. Every process holds the
    same (all-reduced) results; the first one writes them."""
    output_dir = Path(cfg.paths.output_dir)
    figures = save_figures(result, panels, output_dir) if is_main_process() else {}
    result["figures"] = {name: str(path) for name, path in figures.items()}
    log_to_wandb(run.loggers, result, figures)
    result["wandb_dir"] = run.wandb_dir
    if is_main_process():
        _write_results(result, output_dir, Path(cfg.paths.root_dir))
        run.progress.done("results.json")
    result["report"] = report_run(output_dir, run.loggers)


def _print_summary(result: dict[str, Any]) -> None:
    acc = result["metrics"].get("test/acc")
    lines = [results_markdown(result), "Evaluation finished", f"  model:       {result['model']}"]
    if acc is not None:
        lines.append(f"  test acc:    {100 * acc:.2f}% on {result['num_test_images']} test images")
    lines.append(f"  run files:   {result['output_dir']}")
    if result.get("report"):
        lines.append(f"  report:      {result['report']}")
    if result["wandb_dir"]:
        lines.append(f"  W&B run:     {result['wandb_dir']}")
    log.info("\n".join(lines))


def portable_paths(result: Any, root: Path) -> Any:
    """``result`` with every absolute file path inside the project ``root`` made relative to
    it (at any depth: the checkpoint, the figures, a sanity check's other checkpoint, the
    config), so that results copied elsewhere (experiments/results) name no machine's
    folders; other values unchanged."""
    if isinstance(result, dict):
        return {key: portable_paths(value, root) for key, value in result.items()}
    if isinstance(result, list):
        return [portable_paths(value, root) for value in result]
    if isinstance(result, str) and result.startswith("/"):
        try:
            return str(Path(result).resolve().relative_to(root.resolve()))
        except (ValueError, OSError):
            return result
    return result


def _write_results(result: dict[str, Any], output_dir: Path, root: Path) -> None:
    """``results.json`` as strict JSON (NaN and Inf, e.g. of a metric over too few images,
    become null, listed in the notes) and ``results.md``."""
    portable = portable_paths(result, root)
    text, undefined = strict_json(portable)
    if undefined:
        note = (
            f"{len(undefined)} value(s) undefined (NaN or Inf, e.g. too few images), written "
            f"as null: {', '.join(undefined[:10])}{' ...' if len(undefined) > 10 else ''}"
        )
        portable["notes"] = [*portable.get("notes", []), note]
        text, _ = strict_json(portable)
        log.warning("%s", note)
    with atomic_path(output_dir / "results.json") as tmp:
        tmp.write_text(text)
    with atomic_path(output_dir / "results.md") as tmp:
        tmp.write_text(results_markdown(portable))
