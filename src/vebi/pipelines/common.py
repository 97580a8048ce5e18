"""What the jobs share: finding a checkpoint and its mined features, making galleries."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate as hydra_instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from vebi.checkpoint import (
    check_data_override,
    check_settings,
    load_classifier,
    newest_checkpoint,
    stored_settings,
)
from vebi.data.base import ClassificationData, check_data_contract
from vebi.errors import CheckpointError, VebiError
from vebi.evaluation.data import EvaluationSet
from vebi.evaluation.dissection import FeatureDissection, part_masks
from vebi.explain.interpretation import interpret_and_log
from vebi.explain.rules import Rules
from vebi.mining.miner import MiningReport
from vebi.mining.relevant import RelevantFeatures
from vebi.mining.reporting import ARTEFACT_NAME
from vebi.models.hooks import eval_mode
from vebi.modules.classifier import ClassifierModule
from vebi.utils.instantiate import instantiate_checked
from vebi.utils.log import get_logger
from vebi.utils.torch_api import dataset_size

log = get_logger(__name__)


def resolve_checkpoint(cfg: DictConfig) -> Path:
    """``cfg.ckpt_path`` if given, else the newest best checkpoint of ``cfg.experiment_name``."""
    if cfg.get("ckpt_path"):
        return Path(cfg.ckpt_path)
    runs = Path(cfg.paths.log_dir) / "train" / cfg.experiment_name
    path = newest_checkpoint(runs)
    log.info("Using the newest checkpoint of experiment %r: %s", cfg.experiment_name, path)
    return path


def _override_key(argument: str) -> str | None:
    """``a.b`` of a Hydra override ``[+|++|~]a.b=value`` (None for flags and their values)."""
    if argument.startswith("-") or "=" not in argument:
        return None
    return argument.split("=", 1)[0].lstrip("+~")


def _storable(override: str) -> bool:
    """Whether a command-line override is a plain ``data.<key>=<value>`` a checkpoint may
    carry (:func:`vebi.checkpoint.check_data_override`)."""
    try:
        check_data_override(override)
    except ValueError:
        return False
    return True


def instantiate_data(config: DictConfig) -> ClassificationData:
    """The data module of ``config`` (``cfg.data``), checked against the contract the jobs
    read (:class:`vebi.data.ClassificationData`) before any work."""
    datamodule = instantiate_checked(config, L.LightningDataModule, "data")
    return check_data_contract(datamodule, f"data ({config.get('_target_')})")


def run_settings(cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    """What a checkpoint should carry for later jobs: the Hydra choices of ``experiment`` and
    ``data``, the ``data.*`` overrides given on the command line, the experiment name and the
    input shape (C, H, W)."""
    choices: dict[str, Any] = {}
    overrides: list[str] = []
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        choices = dict(hydra_cfg.runtime.choices)
        overrides = [str(o) for o in hydra_cfg.overrides.task if _storable(str(o))]
    shape = getattr(datamodule, "image_shape", None)
    return {
        "experiment": choices.get("experiment"),
        "data": choices.get("data"),
        "data_overrides": overrides,
        "experiment_name": str(cfg.get("experiment_name") or "default"),
        "image_shape": [int(v) for v in shape] if shape is not None else None,
    }


#: The configs folder next to the entry points (train.py, mine.py, ...).
CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"


def data_config_keys(config_dir: Path, name: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """The keys of the data config ``name`` of ``config_dir``: its own and those it inherits
    through its defaults list (``an8flower_single`` -> ``an8flower_double``)."""
    path = config_dir / "data" / f"{name}.yaml"
    if name in seen or not path.is_file():
        return set()
    config = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(config, dict):
        return set()
    keys = {str(key) for key in config if key != "defaults"}
    for entry in config.get("defaults") or []:
        parent = entry if isinstance(entry, str) else None
        if parent and parent != "_self_" and "/" not in parent and ":" not in parent:
            keys |= data_config_keys(config_dir, parent.removeprefix("data/"), seen | {name})
    return keys


def _check_settings_exist(settings: dict[str, Any], ckpt: str, config_dir: Path) -> None:
    """The experiment and data choices a checkpoint names must be configs of ``config_dir``,
    and its ``data.*`` overrides keys of that data config."""
    for group in ("experiment", "data"):
        name = settings.get(group)
        if name is not None and not (config_dir / group / f"{name}.yaml").is_file():
            raise CheckpointError(
                f"{ckpt}: refusing its stored settings: {group} = {name!r} is not a config of "
                f"{config_dir / group}; pass experiment=... yourself"
            )
    overrides = settings.get("data_overrides") or []
    if not overrides:
        return
    data_keys = data_config_keys(config_dir, settings.get("data") or "mnist")
    for position, override in enumerate(overrides):
        key = override.split("=", 1)[0].split(".")[1]
        if key not in data_keys:
            raise CheckpointError(
                f"{ckpt}: refusing its stored settings: settings.data_overrides[{position}] = "
                f"{override!r} (data has no key {key!r}); pass experiment=... yourself"
            )


def with_checkpoint_settings(argv: list[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    """``argv`` of mine.py/explain.py/evaluate.py plus the settings that ``ckpt_path=...`` was
    trained with (:func:`run_settings`), where the command line gives none of its own: the
    experiment (unless ``experiment=`` is given, then nothing is added), its data choice and
    ``data.*`` overrides, and the experiment name (so the run is filed under it).
    Announced on stderr; unchanged for sweeps over checkpoints and checkpoints without
    settings (a missing or broken file is reported later, by the job).

    The stored settings are data, checked before anything is composed
    (:func:`vebi.checkpoint.check_settings`, and the configs they name must exist in
    ``config_dir``): anything else is a :class:`CheckpointError`."""
    given = {key: arg for arg in argv[1:] if (key := _override_key(arg))}
    ckpt = given.get("ckpt_path", "").split("=", 1)[-1]
    if not ckpt or "experiment" in given or "," in ckpt:
        return argv
    try:
        stored = stored_settings(ckpt)
    except (CheckpointError, OSError):
        return argv
    settings = check_settings(stored, ckpt)
    if not settings:
        return argv
    _check_settings_exist(settings, ckpt, config_dir)
    # a run trained without an experiment is composed without one (``experiment=null`` is no
    # Hydra override: a config group cannot be set to None)
    experiment = settings.get("experiment")
    added = [f"experiment={experiment}" if experiment else "~experiment"]
    if settings.get("data") and "data" not in given:
        added.append(f"data={settings['data']}")
    added += [o for o in settings.get("data_overrides") or [] if _override_key(o) not in given]
    if settings.get("experiment_name") and "experiment_name" not in given:
        added.append(f"experiment_name={settings['experiment_name']}")
    print(
        f"{Path(argv[0]).name}: {ckpt} was trained with {' '.join(added)}; using these "
        "settings (give experiment=... to choose others)",
        file=sys.stderr,
    )
    return [*argv, *added]


def argv_with_checkpoint_settings(argv: list[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    """:func:`with_checkpoint_settings` for an entry point: a refused checkpoint is one
    ``error:`` line on stderr and exit status 1, before Hydra composes or writes anything."""
    try:
        return with_checkpoint_settings(argv, config_dir)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def _check_input_shape(module: ClassifierModule, datamodule: Any, ckpt_path: Path) -> None:
    """The data's image shape must be the one the checkpoint was trained on."""
    settings = module.run_settings or {}
    trained = settings.get("image_shape")
    try:
        shape = getattr(datamodule, "image_shape", None)
    except VebiError:
        return
    if trained and shape is not None and tuple(trained) != tuple(shape):
        experiment = settings.get("experiment") or "null"
        raise VebiError(
            f"{ckpt_path} was trained on images shaped {tuple(trained)} (experiment="
            f"{experiment}), but the data gives {tuple(shape)}: leave experiment= out to use "
            f"the checkpoint's settings, or pass experiment={experiment}"
        )


