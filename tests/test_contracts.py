"""Contract tests over every extension point (Captum ``captum/testing`` style: generated, not
hand-written per case): every configured heatmap method, every configured metric and every
registered rule preset, each on a small VGG-style and a small ResNet-style network whose
relevant features come from a real (small) mining run.

* heatmap methods (``evaluation.methods``, built by ``build_methods``): the model comes back
  exactly as it was (state_dict tensors, parameter objects and their ``requires_grad`` and
  ``.grad``, the module tree, every module's forward/backward hooks and ``training`` flag),
  whether it was in eval mode, train mode or mixed (some modules frozen in eval); the maps are
  finite, (N, H, W) and in [0, 1] (vebi.evaluation.methods);
* rule presets (``vebi.explain.rules.PRESETS``): ``backprop_feature`` gives finite signals
  shaped like the images at every mined layer and restores the model exactly;
* metrics (``evaluation.metrics``, built by ``build_metrics``): a direction and a known group,
  states that DDP can all-reduce (``sum`` or ``cat``), and two copies updated on the halves of
  a batch, their states merged as the all-reduce merges them, compute what one copy computes
  on the whole batch, for the maps of every method.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import TensorDataset
from torchmetrics.utilities.data import dim_zero_cat, dim_zero_sum

from tests.explain_models import TinyResNet, randomised
from tests.planted_data import CLASSES, planted_images
from vebi import mine_features
from vebi.evaluation.data import ClassImages
from vebi.evaluation.faithfulness import EndpointCache
from vebi.evaluation.metric_base import GROUPS, HeatmapMetric
from vebi.explain.backprop import backprop_feature
from vebi.explain.rules import PRESETS, Rules
from vebi.mining.relevant import RelevantFeatures
from vebi.models import SmallVGG
from vebi.pipelines.evaluate import build_methods, build_metrics

NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "vgg": lambda: randomised(
        SmallVGG(num_classes=CLASSES, in_channels=3, widths=(8, 12, 16)), seed=1
    ),
    "resnet": lambda: randomised(TinyResNet(num_classes=CLASSES), seed=2),
}
#: how the model is left before a method runs: eval, train, or train with some modules frozen
#: in eval (e.g. BatchNorm kept in eval while fine-tuning)
MODES = ("eval", "train", "mixed")
IMAGES = 6  # explained / scored (3 x 32 x 32, the planted squares of tests/planted_data.py)
MINING_IMAGES = 36


def _evaluate_config() -> Any:
    """The evaluate config as the ``compose_cfg`` fixture composes it (read at collection,
    for the parameter names only)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("evaluate")
    GlobalHydra.instance().clear()
    return cfg


_CFG = _evaluate_config()
METHODS = list(_CFG.evaluation.methods)
METRICS = list(_CFG.evaluation.metrics)
PRESET_NAMES = list(PRESETS)


def _method_cases() -> list[Any]:
    cases = []
    for method in METHODS:
        for net in NETWORKS:
            for mode in MODES:
                cases.append(pytest.param(method, net, mode))
    return cases


def _preset_cases() -> list[Any]:
    return [
        pytest.param(preset, net, mode)
        for preset in PRESET_NAMES
        for net in NETWORKS
        for mode in MODES
    ]


class _Setup:
    """A network with the relevant features mined on planted images, and the images scored."""

    def __init__(self, name: str) -> None:
        self.model = NETWORKS[name]()
        images, labels, _ = planted_images(MINING_IMAGES, seed=11)
        self.relevant: RelevantFeatures = mine_features(
            self.model, TensorDataset(images, labels), mu=10.0, progress=False
        )
        self.images, labels, masks = planted_images(IMAGES, seed=12)
        self.classes = labels
        masks = masks.bool()
        masks[1] = False  # one image without an object: localisation leaves it out, counted
        self.masks = masks
        self.maps: dict[str, torch.Tensor] = {}


@pytest.fixture(scope="module")
def setups() -> dict[str, _Setup]:
    return {}


@pytest.fixture(scope="module")
def _composed() -> dict[str, Any]:
    return {}


@pytest.fixture
def evaluate_cfg(compose_cfg, _composed: dict[str, Any]) -> DictConfig:
    """The evaluate config from the ``compose_cfg`` fixture, composed once per module (0.3 s
    a time) and copied for each test."""
    if "cfg" not in _composed:
        _composed["cfg"] = compose_cfg("evaluate")
    return copy.deepcopy(_composed["cfg"])


def _setup(setups: dict[str, _Setup], net: str) -> _Setup:
    if net not in setups:
        setups[net] = _Setup(net)
    return setups[net]


def _set_mode(model: nn.Module, mode: str) -> None:
    model.train(mode != "eval")
    if mode == "mixed":
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | nn.Dropout):
                module.eval()


