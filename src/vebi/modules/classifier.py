"""A LightningModule that trains and evaluates any image classifier ``nn.Module``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from hydra.utils import instantiate
from lightning import LightningModule
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

if TYPE_CHECKING:
    from lightning.fabric.utilities.data import AttributeDict

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]

#: Key under which the checkpoint stores what is needed to rebuild the network without code.
CHECKPOINT_KEY = "vebi"


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A (resolved) plain-dict copy of a config mapping, as checkpoints store it."""
    if isinstance(config, DictConfig):
        return cast(dict[str, Any], OmegaConf.to_container(config, resolve=True))
    return cast(
        dict[str, Any], OmegaConf.to_container(OmegaConf.create(dict(config)), resolve=True)
    )


def _factory(spec: Callable[..., Any] | Mapping[str, Any] | None) -> Callable[..., Any] | None:
    """A factory as it is, or one made from its Hydra config (``_partial_`` implied)."""
    if isinstance(spec, Mapping):
        return instantiate(spec, _partial_=True)
    return spec


class ClassifierModule(LightningModule):
    """Cross-entropy training of ``net`` with torchmetrics accuracy on train/val/test.

    ``net`` maps images in [0, 1], shaped (N, C, H, W), to logits (N, num_classes). It is
    either a network or its Hydra config (a mapping with ``_target_``), which the module builds
    and keeps as ``architecture``. Optimiser and scheduler are factories called with the
    parameters / the optimiser, or their Hydra configs (made partial here), so configs choose
    them.

    Logged: ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``val/acc_best``,
    ``test/loss``, ``test/acc``.

    ``architecture`` (a plain dict, the Hydra config of ``net``) is stored in checkpoints so
    :func:`vebi.load_classifier` can rebuild the network from data alone. Given a network
    instead of its config, pass ``architecture`` too, or load its checkpoints with
    ``load_classifier(path, net=...)``.

    ``run_settings`` (a plain dict set by train.py: the Hydra choices of experiment, data and
    model, the data overrides, the experiment name and the input shape) travels in checkpoints
    too, so jobs on a checkpoint pick up the settings it was trained with.
    """

    def __init__(
        self,
        net: nn.Module | Mapping[str, Any],
        num_classes: int,
        optimizer: OptimizerFactory | Mapping[str, Any] | None = None,
        scheduler: SchedulerFactory | Mapping[str, Any] | None = None,
        scheduler_interval: str = "epoch",
        class_names: Sequence[str] | None = None,
        architecture: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        class_names = [str(name) for name in class_names] if class_names else None
        self.save_hyperparameters(
            ignore=["net", "optimizer", "scheduler", "architecture"], logger=False
        )
        if isinstance(net, Mapping):
            architecture = _plain(net)
            net = instantiate(architecture)
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module or its config, got {type(net)}")
        self.net = net
        self.optimizer_factory = _factory(optimizer)
        self.scheduler_factory = _factory(scheduler)
        self.architecture = _plain(architecture) if architecture is not None else None
        self.class_names = (
            list(class_names) if class_names else [str(i) for i in range(num_classes)]
        )
        self.criterion = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.run_settings: dict[str, Any] | None = None

    if TYPE_CHECKING:  # Lightning annotates hparams ``AttributeDict | MutableMapping``; it is
        # the AttributeDict that ``save_hyperparameters`` fills (attribute access)

        @property
        def hparams(self) -> AttributeDict: ...

    def setup(self, stage: str) -> None:
        """Take the data module's class names when the config gave none."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        names = getattr(datamodule, "class_names", None)
        if self.hparams.class_names is None and names and len(names) == self.hparams.num_classes:
            self.class_names = [str(name) for name in names]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def _step(
        self, batch: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels = batch[0], batch[1]
        logits = self(images)
        return self.criterion(logits, labels), logits.argmax(dim=1), labels

    def on_train_start(self) -> None:
        self.val_acc_best.reset()

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, preds, labels = self._step(batch)
        self.train_loss(loss)
        self.train_acc(preds, labels)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        loss, preds, labels = self._step(batch)
        self.val_loss(loss, weight=len(labels))  # the mean over images, however batched
        self.val_acc(preds, labels)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        loss, preds, labels = self._step(batch)
        self.test_loss(loss, weight=len(labels))
        self.test_acc(preds, labels)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("ClassifierModule needs an optimizer factory to train")
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.hparams.scheduler_interval,
                "monitor": "val/loss",
            },
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "architecture": self.architecture,
            "num_classes": self.hparams.num_classes,
            "class_names": self.class_names,
            "settings": self.run_settings,
        }
