"""One way to choose backward rules: the ``rules`` config group of every entry point, the
``Rules`` it builds reaching the explanations, the evaluation's methods of ours and the
galleries, and rules registered by name (vebi.explain.rules.register_rule / register_preset)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import CONFIG_DIR
from vebi.errors import VebiError
from vebi.explain import PAPER_STYLE, ExplanationStyle, backprop_feature
from vebi.explain.rules import (
    NAMED_RULES,
    PRESETS,
    GuidedReLU,
    Rules,
    StrideFixConv,
    register_preset,
    register_rule,
)
from vebi.mining.features import FeatureIndex
from vebi.mining.relevant import RelevantFeatures

ENTRY_POINTS = ("explain", "evaluate", "mine", "train")
SHIPPED = ("gradient", "deconvnet", "guided", "deconvnet_stride_fix", "guided_stride_fix")
#: rules=deconvnet with the pool choice replaced on the command line
CHOSEN = ["rules=deconvnet", "rules.pool=switch_unpool"]
EXPECTED = Rules(preset="deconvnet", pool="switch_unpool")


class _Stop(Exception):
    """Raised by a stand-in once it has seen the rules: the job goes no further."""


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations of a test are undone after it."""
    for slot, named in NAMED_RULES.items():
        monkeypatch.setitem(NAMED_RULES, slot, dict(named))
    for name in list(PRESETS):
        monkeypatch.setitem(PRESETS, name, PRESETS[name])
    yield
    for name in set(PRESETS) - set(SHIPPED):
        del PRESETS[name]


def test_the_group_holds_a_file_per_shipped_preset_and_the_default_is_unchanged(
    compose_cfg,
) -> None:
    files = {p.stem for p in (CONFIG_DIR / "rules").glob("*.yaml")}
    assert files == {"default", *SHIPPED} and set(SHIPPED) <= set(PRESETS)
    for entry in ENTRY_POINTS:
        cfg = compose_cfg(entry)
        assert cfg.hydra.runtime.choices["rules"] == "default", entry
        assert Rules.from_config(cfg.rules) == Rules(), entry  # guided, stride fix
    assert Rules() == Rules(preset="guided_stride_fix", relu="guided", conv="stride_fix")
    for preset in SHIPPED:
        cfg = compose_cfg("explain", [f"rules={preset}", "rules.conv=standard"])
        assert Rules.from_config(cfg.rules) == Rules(preset=preset, conv="standard"), preset


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_selects_its_rules_from_the_command_line(compose_cfg, entry) -> None:
    cfg = compose_cfg(entry, CHOSEN)
    assert cfg.hydra.runtime.choices["rules"] == "deconvnet"
    rules = Rules.from_config(cfg.rules)
    assert rules == EXPECTED
    assert (rules.relu, rules.conv, rules.pool, rules.family) == (
        "deconvnet",
        "standard",
        "switch_unpool",
        "deconvnet",
    )


def _lenet_relevant(net: nn.Module, images: torch.Tensor) -> RelevantFeatures:
    from vebi.mining.features import default_feature_layers
    from vebi.models.hooks import trace_leaf_calls

    layers = default_feature_layers(net, images[:1])
    shapes = dict(trace_leaf_calls(net, images[:1]))
    index = FeatureIndex(tuple(layers), tuple(shapes[layer][1] for layer in layers))
    weights = np.zeros((index.size, 10))
    weights[np.arange(10) % index.size, np.arange(10)] = 1.0  # one feature per class
    return RelevantFeatures(weights, index, [str(c) for c in range(10)], mu=1.0)


def test_the_evaluation_methods_of_ours_take_the_runs_rules(compose_cfg) -> None:
    from vebi.models import LeNet
    from vebi.pipelines.evaluate import build_methods

    cfg = compose_cfg("evaluate", [*CHOSEN, "evaluation.select=[vebi,vebi_best_feature]"])
    net = LeNet().eval()
    relevant = _lenet_relevant(net, torch.rand(1, 1, 28, 28))
    methods = build_methods(cfg, net, relevant)
    assert methods["vebi"].explainer.rules == EXPECTED
    assert methods["vebi_best_feature"].explainer.rules == EXPECTED
    # the ablations replace one choice of the run's rules
    cfg = compose_cfg(
        "evaluate",
        ["rules=guided", "rules.pool=switch_unpool"]
        + ["evaluation.select=[vebi_standard_conv,vebi_deconvnet_relu]"],
    )
    methods = build_methods(cfg, net, relevant)
    assert methods["vebi_standard_conv"].explainer.rules == Rules(
        preset="guided", conv="standard", pool="switch_unpool"
    )
    assert methods["vebi_deconvnet_relu"].explainer.rules == Rules(
        preset="guided", relu="deconvnet", pool="switch_unpool"
    )
    default = build_methods(compose_cfg("evaluate"), net, relevant)  # as before: unchanged
    assert default["vebi"].explainer.rules == Rules()
    assert default["vebi_standard_conv"].explainer.rules == Rules(conv="standard")
    assert default["vebi_deconvnet_relu"].explainer.rules == Rules(relu="deconvnet")


