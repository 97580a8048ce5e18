"""Loading trained classifiers from checkpoints without running code stored in them."""

from __future__ import annotations

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
    if not module_name.startswith(TRUSTED_ARCHITECTURE_PREFIXES):
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


def build_network(architecture: Mapping[str, Any]) -> nn.Module:
    """Instantiate a network from its (checked) Hydra config."""
    _check_architecture(architecture)
    return instantiate(OmegaConf.create(dict(architecture)))


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: tensors and plain data only, no code."""
    path = Path(path)
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
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
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
    if net is None:
        if not meta.get("architecture"):
            raise CheckpointError(
                f"{path} stores no architecture (it was not saved by vebi's train.py): build the "
                "network yourself and call load_classifier(path, net=...)"
            )
        net = build_network(meta["architecture"])
    hparams = checkpoint.get("hyper_parameters", {})
    num_classes = meta.get("num_classes", hparams.get("num_classes"))
    module = ClassifierModule(
        net=net,
        num_classes=int(num_classes),
        class_names=meta.get("class_names"),
        architecture=meta.get("architecture"),
    )
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit the network: {error}") from error
    return module.eval()


def newest_checkpoint(search_root: str | Path, pattern: str = "*/checkpoints/best.ckpt") -> Path:
    """The most recently written checkpoint matching ``pattern`` under ``search_root``."""
    candidates = sorted(Path(search_root).glob(pattern), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(
            f"no checkpoint matches {Path(search_root) / pattern}: train one first "
            "(`python train.py experiment=...`) or pass ckpt_path=..."
        )
    return candidates[-1]
