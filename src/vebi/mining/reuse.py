"""Reusing mined features: load the ones a training run saved, or mine them again.

Evaluation (and any job that starts from a checkpoint) needs the relevant features of that
checkpoint. The policy: an explicitly given file is used as it is; otherwise the file saved by
the checkpoint's training run is used when it was mined with the same mu (or when mu is being
selected among candidates); otherwise the features are mined now and saved in the job's dir.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from torch import nn

from vebi.errors import VebiError
from vebi.mining.callback import mining_datasets
from vebi.mining.miner import FeatureMiner, model_fingerprint
from vebi.mining.relevant import RelevantFeatures
from vebi.mining.reporting import ARTEFACT_NAME, save_and_log
from vebi.utils.distributed import is_main_process
from vebi.utils.log import get_logger

log = get_logger(__name__)


def check_classes(
    relevant: RelevantFeatures,
    num_classes: int,
    class_names: Sequence[str] | None,
    source: Path,
) -> None:
    """Refuse features mined for another number of classes or other class names."""
    if relevant.num_classes != num_classes:
        raise VebiError(
            f"the relevant features in {source} were mined for {relevant.num_classes} classes "
            f"but the checkpoint predicts {num_classes}: pass the matching "
            "relevant_features=... or delete the file to mine again"
        )
    if class_names and list(map(str, class_names)) != list(relevant.class_names):
        raise VebiError(
            f"the classes of {source} ({relevant.class_names}) differ from the checkpoint's "
            f"({list(class_names)}): pass the matching relevant_features=..."
        )


def load_or_mine(
    miner: FeatureMiner,
    model: nn.Module,
    class_names: Sequence[str],
    datamodule: Any,
    saved: Path | None,
    explicit: bool,
    output_dir: Path,
    loggers: Sequence[Logger] = (),
    named_classes: Sequence[str] | None = None,
) -> tuple[RelevantFeatures, Path, str]:
    """The relevant features of ``model`` by the policy of the module docstring.

    ``saved`` is the explicit file (``explicit=True``) or the training run's (None: a network
    without training run, mined now); ``named_classes``
    are the class names the checkpoint itself stores (None when it named none). Returns
    (features, their file, ``"loaded"`` or ``"mined"``).
    """
    if explicit and (saved is None or not saved.is_file()):
        raise VebiError(f"relevant_features={saved}: no such file")
    num_classes = len(class_names)
    if saved is not None and saved.is_file():
        relevant = RelevantFeatures.load(saved)
        same_mu = miner.mu_candidates is not None or math.isclose(
            relevant.mu, miner.mu, rel_tol=1e-9
        )
        layers = None if explicit or not same_mu else _layers_of(miner, model, datamodule)
        if explicit or (same_mu and layers == list(relevant.layers)):
            check_classes(relevant, num_classes, named_classes, saved)
            if relevant.fingerprint.get("model") not in (None, model_fingerprint(model)):
                log.warning("%s was mined from other weights than the model's", saved)
            return relevant, saved, "loaded"
        if not same_mu:
            log.info(
                "%s was mined with mu = %g; mining again with mu = %g",
                saved,
                relevant.mu,
                miner.mu,
            )
        else:
            log.info(
                "%s was mined on %d layers (%s); this run's mining settings (mining.layers, "
                "mining.views, mining.feature_blocks) read %d (%s): mining again",
                saved,
                len(relevant.layers),
                _short(relevant.layers),
                len(layers or ()),
                _short(layers or ()),
            )
    else:
        where = saved or "hand (a network without training run)"
        log.info("No relevant features at %s: mining them now", where)
    datamodule.setup("fit")
    dataset, val_dataset = mining_datasets(datamodule)
    report = miner.mine(model, dataset, val_dataset, list(class_names))
    miner.release(report)
    # under torch.distributed every process mined the same W; one saves it
    path = output_dir / ARTEFACT_NAME
    if is_main_process():
        path = save_and_log(report, output_dir, list(loggers))
    check_classes(report.relevant, num_classes, named_classes, path)
    return report.relevant, path, "mined"


def _layers_of(miner: FeatureMiner, model: nn.Module, datamodule: Any) -> list[str]:
    """The layers ``miner`` would read on ``model`` (traced on the first training image)."""
    datamodule.setup("fit")
    dataset, _ = mining_datasets(datamodule)
    return miner.feature_layers(model, dataset)


def _short(layers: Sequence[str], most: int = 6) -> str:
    """The first ``most`` layer names, and how many more."""
    shown = ", ".join(layers[:most])
    return shown + (f", +{len(layers) - most} more" if len(layers) > most else "")
