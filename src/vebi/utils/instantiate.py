"""Helpers that turn Hydra config groups into Lightning objects."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any, cast

import torch
from hydra.utils import instantiate
from lightning import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from vebi.utils.log import get_logger

log = get_logger(__name__)


def _located(target: Any, where: str) -> Any:
    from hydra.utils import get_object

    from vebi.errors import VebiError

    try:
        return get_object(str(target))
    except Exception as error:  # an unknown module or attribute
        raise VebiError(f"{where}: cannot find _target_ {target!r} ({error})") from None


def check_target(config: Mapping[str, Any], kind: type, where: str) -> type:
    """The class a config's ``_target_`` names, checked BEFORE anything is called: it must be
    a class derived from ``kind`` (a function such as ``pathlib.Path.unlink`` is refused
    unrun), and every nested ``_target_`` a class of the vebi package."""
    from vebi.errors import VebiError

    target = config.get("_target_")
    located = _located(target, where)
    if not (isinstance(located, type) and issubclass(located, kind)):
        raise VebiError(
            f"{where}: _target_ {target!r} is not a {kind.__module__}.{kind.__qualname__} "
            "class; nothing was called"
        )

    def nested(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if key == "_target_" and path:
                    inner = _located(value, f"{where}{path}")
                    if not (isinstance(inner, type) and inner.__module__.startswith("vebi.")):
                        raise VebiError(
                            f"{where}{path}: nested _target_ {value!r} is not a vebi class; "
                            "nothing was called"
                        )
                else:
                    nested(value, f"{path}.{key}")
        elif isinstance(node, list | tuple):
            for position, value in enumerate(node):
                nested(value, f"{path}[{position}]")

    nested(config, "")
    return located


def instantiate_checked(config: Mapping[str, Any], kind: type, where: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(config, **kwargs)`` once :func:`check_target` has accepted its
    ``_target_`` as a ``kind`` class (so a wrong target is refused before it runs)."""
    check_target(config, kind, where)
    return _unwrapped(lambda: instantiate(config, **kwargs), where)


def _unwrapped(build: Any, where: str) -> Any:
    """``build()``; the settings error a constructor raised (a :class:`VebiError`, or a
    ``ValueError`` about its arguments) comes out as one :class:`VebiError`, not inside
    Hydra's multi-line ``InstantiationException`` (which the jobs would print as a
    traceback)."""
    from hydra.errors import InstantiationException

    from vebi.errors import VebiError

    try:
        return build()
    except InstantiationException as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, VebiError | ValueError):
            cause = cause.__cause__
        if isinstance(cause, VebiError):
            raise cause from None
        if isinstance(cause, ValueError):
            raise VebiError(f"{where}: {cause}") from None
        raise


def instantiate_group(group: DictConfig | None, kind: type) -> list[Any]:
    """Instantiate every entry of a group like ``callbacks`` or ``logger`` that has a target."""
    objects: list[Any] = []
    if not group:
        return objects
    for name, entry in group.items():
        if isinstance(entry, Mapping) and "_target_" in entry:
            obj = instantiate_checked(entry, kind, str(name))
            log.info("Instantiated %s <%s>", name, entry["_target_"])
            objects.append(obj)
    return objects


def instantiate_trainer(trainer: DictConfig, **kwargs: Any) -> Any:
    """The Lightning Trainer of ``cfg.trainer``; settings this machine cannot run (no GPU,
    more devices than it has) become one clear error instead of a Hydra traceback."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from vebi.errors import VebiError

    try:
        return instantiate(trainer, **kwargs)
    except Exception as error:  # Hydra wraps what the Trainer raised
        cause = error.__cause__ or error
        if not isinstance(cause, MisconfigurationException):
            raise
        gpus = torch.cuda.device_count()
        raise VebiError(
            f"the trainer settings cannot run here (trainer.accelerator="
            f"{trainer.get('accelerator')}, trainer.devices={trainer.get('devices')}): {cause}; "
            f"this machine has {gpus} CUDA GPU(s) and {os.cpu_count()} CPU(s): pick "
            "trainer.devices within that, or trainer.accelerator=cpu"
        ) from None


def instantiate_callbacks(group: DictConfig | None) -> list[Callback]:
    return instantiate_group(group, Callback)


def sweep_job_number() -> int | None:
    """The job's number inside a Hydra multirun (sweep), None outside one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    config = HydraConfig.get()
    if config.mode != RunMode.MULTIRUN:
        return None
    return cast(DictConfig, config.job).get("num")  # a DictConfig, typed as hydra's JobConf


def instantiate_loggers(group: DictConfig | None) -> list[Logger]:
    """The loggers of ``group``; inside a sweep every W&B run's name ends with the job's
    number (``mnist-evaluate-3``), so the runs of one sweep can be told apart."""
    number = sweep_job_number()
    if group and number is not None:
        group = cast(DictConfig, OmegaConf.create(OmegaConf.to_container(group, resolve=True)))
        for entry in group.values():
            if isinstance(entry, MutableMapping) and str(entry.get("_target_", "")).endswith(
                "WandbLogger"
            ):
                entry["name"] = f"{entry.get('name') or 'run'}-{number}"
    return instantiate_group(group, Logger)


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as a flat ``{"a/b/c": value}`` dict, for experiment trackers."""
    container = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, Any] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(value, f"{prefix}/{key}" if prefix else str(key))
        else:
            flat[prefix] = node if isinstance(node, int | float | str | bool | None) else str(node)

    visit(container, "")
    return flat


def device_for(trainer: DictConfig) -> torch.device:
    """The device a job outside ``Trainer.fit`` uses: CUDA when the trainer config asks for a
    GPU (or ``auto`` and one is present), else the CPU."""
    accelerator = trainer.get("accelerator")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
