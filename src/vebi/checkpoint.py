"""Loading trained classifiers from checkpoints without running code stored in them."""

from __future__ import annotations

import contextlib
import importlib
import pickle
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


def _check_architecture(node: Any) -> None:
    """Refuse configs that name anything but trusted ``nn.Module`` classes or interpolate."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "_target_":
                _trusted_module_class(str(value))
            else:
                _check_architecture(value)
    elif isinstance(node, list | tuple):
        for value in node:
            _check_architecture(value)
    elif isinstance(node, str) and "${" in node:
        raise CheckpointError(f"the checkpoint's architecture holds an interpolation {node!r}")


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


def _check_shapes(net: nn.Module, state_dict: Mapping[str, Any], path: Path) -> None:
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
        if architecture.get("pretrained"):  # the weights come from the checkpoint: no download
            architecture = {**architecture, "pretrained": False}
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


def _settings(meta: Mapping[str, Any], path: Path) -> dict[str, Any] | None:
    settings = meta.get("settings")
    if settings is not None and not isinstance(settings, Mapping):
        raise CheckpointError(f"{path}: its settings entry is not a mapping")
    return dict(settings) if settings else None


def checkpoint_settings(path: str | Path) -> dict[str, Any] | None:
    """The run settings a vebi training run stored in ``path`` (see
    :class:`~vebi.modules.classifier.ClassifierModule`), None for checkpoints without them.
    Reads the file memory-mapped (``weights_only=True``): the tensors are not loaded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint (mmap needs one): read it the usual way
        checkpoint = read_checkpoint(path)
    meta = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    return _settings(meta, path) if isinstance(meta, Mapping) else None


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
