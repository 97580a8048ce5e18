"""Loading trained classifiers from checkpoints without running code stored in them."""

from __future__ import annotations

import contextlib
import importlib
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from vebi.errors import CheckpointError
from vebi.modules.classifier import CHECKPOINT_KEY, ClassifierModule

#: Module prefixes whose ``nn.Module`` classes a checkpoint's architecture may name.
TRUSTED_ARCHITECTURE_PREFIXES = ("vebi.models", "torchvision.models", "torch.nn")


def _trusted_module_class(target: str) -> type[nn.Module]:
    module_name, _, attribute = target.rpartition(".")
    trusted = any(
        module_name == prefix or module_name.startswith(prefix + ".")
        for prefix in TRUSTED_ARCHITECTURE_PREFIXES
    )
    if not trusted:
        raise CheckpointError(
            f"the checkpoint's architecture names {target!r}, outside the trusted packages "
            f"{TRUSTED_ARCHITECTURE_PREFIXES}; build the network yourself and pass it as net="
        )
    try:
        candidate = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise CheckpointError(f"the checkpoint's architecture names unknown {target!r}") from error
    if not (isinstance(candidate, type) and issubclass(candidate, nn.Module)):
        raise CheckpointError(f"the checkpoint's architecture names {target!r}, not a nn.Module")
    return candidate


#: Hydra's instantiation keys an architecture may hold (``_partial_``, ``_convert_``,
#: ``_recursive_`` change what is built: refused).
ARCHITECTURE_SPECIAL_KEYS = ("_target_", "_args_")


def _check_architecture(node: Any) -> None:
    """Refuse configs that name anything but trusted ``nn.Module`` classes, use Hydra's other
    instantiation keys, or interpolate."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "_target_":
                _trusted_module_class(str(value))
            elif isinstance(key, str) and key.startswith("_") and key.endswith("_"):
                if key not in ARCHITECTURE_SPECIAL_KEYS:
                    raise CheckpointError(
                        f"the checkpoint's architecture holds {key}: {value!r}; only _target_ "
                        "and _args_ build a network from a checkpoint"
                    )
                _check_architecture(value)
            else:
                _check_architecture(value)
    elif isinstance(node, list | tuple):
        for value in node:
            _check_architecture(value)
    elif isinstance(node, str) and "${" in node:
        raise CheckpointError(f"the checkpoint's architecture holds an interpolation {node!r}")


def without_downloads(node: Any) -> Any:
    """A copy of an architecture config with ``pretrained`` false at every level (a network
    wrapped in ``nn.Sequential`` too): a checkpoint's network gets its weights from the file,
    never from a download."""
    if isinstance(node, Mapping):
        return {
            key: False if key == "pretrained" else without_downloads(value)
            for key, value in node.items()
        }
    if isinstance(node, list | tuple):
        return [without_downloads(value) for value in node]
    return node


def build_network(
    architecture: Mapping[str, Any], device: str | torch.device | None = None
) -> nn.Module:
    """Instantiate a network from its (checked) Hydra config (on ``device``; ``"meta"`` builds
    shapes only, allocating nothing)."""
    _check_architecture(architecture)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return instantiate(OmegaConf.create(dict(architecture)))
    except CheckpointError:
        raise
    except Exception as error:  # a bad argument, a failing constructor: the file's fault
        raise CheckpointError(
            f"cannot build the checkpoint's network {architecture.get('_target_')!r}: "
            f"{type(error).__name__}: {error}"
        ) from error


def _check_shapes(net: nn.Module, state_dict: Mapping[str, Any], path: str | Path) -> None:
    """Compare the network's parameter shapes (``net`` may live on the meta device) with the
    checkpoint's tensors before anything real is allocated."""
    expected = {f"net.{name}": tuple(t.shape) for name, t in net.state_dict().items()}
    stored = dict(state_dict)  # the module's own state is its network's (metrics keep none)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = [
        f"{key}: {tuple(stored[key].shape)} in the file, {shape} in the network"
        for key, shape in expected.items()
        if key in stored and tuple(stored[key].shape) != shape
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            part
            for part in (
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {unexpected[:5]}" if unexpected else "",
                "; ".join(wrong[:5]),
            )
            if part
        )
        raise CheckpointError(f"{path} does not fit the network it names: {details}")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: tensors and plain data only, no code."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file (point at a .ckpt)")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path} (train one with `python train.py experiment=mnist`; "
            "train.py prints the path of the best checkpoint at the end)"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain data "
            f"({str(error).splitlines()[0]})"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = str(error).strip() or (
            "the file is empty or truncated" if path.stat().st_size < 64 else type(error).__name__
        )
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    state_dict = checkpoint["state_dict"]
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor)
        for key, value in state_dict.items()
    ):
        raise CheckpointError(f"{path}: its state_dict is not a mapping of names to tensors")
    return checkpoint