@dataclass
class LoadedModel:
    """The classifier a job works on, and where it came from."""

    module: ClassifierModule
    ckpt_path: Path | None  # None: built from the model config
    source: str  # for logs and results: the checkpoint, or how the config's weights were set

    @property
    def net(self) -> nn.Module:
        return self.module.net

    def saved_features(self) -> Path | None:
        """The relevant features saved by the checkpoint's training run (None without one)."""
        return mined_features_path(self.ckpt_path) if self.ckpt_path else None


def _config_class_names(cfg: DictConfig, datamodule: Any, num_classes: int) -> list[str] | None:
    """Class names for a network built from config: the model config's, the data's when they
    count as many, or the torchvision ImageNet names for a 1000-class pretrained network."""
    if cfg.model.get("class_names"):
        return [str(name) for name in cfg.model.class_names]
    try:
        names = list(getattr(datamodule, "class_names", None) or [])
    except VebiError:  # e.g. the data folder is missing: the data step will say so
        names = []
    if len(names) == num_classes:
        return [str(name) for name in names]
    net = cfg.model.net
    if num_classes == 1000 and net.get("pretrained") and net.get("architecture"):
        from vebi.models.torchvision_models import imagenet_categories

        return imagenet_categories(str(net.architecture))
    return None


def _load_state_dict(net: nn.Module, path: Path) -> None:
    """Weights for ``net`` from a state_dict file (``weights_only=True``: no code runs); a
    torchvision state_dict also fits the ``net`` inside a vebi TorchvisionClassifier."""
    if not path.is_file():
        raise VebiError(f"model_source.state_dict={path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused, truncated file, not a torch file
        raise CheckpointError(f"cannot read the state_dict {path}: {error}") from error
    if isinstance(state, Mapping) and "state_dict" in state:  # a Lightning checkpoint
        state = {k.removeprefix("net."): v for k, v in state["state_dict"].items()}
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state_dict")
    inner = getattr(net, "net", None)
    targets = [net] + ([inner] if isinstance(inner, nn.Module) else [])
    errors = []
    for target in targets:
        try:
            target.load_state_dict(state, strict=True)
            return
        except RuntimeError as error:
            errors.append(str(error).splitlines()[0] + " ...")
    raise CheckpointError(
        f"the state_dict {path} does not fit model.net ({type(net).__name__}): "
        + " / ".join(errors)
        + "; pick the model config it was saved from (model=...)"
    )


def _choice(group: str) -> str | None:
    """The Hydra choice of ``group`` (e.g. the model config's name), None outside Hydra."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def _first_conv_channels(net: nn.Module) -> int | None:
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else int(conv.in_channels)


def check_class_count(module: ClassifierModule, datamodule: Any, source: str) -> None:
    """The data may not have more classes than the network has outputs (a 7th class folder
    next to a 6-class checkpoint used to give a raw ``IndexError: Target 6 is out of
    bounds``, or nothing at all when that class had no test images)."""
    try:
        count = int(datamodule.num_classes)
        names = [str(n) for n in datamodule.class_names]
    except (VebiError, AttributeError, TypeError, ValueError, RuntimeError, OSError):
        return  # not known before the data is read: the data module says so itself
    outputs = int(module.hparams.num_classes)
    if count <= outputs:
        return
    extra = ", ".join(names[outputs:][:5]) or "?"
    raise VebiError(
        f"the data has {count} classes but {source} has {outputs} outputs (classes "
        f"beyond them: {extra}): use the data the network was trained on, remove the extra "
        "class folders, or train a network on these classes"
    )


def check_model_takes_data(net: nn.Module, datamodule: Any, source: str) -> None:
    """One forward pass of a blank image shaped like the data's (C, H, W), before any work:
    a network that cannot take them (3-channel ResNet, 1-channel MNIST digits) is one clear
    error naming both shapes and the fix, instead of a traceback from inside the network."""
    try:
        shape = tuple(int(v) for v in datamodule.image_shape)
    except (VebiError, AttributeError, TypeError):  # not known before the data is read
        return
    parameter = next(net.parameters(), None)
    probe = torch.zeros(1, *shape, device=parameter.device if parameter is not None else None)
    try:
        with torch.no_grad(), eval_mode(net):
            net(probe)
    except Exception as error:  # whatever the network raises on the wrong input
        wanted = _first_conv_channels(net)
        expects = f"; its first convolution takes {wanted}-channel images" if wanted else ""
        data = _choice("data") or type(datamodule).__name__
        raise VebiError(
            f"{source} cannot take the images of data={data}, shaped {shape} (C, H, W){expects} "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}): choose data whose "
            "images fit the network (e.g. experiment=an8flower_double for 3-channel images) or "
            "a network for these images (model=...)"
        ) from None


def rule_probe(net: nn.Module, datamodule: Any) -> torch.Tensor | None:
    """Two seeded random images shaped like the data's, on the network's device, for the
    forward pass of :func:`vebi.explain.rules.check_rule_coverage` (None when the shape is
    not known before the data is read)."""
    try:
        shape = tuple(int(v) for v in datamodule.image_shape)
    except (VebiError, AttributeError, TypeError):
        return None
    parameter = next(net.parameters(), None)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, *shape, generator=generator)
    return images.to(parameter.device) if parameter is not None else images


def load_model(cfg: DictConfig, datamodule: Any = None) -> LoadedModel:
    """The network of a mine/explain/evaluate job (``cfg.model_source``):

    * ``from: checkpoint``: the vebi checkpoint ``ckpt_path``, or the newest of the experiment;
    * ``from: config``: ``cfg.model.net`` built as it is: torchvision's pretrained weights
      (``model.net.pretrained=true``), a ``state_dict`` file, whatever a custom ``_target_``
      loads, or random weights when ``allow_random_init`` (refused otherwise). Class names
      come from the data (or torchvision's ImageNet names for a 1000-class network).
    """
    source = cfg.get("model_source") or {"from": "checkpoint"}
    kind = source.get("from", "checkpoint")
    if kind == "checkpoint":
        ckpt_path = resolve_checkpoint(cfg)
        module = load_classifier(ckpt_path)
        if datamodule is not None:
            _check_input_shape(module, datamodule, ckpt_path)
            check_class_count(module, datamodule, str(ckpt_path))
            check_model_takes_data(module.net, datamodule, str(ckpt_path))
        return LoadedModel(module, ckpt_path, str(ckpt_path))
    if kind != "config":
        raise VebiError(f"model_source.from must be 'checkpoint' or 'config', got {kind!r}")
    # a DictConfig (model.net) becomes a dict with str keys
    net_cfg = cast(dict[str, Any], OmegaConf.to_container(cfg.model.net, resolve=True))
    state_dict = source.get("state_dict")
    pretrained = bool(net_cfg.get("pretrained"))
    custom = "pretrained" not in net_cfg and not net_cfg["_target_"].startswith("vebi.")
    if not (pretrained or state_dict or custom or source.get("allow_random_init")):
        raise VebiError(
            f"model_source=config builds {net_cfg['_target_']} with random weights: load "
            "weights with model.net.pretrained=true (torchvision ImageNet weights) or "
            "model_source.state_dict=<file>, or set model_source.allow_random_init=true to "
            "interpret random weights (tests, timing)"
        )
    if pretrained and source.get("allow_random_init"):
        net_cfg["allow_random_init"] = True  # no network: go on with random weights, warned
    try:
        net = hydra_instantiate(OmegaConf.create(net_cfg))
    except Exception as error:  # hydra wraps what the constructor raised
        cause = error.__cause__ or error
        if isinstance(cause, VebiError):
            raise cause from None
        raise VebiError(f"cannot build model.net ({net_cfg['_target_']}): {cause}") from error
    if not isinstance(net, nn.Module):
        raise VebiError(f"model.net ({net_cfg['_target_']}) built a {type(net).__name__}")
    if state_dict:
        _load_state_dict(net, Path(state_dict))
    if datamodule is not None:
        check_model_takes_data(net, datamodule, f"model={_choice('model') or net_cfg['_target_']}")
    num_classes = int(cfg.model.num_classes)
    module = ClassifierModule(
        net=net,
        num_classes=num_classes,
        class_names=_config_class_names(cfg, datamodule, num_classes),
        architecture=net_cfg,
    ).eval()
    weights = (
        f"weights from {state_dict}"
        if state_dict
        else "pretrained weights"
        if pretrained
        else "weights as its constructor sets them"
        if custom
        else "random weights"
    )
    description = f"model config {net_cfg['_target_']}"
    if net_cfg.get("architecture"):
        description += f" ({net_cfg['architecture']})"
    log.info("Using the network of the %s with %s (no checkpoint)", description, weights)
    return LoadedModel(module, None, f"{description}, {weights}")


def mined_features_path(ckpt_path: Path) -> Path:
    """Where the training run of ``ckpt_path`` saved its relevant features."""
    return ckpt_path.parent.parent / "mining" / ARTEFACT_NAME


def relevant_features_for(model: LoadedModel, explicit: str | None) -> Path:
    """The RelevantFeatures file: ``explicit``, else the one mined in the checkpoint's run."""
    path = Path(explicit) if explicit else model.saved_features()
    if path is None:
        raise VebiError(
            "a network built from its config has no training run that mined its features: "
            "mine them with `python mine.py model_source=config ...` (the same overrides) and "
            "pass relevant_features=<its relevant_features.h5>"
        )
    if not path.is_file():
        raise VebiError(
            f"no relevant features at {path}: mine them first with "
            f"`python mine.py ckpt_path={model.ckpt_path}` and pass relevant_features=<its output>"
        )
    return path


#: How to go on when the model has layers that the galleries' backward rules do not cover.
NO_GALLERIES = "; or go on without the interpretation galleries: interpretation.galleries=false"


def make_galleries(
    cfg: DictConfig,
    net: nn.Module,
    report: MiningReport,
    dataset: Dataset,
    folder: Path,
    loggers: list[Logger],
    datamodule: Any = None,
    rules: Rules | None = None,
) -> list[Path]:
    """The interpretation galleries of a mining run when ``interpretation.galleries`` is on
    (and the activation cache that ranks the images was kept, or ``mining.cache=off``
    recomputes its rows); their paths. With part masks
    of the training images (``datamodule.part_labels("train")``, an8Flower) each tile is
    labelled with the part its feature detects (``interpretation.part_labels``). ``rules``:
    the run's backward rules (None: those of ``cfg.rules``)."""
    settings = cfg.get("interpretation") or {}
    if not settings.get("galleries", True) or report.rows is None:
        return []
    labels = None
    if settings.get("part_labels", True):
        labels = gallery_part_labels(net, report.relevant, dataset, datamodule)
    paths = interpret_and_log(
        net,
        report.relevant,
        dataset,
        report.rows,
        folder,
        loggers,
        int(settings.get("top_n", 20)),
        int(settings.get("thumbnails", 8)),
        labels,
        rules if rules is not None else Rules.from_config(cfg.get("rules")),
    )
    log.info("Interpretation galleries: %s", folder)
    return paths


def gallery_part_labels(
    net: nn.Module, relevant: RelevantFeatures, dataset: Dataset, datamodule: Any
) -> dict[tuple[int, str, int], tuple[str | None, float | None]] | None:
    """(class, layer, channel) -> (part, IoU) of every relevant feature, dissected on the
    training images ``dataset`` (docs/method.md, section 5), or None without part masks."""
    masks = part_masks(datamodule, "train")
    if masks is None:
        return None
    parts = masks.labels
    if len(parts) != dataset_size(dataset):
        log.warning(
            "part masks of %d images for %d mining images: galleries unlabelled",
            len(parts),
            dataset_size(dataset),
        )
        return None
    log.info("Labelling the relevant features with the parts they detect (%d images)", len(parts))
    result = FeatureDissection(draws=0)(
        net,
        relevant,
        EvaluationSet.from_dataset(dataset),
        parts,
        masks.names,
        masks.deciding,
    )
    names = list(relevant.class_names)
    return {
        (names.index(e["class"]), e["layer"], e["channel"]): (e["part"], e["iou"])
        for e in result["features"]
    }
