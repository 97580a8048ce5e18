"""The coverage matrix: every torchvision CNN family, a list of timm CNN families and a real
network written outside both are mined, explained (k = 3) and given the evaluation's heatmap
methods, with small inputs and random weights (tests/zoo.py; benchmarks/coverage.py prints the
same as a table). Transformers are refused before any work."""

from __future__ import annotations

import pytest
import torch

from tests.zoo import TRANSFORMERS, ZOO, exercise
from vebi.errors import VebiError
from vebi.explain.rules import check_rule_coverage
from vebi.mining.features import default_feature_layers

pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite_pytorch")


#: The zoo's heaviest members (10-20 s each on 2 cores): make acceptance.
HEAVY = {"inception_v3", "mobilenet_v3_small", "efficientnet_v2_s", "densenet121"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in ZOO]
)
def test_every_cnn_is_mined_explained_and_restored(name: str) -> None:
    build, side = ZOO[name]
    torch.manual_seed(0)
    coverage = exercise(build(), side)
    assert coverage.restored  # no rule, canonizer or hook left behind
    assert 0 < coverage.features < 30_000  # one layer per block: m in the thousands
    for method, maps in coverage.maps.items():
        assert maps.shape == (2, side, side), method
        assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1, method
    # ours and the plain gradient never vanish (Grad-CAM or a deconvnet may, at random weights)
    assert (coverage.maps["vebi"].flatten(1).amax(1) > 0).all()
    assert (coverage.maps["gradient"].flatten(1).amax(1) > 0).all()
    # functional ReLUs and convolutions that pad in their forward took the rules
    functional = coverage.rules.get("functional", "")
    if name in ("googlenet", "inception_v3", "densenet121"):
        assert "relu -> GuidedReLU()" in functional
    if name.startswith(("efficientnet-lite0", "timm/tf_efficientnet", "timm/nf_resnet")):
        assert "conv2d -> StrideFixConv()" in functional
    # every module type has a stated rule, and no activation goes by a silent gradient
    activations = ("ReLU6", "SiLU", "GELU", "Hardswish", "Hardsigmoid", "Sigmoid", "Swish")
    for module_type, rule in coverage.rules.items():
        if module_type in activations:
            assert rule == "ActivationRule('guided')", (module_type, rule)


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformers_are_refused_before_any_work(name: str) -> None:
    model = TRANSFORMERS[name]().eval()
    with pytest.raises(VebiError, match="attention layer"):
        check_rule_coverage(model)
    with pytest.raises(VebiError, match="attention layer"):
        default_feature_layers(model, torch.rand(1, 3, 32, 32))
