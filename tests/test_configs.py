"""Every Hydra config composes and its objects instantiate."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from lightning import LightningModule, Trainer

from tests.conftest import CONFIG_DIR
from vebi.data import check_data_contract

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
GROUP_OPTIONS = [
    (group, p.stem)
    for group in ("logger", "trainer", "callbacks", "data", "model")
    for p in sorted((CONFIG_DIR / group).glob("*.yaml"))
]


def test_there_are_experiments() -> None:
    assert "mnist" in EXPERIMENTS


@pytest.mark.parametrize("config_name", ["train", "evaluate"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(
    compose_cfg, config_name: str, experiment: str
) -> None:
    # pretrained weights would be downloaded: tests never do (the download path has its own
    # test with the network cut off)
    offline = ["model.net.pretrained=false"] if experiment == "imagenet" else []
    cfg = compose_cfg(config_name, [f"experiment={experiment}", *offline])
    assert cfg.experiment_name == experiment
    datamodule = instantiate(cfg.data)  # nothing read from disk yet
    assert check_data_contract(datamodule) is datamodule
    assert (datamodule.batch_size, datamodule.num_workers) == (
        cfg.data.batch_size,
        cfg.data.num_workers,
    )
    model = instantiate(cfg.model)
    assert isinstance(model, LightningModule)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(trainer, Trainer)
    assert Path(cfg.paths.output_dir).is_dir()


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_group_option_composes(compose_cfg, group: str, option: str) -> None:
    cfg = compose_cfg("train", ["experiment=mnist", f"{group}={option}"])
    assert cfg.hydra.runtime.choices[group] == option


def test_wandb_logger_is_offline_by_default(compose_cfg) -> None:
    cfg = compose_cfg("train", ["experiment=mnist"])
    assert cfg.logger.wandb.offline is True
    assert cfg.logger.wandb.save_dir == cfg.paths.output_dir
    online = compose_cfg("train", ["experiment=mnist", "logger.wandb.offline=false"])
    assert online.logger.wandb.offline is False


def test_experiment_sets_values(compose_cfg) -> None:
    cfg = compose_cfg("train", ["experiment=mnist"])
    assert cfg.model.net._target_ == "vebi.models.LeNet"
    assert cfg.model.scheduler.T_max == cfg.trainer.max_epochs
    assert cfg.callbacks.model_checkpoint.monitor == "val/acc"


def test_evaluation_group_composes(compose_cfg) -> None:
    from vebi.evaluation import AblationRelevance

    cfg = compose_cfg("evaluate", ["experiment=an8flower_double", "seed=7", "k=5"])
    ablation = instantiate(cfg.evaluation.ablation)
    assert isinstance(ablation, AblationRelevance)
    assert ablation.draws >= 5 and ablation.seed == 7
    assert cfg.evaluation.methods.vebi.k == 5 and cfg.mining.mu == 5.0
    # blurring keeps an8Flower's deciding colours: insertion starts from black there
    assert cfg.evaluation.insertion_baseline == "zero"
    assert compose_cfg("evaluate", ["experiment=mnist"]).evaluation.insertion_baseline == "blur"
    assert set(cfg.evaluation.evaluators) == {
        "sparse",
        "ablation",
        "localisation",
        "faithfulness",
        "artefacts",
        "dissection",
    }
    dissection = instantiate(cfg.evaluation.dissection)
    assert (dissection.quantile, dissection.iou_floor, dissection.seed) == (0.995, 0.04, 7)
    sanity = instantiate(cfg.evaluation.sanity)
    assert sanity.granularity == "layer" and sanity.data_randomised_checkpoint is None


def test_an8flower_single_differs_from_double_only_where_it_should(compose_cfg) -> None:
    from omegaconf import OmegaConf

    double = compose_cfg("train", ["experiment=an8flower_double"])
    single = compose_cfg("train", ["experiment=an8flower_single"])
    assert (single.data.variant, single.data.name, single.model.num_classes) == (
        "single",
        "an8flower_single",
        6,
    )
    assert (double.data.variant, double.model.num_classes) == ("double", 12)
    plain = OmegaConf.to_container(single, resolve=False)
    other = OmegaConf.to_container(double, resolve=False)
    differing = {key for key in plain if key != "hydra" and plain[key] != other[key]}
    assert differing == {"data", "model", "experiment_name", "tags"}
    assert single.mining.mu == double.mining.mu == 5.0
    assert single.evaluation.insertion_baseline == "zero"


#: model configs that are models (base and torchvision are shared parts of the others)
MODELS = [
    p.stem
    for p in sorted((CONFIG_DIR / "model").glob("*.yaml"))
    if p.stem not in ("base", "torchvision")
]


@pytest.mark.parametrize("option", MODELS)
def test_every_model_config_builds_a_module_that_stores_its_network(
    compose_cfg, option: str
) -> None:
    named = ["model.net.name=resnet18"] if option == "timm" else []
    cfg = compose_cfg(
        "train", ["experiment=mnist", f"model={option}", "model.num_classes=3", *named]
    )
    module = instantiate(cfg.model)
    assert module.architecture["_target_"] == cfg.model.net._target_
    assert module.architecture["num_classes"] == 3
    assert module.scheduler_factory is not None and module.optimizer_factory is not None


def test_every_experiment_mines_after_training(compose_cfg) -> None:
    for experiment in EXPERIMENTS:
        cfg = compose_cfg("train", [f"experiment={experiment}"])
        assert cfg.callbacks.feature_mining.miner == cfg.mining


def test_ddp_is_one_override_away(compose_cfg) -> None:
    cfg = compose_cfg("train", ["experiment=mnist", "trainer.devices=2", "trainer.strategy=ddp"])
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.num_nodes) == ("ddp", 2, 1)
    preset = compose_cfg("train", ["experiment=mnist", "trainer=ddp"])
    assert preset.trainer.strategy == "ddp" and preset.trainer.sync_batchnorm is True
    trainer = instantiate(
        preset.trainer, accelerator="cpu", devices=2, logger=False, enable_checkpointing=False
    )
    assert trainer.num_devices == 2 and type(trainer.strategy).__name__ == "DDPStrategy"


def test_wandb_runs_of_a_sweep_have_their_own_names(compose_cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from vebi.utils.instantiate import instantiate_loggers

    cfg = compose_cfg("evaluate", ["experiment=mnist"])
    (single,) = instantiate_loggers(cfg.logger)
    assert single.name == "vebi" and single._wandb_init["name"] == "mnist-evaluate"
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.job.num = 3
    HydraConfig.instance().set_config(cfg)
    (swept,) = instantiate_loggers(cfg.logger)
    assert swept._wandb_init["name"] == "mnist-evaluate-3"