def load_classifier(
    path: str | Path,
    net: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
) -> ClassifierModule:
    """Load a trained :class:`ClassifierModule` in eval mode.

    The checkpoint is read with ``weights_only=True`` semantics, so it cannot run code; the
    network is rebuilt from the architecture config stored in it (only ``nn.Module`` classes
    from vebi, torchvision and torch.nn are accepted) unless ``net`` is given.
    """
    checkpoint = read_checkpoint(path, map_location)
    meta = checkpoint.get(CHECKPOINT_KEY) or {}
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"{path}: its {CHECKPOINT_KEY!r} entry is not a mapping")
    hparams = checkpoint.get("hyper_parameters") or {}
    num_classes = meta.get("num_classes", hparams.get("num_classes"))
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise CheckpointError(f"{path} stores no valid num_classes (got {num_classes!r})")
    class_names = meta.get("class_names")
    if class_names is not None and (
        not isinstance(class_names, list | tuple) or len(class_names) != num_classes
    ):
        raise CheckpointError(f"{path}: class_names do not list {num_classes} classes")
    if net is None:
        architecture = meta.get("architecture")
        if not architecture:
            raise CheckpointError(
                f"{path} stores no architecture (it was not saved by vebi's train.py): build the "
                "network yourself and call load_classifier(path, net=...)"
            )
        if not isinstance(architecture, Mapping):
            raise CheckpointError(f"{path}: its architecture is not a config mapping")
        architecture = without_downloads(architecture)  # the weights are the checkpoint's
        # shapes first, on the meta device: a network of absurd size is refused unbuilt
        _check_shapes(build_network(architecture, device="meta"), checkpoint["state_dict"], path)
        net = build_network(architecture)
    module = ClassifierModule(
        net=net,
        num_classes=num_classes,
        class_names=class_names,
        architecture=meta.get("architecture"),
    )
    module.run_settings = _settings(meta, path)
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit the network: {error}") from error
    return module.eval()


#: The run settings a checkpoint may carry (:func:`vebi.pipelines.common.run_settings`).
SETTINGS_KEYS = ("experiment", "data", "data_overrides", "experiment_name", "image_shape")
#: A config or experiment name: letters, digits, ``_``, ``-`` and inner dots, no path.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
#: A key of a ``data.*`` override: ``data.`` then identifiers that do not start with ``_``
#: (no ``_target_``, ``_args_``, ``_partial_``), no Hydra prefixes (``+``, ``~``, ``@``).
DATA_OVERRIDE_KEY = re.compile(r"data(\.[A-Za-z][A-Za-z0-9_]*)+")


#: ``data.*`` keys a checkpoint may not carry: where data lives or comes from, and download
#: switches (the machine's own settings, never the training run's): these names, and any
#: name ending in ``_dir``, ``_path``, ``_file``, ``_root`` or ``_url``.
LOCATION_KEYS = frozenset({"data_dir", "root", "sources", "mirrors", "download", "url", "urls"})
LOCATION_SUFFIXES = ("_dir", "_path", "_file", "_root", "_url", "_urls")


def _names_a_location(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last in LOCATION_KEYS or last.endswith(LOCATION_SUFFIXES)


def _looks_like_a_path(value: Any) -> bool:
    """A string value that names a place: a path separator, ``..``, ``~`` or a URL scheme."""
    if isinstance(value, list):
        return any(_looks_like_a_path(v) for v in value)
    return isinstance(value, str) and (
        any(mark in value for mark in ("/", "\\", "..", "://")) or value.startswith("~")
    )


def _plain_name(value: Any) -> bool:
    return isinstance(value, str) and bool(PLAIN_NAME.fullmatch(value)) and ".." not in value


def _plain_value(value: Any) -> bool:
    """A scalar (no interpolation) or a list of scalars."""
    if isinstance(value, list):
        return all(not isinstance(v, list) and _plain_value(v) for v in value)
    if isinstance(value, str):
        return "${" not in value and "\\" not in value
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, bool | int)