def test_the_galleries_take_the_runs_rules(compose_cfg, monkeypatch, tmp_path) -> None:
    import vebi.pipelines.common as common

    seen = []

    def interpret_and_log(*args):
        seen.append(args[-1])
        return []

    monkeypatch.setattr(common, "interpret_and_log", interpret_and_log)
    cfg = compose_cfg("mine", [*CHOSEN, "interpretation.part_labels=false"])
    report = SimpleNamespace(relevant=None, rows=tmp_path / "cache")
    common.make_galleries(cfg, nn.Identity(), report, None, tmp_path, [])
    given = Rules(preset="gradient")
    common.make_galleries(cfg, nn.Identity(), report, None, tmp_path, [], None, given)
    assert seen == [EXPECTED, given]


def _config_lenet(mnist_root: Path) -> list[str]:
    return [
        "model_source=config",
        "model=lenet",
        "model_source.allow_random_init=true",
        "logger=none",
        f"paths.data_dir={mnist_root}",
        "trainer.accelerator=cpu",
    ]


def test_mine_and_train_check_and_draw_the_galleries_with_the_runs_rules(
    compose_cfg, monkeypatch, mnist_root
) -> None:
    """mine.py and train.py build the rules once, before any work, for the coverage check
    and the galleries."""
    import vebi.pipelines.mine as mine_pipeline
    import vebi.pipelines.train as train_pipeline

    seen = []

    def check(net, rules, **kwargs):
        seen.append(rules)
        raise _Stop

    for pipeline in (mine_pipeline, train_pipeline):
        monkeypatch.setattr(pipeline, "check_rule_coverage", check)
    with pytest.raises(_Stop):
        mine_pipeline.mine(compose_cfg("mine", [*_config_lenet(mnist_root), *CHOSEN]))
    train_cfg = ["experiment=mnist", "logger=none", f"paths.data_dir={mnist_root}", *CHOSEN]
    with pytest.raises(_Stop):
        train_pipeline.train(compose_cfg("train", [*train_cfg, "trainer.accelerator=cpu"]))
    assert seen == [EXPECTED, EXPECTED]


def test_the_explanations_take_the_runs_rules(
    compose_cfg, monkeypatch, mnist_root, tmp_path
) -> None:
    import vebi.pipelines.explain as explain_pipeline
    from vebi.models import LeNet

    relevant = _lenet_relevant(LeNet().eval(), torch.rand(1, 1, 28, 28))
    path = relevant.save(tmp_path / "relevant_features.h5")
    seen = []

    def explainer(net, relevant, k, rules, style):
        seen.append((rules, style))
        raise _Stop

    monkeypatch.setattr(explain_pipeline, "Explainer", explainer)
    overrides = [*_config_lenet(mnist_root), f"relevant_features={path}", "num_images=2"]
    with pytest.raises(_Stop):
        explain_pipeline.explain(compose_cfg("explain", [*overrides, *CHOSEN]))
    with pytest.raises(_Stop):  # and the run's explanation style: the paper's preset
        explain_pipeline.explain(compose_cfg("explain", [*overrides, *CHOSEN, "explanation=paper"]))
    assert seen == [(EXPECTED, ExplanationStyle()), (EXPECTED, PAPER_STYLE)]