def _snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a method must leave as it found it."""
    global_hooks = nn.modules.module
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "parameters": [
            (name, id(p), p.requires_grad, None if p.grad is None else p.grad.clone())
            for name, p in model.named_parameters()
        ],
        "buffers": [(name, id(b)) for name, b in model.named_buffers()],
        "modules": [
            (
                name,
                type(m),
                id(m),
                m.training,
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(m._backward_pre_hooks),
                "forward" in m.__dict__,  # no forward patched on the instance left behind
            )
            for name, m in model.named_modules()
        ],
        # torch-function modes (the functional rules install one) left on the stack
        "function_modes": torch._C._len_torch_function_stack(),
        "global_hooks": [
            len(getattr(global_hooks, name))
            for name in (
                "_global_forward_hooks",
                "_global_forward_pre_hooks",
                "_global_backward_hooks",
                "_global_backward_pre_hooks",
            )
        ],
    }


def _assert_restored(before: dict[str, Any], after: dict[str, Any], what: str) -> None:
    assert before["state"].keys() == after["state"].keys(), f"{what}: state_dict keys changed"
    changed = [k for k in before["state"] if not torch.equal(before["state"][k], after["state"][k])]
    assert not changed, f"{what}: state_dict tensors changed: {changed}"
    for old, new in zip(before["parameters"], after["parameters"], strict=True):
        assert old[:3] == new[:3], f"{what}: parameter {old[0]} replaced or requires_grad changed"
        assert (old[3] is None) == (new[3] is None), f"{what}: .grad of {old[0]} changed"
        assert old[3] is None or torch.equal(old[3], new[3]), f"{what}: .grad of {old[0]} changed"
    assert len(before["parameters"]) == len(after["parameters"])
    assert before["buffers"] == after["buffers"], f"{what}: buffers replaced"
    changed_modules = [
        (old, new)
        for old, new in zip(before["modules"], after["modules"], strict=False)
        if old != new
    ]
    assert len(before["modules"]) == len(after["modules"]), f"{what}: module tree changed"
    assert not changed_modules, (
        f"{what}: modules changed (name, type, id, training, forward hooks, forward pre-hooks, "
        f"backward hooks, backward pre-hooks, patched forward): {changed_modules}"
    )
    assert before["global_hooks"] == after["global_hooks"], f"{what}: global hooks left behind"
    assert before["function_modes"] == after["function_modes"], f"{what}: torch-function mode left"


def _assert_unit_maps(maps: torch.Tensor, images: torch.Tensor, what: str) -> None:
    assert isinstance(maps, torch.Tensor), what
    assert tuple(maps.shape) == (len(images), *images.shape[-2:]), f"{what}: {maps.shape}"
    assert maps.is_floating_point() and torch.isfinite(maps).all(), f"{what}: not finite"
    assert maps.min() >= 0 and maps.max() <= 1, f"{what}: [{maps.min()}, {maps.max()}]"


# --- heatmap methods ------------------------------------------------------------------------


def test_every_configured_method_and_metric_is_covered(evaluate_cfg) -> None:
    assert list(evaluate_cfg.evaluation.methods) == METHODS
    assert list(evaluate_cfg.evaluation.metrics) == METRICS


@pytest.mark.parametrize(("method", "net", "mode"), _method_cases())
def test_method_restores_the_model_and_gives_unit_maps(
    evaluate_cfg, setups, method: str, net: str, mode: str
) -> None:
    setup = _setup(setups, net)
    cfg = evaluate_cfg
    cfg.evaluation.select = [method]
    model = setup.model
    _set_mode(model, mode)
    try:
        before = _snapshot(model)
        training = ClassImages(TensorDataset(setup.images, setup.classes))
        built = build_methods(cfg, model, setup.relevant, training=training)[method]
        _assert_restored(before, _snapshot(model), f"building {method}")
        maps = built(setup.images, setup.classes)
        _assert_restored(before, _snapshot(model), f"{method} on a model in {mode} mode")
        maps_again, signal = built.maps_and_signal(setup.images, setup.classes)
        _assert_restored(before, _snapshot(model), f"{method}.maps_and_signal ({mode} mode)")
    finally:
        model.eval()
    _assert_unit_maps(maps, setup.images, method)
    _assert_unit_maps(maps_again, setup.images, f"{method}.maps_and_signal")
    if signal is not None:  # the signed (N, H, W) input-space signal
        assert tuple(signal.shape) == tuple(maps.shape), f"{method}: signal {signal.shape}"
        assert torch.isfinite(signal).all(), f"{method}: signal not finite"


# --- rule presets ---------------------------------------------------------------------------


@pytest.mark.parametrize(("preset", "net", "mode"), _preset_cases())
def test_preset_backprop_restores_the_model_and_gives_finite_signals(
    setups, preset: str, net: str, mode: str
) -> None:
    setup = _setup(setups, net)
    model = setup.model
    rules = Rules(preset=preset)
    nonzero = 0
    _set_mode(model, mode)
    try:
        before = _snapshot(model)
        index = setup.relevant.index
        for layer, channels in zip(index.layers, index.channels, strict=True):
            # every mined layer, a different channel per image
            signal = backprop_feature(
                model, setup.images, layer, torch.arange(IMAGES) % channels, rules=rules
            )
            what = f"preset {preset} at {layer} ({mode} mode)"
            _assert_restored(before, _snapshot(model), what)
            assert signal.shape == setup.images.shape, what
            assert torch.isfinite(signal).all(), what
            nonzero += bool(signal.abs().sum() > 0)
    finally:
        model.eval()
    assert nonzero, f"preset {preset}: no signal reaches the pixels from any mined layer"


# --- metrics --------------------------------------------------------------------------------


def _metrics(cfg: DictConfig) -> dict[str, HeatmapMetric]:
    return build_metrics(cfg.evaluation, list(GROUPS))


@pytest.mark.parametrize("name", METRICS)
def test_metric_declares_direction_group_and_ddp_reductions(evaluate_cfg, name: str) -> None:
    metric = _metrics(evaluate_cfg)[name]
    assert isinstance(metric.higher_is_better, bool), name
    assert metric.group in GROUPS, name
    assert isinstance(metric.name, str) and metric.name, name
    assert metric._reductions, f"{name} has no states"
    wrong = {
        state: fx
        for state, fx in metric._reductions.items()
        if fx not in (dim_zero_sum, dim_zero_cat)
    }
    assert not wrong, f"{name}: states not sum/cat-reduced under DDP: {wrong}"


def _update(metric: HeatmapMetric, batch: dict[str, Any], rows: slice) -> None:
    """As HeatmapEvaluation feeds a batch (one endpoint cache per batch)."""
    shared = {"endpoints": EndpointCache()} if metric.uses_endpoints else {}
    metric.update(
        batch["maps"][rows],
        batch["masks"][rows],
        images=batch["images"][rows],
        targets=batch["targets"][rows],
        model=batch["model"],
        **shared,
    )


def _merge(into: HeatmapMetric, other: HeatmapMetric) -> None:
    """``into``'s states := the all-reduce of both (sum, or concatenation for list states)."""
    for state, fx in into._reductions.items():
        mine, theirs = getattr(into, state), getattr(other, state)
        if fx is dim_zero_sum:
            setattr(into, state, mine + theirs)
        elif isinstance(mine, list):
            setattr(into, state, [*mine, *theirs])
        else:
            setattr(into, state, torch.cat([mine, theirs]))