def check_data_override(override: Any) -> tuple[str, Any]:
    """``(key, value)`` of a stored ``data.<key>=<value>`` override; :class:`ValueError` saying
    why for anything else: another key, a Hydra prefix (``+``, ``~``), a ``_target_``-like
    key, a sweep or function (``choice(...)``), an interpolation, a nested value, a key that
    names where data lives or comes from (:data:`LOCATION_KEYS`), a value that is a path or a
    URL. train.py stores only the overrides that pass, so each one it stores is accepted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType, ValueType

    if not isinstance(override, str) or "=" not in override:
        raise ValueError("not a key=value override")
    key = override.split("=", 1)[0]
    if not DATA_OVERRIDE_KEY.fullmatch(key):
        raise ValueError(
            "only data.<key>=<value> overrides are allowed (no +, ~, hydra.*, _target_, ...)"
        )
    try:
        parsed = OverridesParser.create().parse_override(override)
    except Exception as error:  # Hydra's grammar rejects it
        raise ValueError(f"not a valid override ({error})") from None
    if parsed.type != OverrideType.CHANGE or parsed.package is not None:
        raise ValueError("only plain changes of a value are allowed")
    if parsed.value_type != ValueType.ELEMENT:
        raise ValueError("sweeps are not allowed")
    if _names_a_location(key):
        raise ValueError(
            "data locations, sources and download switches are the machine's own settings, "
            "not a checkpoint's"
        )
    value = parsed.value()
    if not _plain_value(value):
        raise ValueError("the value must be a plain scalar or a list of scalars")
    if _looks_like_a_path(value):
        raise ValueError("a stored value may not name a path or a URL")
    return key, value


def check_settings(settings: Any, path: str | Path) -> dict[str, Any] | None:
    """The run settings stored in checkpoint ``path``, checked as data before any job uses
    them: only :data:`SETTINGS_KEYS`; ``experiment``, ``data`` and ``experiment_name`` plain
    names (no path separators, no ``..``) or null; ``data_overrides`` a list of plain
    ``data.<key>=<value>`` overrides (:func:`check_data_override`); ``image_shape`` three
    positive ints or null. A checkpoint is data: anything else is a :class:`CheckpointError`
    naming the file and the entry."""
    if settings is None or (isinstance(settings, Mapping) and not settings):
        return None

    def refuse(entry: str, value: Any, why: str) -> CheckpointError:
        shown = repr(value)
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        return CheckpointError(
            f"{path}: refusing its stored settings: {entry} = {shown} ({why}); a checkpoint "
            "carries data only: pass experiment=... and the settings you want yourself, or "
            "use a checkpoint written by vebi's train.py"
        )

    if not isinstance(settings, Mapping):
        raise refuse("settings", settings, "not a mapping")
    unknown = [str(key) for key in settings if key not in SETTINGS_KEYS]
    if unknown:
        raise refuse(f"settings.{unknown[0]}", settings[unknown[0]], "not a vebi setting")
    for key in ("experiment", "data", "experiment_name"):
        value = settings.get(key)
        if value is not None and not _plain_name(value):
            raise refuse(f"settings.{key}", value, "not a plain name")
    overrides = settings.get("data_overrides") or []
    if not isinstance(overrides, list | tuple):
        raise refuse("settings.data_overrides", overrides, "not a list")
    for position, override in enumerate(overrides):
        try:
            check_data_override(override)
        except ValueError as error:
            raise refuse(f"settings.data_overrides[{position}]", override, str(error)) from None
    shape = settings.get("image_shape")
    if shape is not None and not (
        isinstance(shape, list | tuple)
        and len(shape) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
    ):
        raise refuse("settings.image_shape", shape, "not three positive integers (C, H, W)")
    return {key: settings.get(key) for key in SETTINGS_KEYS} | {"data_overrides": list(overrides)}


def _settings(meta: Mapping[str, Any], path: str | Path) -> dict[str, Any] | None:
    return check_settings(meta.get("settings"), path)


def stored_settings(path: str | Path) -> Any:
    """The run settings entry of checkpoint ``path`` as stored, unchecked (None without one).
    Reads the file memory-mapped (``weights_only=True``): the tensors are not loaded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint (mmap needs one): read it the usual way
        checkpoint = read_checkpoint(path)
    meta = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    return meta.get("settings") if isinstance(meta, Mapping) else None


def checkpoint_settings(path: str | Path) -> dict[str, Any] | None:
    """The run settings a vebi training run stored in ``path`` (see
    :class:`~vebi.modules.classifier.ClassifierModule`), checked by :func:`check_settings`;
    None for checkpoints without them."""
    return check_settings(stored_settings(path), path)


#: Where training runs keep their best checkpoint: single runs, and the jobs of a multirun.
CHECKPOINT_PATTERNS = ("*/checkpoints/best.ckpt", "multirun_*/*/checkpoints/best.ckpt")


def newest_checkpoint(
    search_root: str | Path, patterns: str | tuple[str, ...] = CHECKPOINT_PATTERNS
) -> Path:
    """The most recently written checkpoint matching any of ``patterns`` under ``search_root``
    (by default those of single runs and of multirun jobs)."""
    patterns = (patterns,) if isinstance(patterns, str) else patterns
    root = Path(search_root)
    candidates = sorted(
        {path for pattern in patterns for path in root.glob(pattern)},
        key=lambda p: p.stat().st_mtime,
    )
    if not candidates:
        raise CheckpointError(
            f"no checkpoint matches {' or '.join(str(root / p) for p in patterns)}: train one "
            "first (`python train.py experiment=...`) or pass ckpt_path=..."
        )
    return candidates[-1]