USER_MODULE = """
import torch
from torch import nn

from vebi.explain.rules import ReLURule, Rule, register_preset, register_rule


@register_rule("doubled")        # a ReLU rule: the relu slot, from its module types
class DoubledReLU(ReLURule):
    def backward(self, module, x, grad):
        return 2 * torch.ops.aten.threshold_backward(grad, x, 0)


@register_rule("halved_linear")  # a rule for another module type: rules.extra
class HalvedLinear(Rule):
    module_types = (nn.Linear,)

    def backward(self, module, x, grad):
        return 0.5 * grad @ module.weight


register_preset("doubled_gradient", "doubled", family="gradient")
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry) -> str:
    name = "vebi_test_user_rules"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_users_rules_are_selected_by_name_like_the_shipped_ones(compose_cfg, user_module) -> None:
    overrides = [f"rules.imports=[{user_module}]", "rules=gradient", "rules.relu=doubled"]
    rules = Rules.from_config(compose_cfg("explain", overrides).rules)
    assert type(rules.composite().rules[0]).__name__ == "DoubledReLU"
    assert rules.relu == "doubled" and rules.family == "gradient"
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3)).eval()
    images = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(0))
    gradient = backprop_feature(model, images, "2", 1, Rules(preset="gradient"))
    # one ReLU on the way down, its signal doubled
    torch.testing.assert_close(backprop_feature(model, images, "2", 1, rules), 2 * gradient)
    # a user's preset, and a user's rule for another module type in rules.extra by name
    overrides = [f"rules.imports=[{user_module}]", "rules.preset=doubled_gradient"]
    preset = Rules.from_config(
        compose_cfg("evaluate", [*overrides, "rules.extra=[halved_linear]"]).rules
    )
    assert preset.relu == "doubled" and preset.conv == "standard"
    linear = nn.Sequential(nn.Flatten(), nn.Linear(81, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    expected = backprop_feature(linear, images, "3", 0, Rules(preset="gradient"))
    # the second linear halves, the ReLU doubles, the first linear halves: half the gradient
    torch.testing.assert_close(backprop_feature(linear, images, "3", 0, preset), 0.5 * expected)


def test_unknown_names_are_one_clear_error_listing_the_registered_ones(compose_cfg) -> None:
    cfg = compose_cfg("explain", ["rules.conv=nope"])
    with pytest.raises(VebiError, match=r"unknown conv rule 'nope'.*standard, stride_fix, z_plus"):
        Rules.from_config(cfg.rules)
    cfg = compose_cfg("explain", ["rules.preset=nope"])
    with pytest.raises(VebiError, match=r"unknown rules preset 'nope'.*gradient, deconvnet"):
        Rules.from_config(cfg.rules)
    with pytest.raises(VebiError, match=r"unknown extra rule 'nope'.*switch_unpool"):
        Rules(extra=("nope",))
    with pytest.raises(VebiError, match="rules.imports: cannot import 'no_such_rules_module'"):
        Rules.from_config(compose_cfg("explain", ["rules.imports=[no_such_rules_module]"]).rules)
    with pytest.raises(VebiError, match=r"unknown rules key\(s\) \['convv'\]"):
        Rules.from_config({"convv": "standard"})


def test_registering(registry) -> None:
    @register_rule("my_guided")
    class MyGuided(GuidedReLU):
        pass

    assert NAMED_RULES["relu"]["my_guided"] is MyGuided
    assert Rules(relu="my_guided").composite().rules[0] == MyGuided()
    register_rule("my_guided")(MyGuided)  # the same again (a module imported twice): fine
    with pytest.raises(VebiError, match="a relu rule named 'guided' is registered already"):
        register_rule("guided")(MyGuided)
    register_rule("fix_eps", "conv")(lambda: StrideFixConv())  # a factory, its slot given
    assert Rules(conv="fix_eps").composite().rules[-1] == StrideFixConv()
    with pytest.raises(VebiError, match="a conv rule named 'fix_eps' is registered already"):
        register_rule("fix_eps", "conv")(lambda: StrideFixConv())  # another lambda
    with pytest.raises(VebiError, match="give the slot"):
        register_rule("no_slot")(lambda: StrideFixConv())
    with pytest.raises(VebiError, match="unknown slot"):
        register_rule("x", "norm")
    with pytest.raises(VebiError, match="must be a non-empty word"):
        register_rule("two words", "conv")
    with pytest.raises(VebiError, match="give family="):
        register_preset("mine", "my_guided")
    register_preset("mine", "my_guided", conv="fix_eps", family="guided")
    assert Rules(preset="mine").family == "guided"
    with pytest.raises(VebiError, match="unknown pool rule 'nope'"):
        register_preset("broken", "guided", pool="nope")
    with pytest.raises(VebiError, match="a preset named 'guided' is registered already"):
        register_preset("guided", "deconvnet")


def test_the_readme_rule_registers_and_is_selected_by_name(
    compose_cfg, tmp_path, monkeypatch, registry
) -> None:
    """The README's z+ class and its registration, as a user's module: ``rules.imports`` and
    ``rules.conv=my_zplus`` select it, and it equals vebi's own ZPlusConv."""
    from tests.test_readme import python_blocks
    from vebi.explain.rules import ZPlusConv

    blocks = python_blocks("Explanations")
    rule = next(b for b in blocks if "class ZPlusConv(Rule)" in b)
    registration = next(b for b in blocks if "register_rule(" in b)
    (tmp_path / "readme_rules.py").write_text(rule + "\n" + registration)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        cfg = compose_cfg("explain", ["rules.imports=[readme_rules]", "rules.conv=my_zplus"])
        rules = Rules.from_config(cfg.rules)
        cfg = compose_cfg(
            "explain", ["rules.imports=[readme_rules]", "rules.preset=guided_my_zplus"]
        )
        assert Rules.from_config(cfg.rules).composite().rules == rules.composite().rules
    finally:
        sys.modules.pop("readme_rules", None)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2), nn.ReLU(), nn.Conv2d(3, 2, 3)
    ).eval()
    images = torch.rand(2, 1, 15, 15, generator=torch.Generator().manual_seed(0))
    ours = backprop_feature(model, images, "4", 1, Rules(conv=ZPlusConv()))
    torch.testing.assert_close(backprop_feature(model, images, "4", 1, rules), ours)