def _assert_close(whole: Any, merged: Any, what: str) -> None:
    if isinstance(whole, dict):
        assert whole.keys() == merged.keys(), what
        for key in whole:
            _assert_close(whole[key], merged[key], f"{what}[{key}]")
        return
    whole, merged = torch.as_tensor(whole).double(), torch.as_tensor(merged).double()
    assert torch.allclose(whole, merged, rtol=0, atol=1e-6, equal_nan=True), (
        f"{what}: {whole} vs {merged}"
    )


def _batch_of_every_method(cfg: DictConfig, setup: _Setup) -> dict[str, Any]:
    """The maps of every configured method on the images, one after the other in one batch
    (the images, masks and classes repeated alongside): one update scores them all."""
    if not setup.maps:
        for name, method in build_methods(cfg, setup.model.eval(), setup.relevant).items():
            setup.maps[name] = method(setup.images, setup.classes)
    copies = len(setup.maps)
    return {
        "maps": torch.cat(list(setup.maps.values())),
        "masks": setup.masks.repeat(copies, 1, 1),
        "images": setup.images.repeat(copies, 1, 1, 1),
        "targets": setup.classes.repeat(copies),
        "model": setup.model,
    }


@pytest.mark.parametrize("net", list(NETWORKS))
@pytest.mark.parametrize("name", METRICS)
def test_metric_states_merge_like_one_pass(evaluate_cfg, setups, name: str, net: str) -> None:
    setup = _setup(setups, net)
    prototype = _metrics(evaluate_cfg)[name]
    batch = _batch_of_every_method(evaluate_cfg, setup)
    half = len(batch["maps"]) // 2
    whole, first, second = prototype.clone(), prototype.clone(), prototype.clone()
    _update(whole, batch, slice(None))
    _update(first, batch, slice(None, half))
    _update(second, batch, slice(half, None))
    _merge(first, second)
    _assert_close(whole.compute(), first.compute(), f"{name} on every method's maps ({net})")
