"""The peers in the evaluation, each run by its own library (vebi.evaluation.peers): checked
against an independent computation (Captum's Grad-CAM, CRP's additivity over channels against
zennit's LRP, Captum's guided backprop on a ReLU network), and their failure modes (missing
library, a peer that refuses the model) as notes and noted rows."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tests.explain_models import randomised
from tests.test_heatmap_methods import _random_relevant, _small_vgg
from vebi.errors import VebiError
from vebi.evaluation.data import ClassImages, EvaluationSet
from vebi.evaluation.heatmaps import HeatmapEvaluation
from vebi.evaluation.localisation import RelevanceMass
from vebi.evaluation.methods import CaptumAttribution, GradCAM, RulesAttribution
from vebi.evaluation.peers import (
    CRAFTConcepts,
    CRPConditional,
    PeerUnavailable,
    PytorchGradCAM,
    ZennitLRP,
    import_craft,
    lrp_composite,
)
from vebi.pipelines.evaluate import build_methods


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = _small_vgg()
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    classes = torch.tensor([0, 1, 2, 3, 0, 1])
    return model, images, classes


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_gradcam_of_pytorch_grad_cam_agrees_with_captums(setup) -> None:
    model, images, classes = setup
    relevant = _random_relevant(model, images, 4)
    # both as the libraries scale them (min-max); the evaluation calibrates both alike
    captum = GradCAM(model, relevant, calibration="min_max")(images, classes)
    theirs = PytorchGradCAM(model, relevant, "gradcam", calibration="min_max")(images, classes)
    assert theirs.shape == captum.shape
    # the same ReLU(sum_k alpha_k A_k), scaled per image; bilinear resizing by OpenCV and by
    # torch differ only in rounding
    for n in range(len(images)):
        if captum[n].max() > 0:
            assert _correlation(captum[n], theirs[n]) > 0.999
            assert (captum[n] - theirs[n]).abs().max() < 0.02


def test_crp_conditional_maps_add_up_to_the_lrp_map(setup) -> None:
    """Relevance is conserved by the conditions: the conditional heatmaps of every channel of
    a layer add up to the unconditional LRP heatmap of the class (zennit alone)."""
    from crp.attribution import CondAttribution

    model, images, classes = setup
    relevant = _random_relevant(model, images, 4)
    lrp = ZennitLRP(model, relevant)._signal(images[:2], classes[:2]).sum(dim=1)
    captured = {}
    handle = model.relu2.register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
    with torch.no_grad():
        model(images[:1])
    handle.remove()
    width = captured["a"].shape[1]
    attribution = CondAttribution(model, no_param_grad=False)
    total = torch.zeros_like(lrp)
    for n in range(2):
        data = images[n : n + 1].clone().requires_grad_(True)
        conditions = [{"relu2": [c], "y": [int(classes[n])]} for c in range(width)]
        result = attribution(data, conditions, lrp_composite("epsilon_plus_flat", model, data))
        total[n] = result.heatmap.sum(dim=0)
    assert torch.allclose(total, lrp, atol=1e-5 * float(lrp.abs().max()))


def test_crp_conditions_on_the_features_vebi_picks(setup) -> None:
    model, images, classes = setup
    relevant = _random_relevant(model, images, 4)
    ours = CRPConditional(model, relevant, pick="vebi", k=3)
    maps, chosen = ours.conditional_maps(images, classes)
    picked = ours.explainer.choose(images, classes)
    assert chosen == [[(f.layer, f.channel) for f in row] for row in picked]
    assert maps.shape[:2] == (len(images), 3)
    assert torch.equal(ours(images, classes), maps.amax(dim=1))
    theirs = CRPConditional(model, relevant, pick="crp", k=2)
    assert all(len(row) == 2 and row[0][0] == "relu3" for row in theirs.chosen(images, classes))


def test_guided_backprop_by_rules_is_captums_on_relu_networks_and_covers_silu(setup) -> None:
    model, images, classes = setup
    relevant = _random_relevant(model, images, 4)
    for rules, algorithm in (("guided", "guided_backprop"), ("deconvnet", "deconvolution")):
        ours = RulesAttribution(model, relevant, rules)
        captum = CaptumAttribution(model, relevant, algorithm)
        assert not captum.notes
        assert torch.allclose(ours(images, classes), captum(images, classes), atol=1e-5)
    # a SiLU network: Captum's guided backprop is the plain gradient there, ours is not
    torch.manual_seed(0)
    silu = randomised(
        nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.SiLU(),
            nn.Conv2d(8, 8, 3),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )
    )
    captum = CaptumAttribution(silu, relevant, "guided_backprop")
    assert any("SiLU" in note for note in captum.notes)
    signal_captum = captum._signal(images, classes)
    inputs = images.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(silu(inputs).gather(1, classes[:, None]).sum(), inputs)
    scale = float(gradient.abs().max())
    assert torch.allclose(signal_captum, gradient, atol=1e-5 * scale)
    guided = RulesAttribution(silu, relevant, "guided")._signal(images, classes)
    assert float((guided - gradient).abs().max()) > 0.1 * scale


def test_craft_imports_without_tensorflow_and_refuses_negative_activations(setup) -> None:
    module = import_craft()
    assert "tensorflow" not in sys.modules or not isinstance(
        sys.modules["tensorflow"], type(module.HaltonSequence)
    )
    sampler = sys.modules["craft.sobol.sampler"]
    with pytest.raises(PeerUnavailable, match="scipy"):
        sampler.TFSobolSequence()(4, 8)
    model, images, classes = setup
    relevant = _random_relevant(model, images, 4)
    training = ClassImages(TensorDataset(images, classes))
    craft = CRAFTConcepts(model, relevant, layer="conv3", concepts=2, images_per_class=2)
    with pytest.raises(VebiError, match="non-negative"):
        craft.fit(training)
    craft = CRAFTConcepts(model, relevant, concepts=2, images_per_class=2)
    craft.fit(training)
    assert craft.layer == "relu3" and set(craft.fitted) == {0, 1, 2, 3}
    maps = craft(images, classes)
    assert maps.shape == (6, 32, 32) and maps.min() >= 0 and maps.max() <= 1


def test_a_missing_peer_is_skipped_with_a_note_and_a_failing_one_is_a_noted_row(
    compose_cfg, setup, monkeypatch
) -> None:
    model, images, classes = setup
    relevant = _random_relevant(model, images, 4)
    cfg = compose_cfg("evaluate", ["experiment=an8flower_double"])
    cfg.evaluation.select = ["gradcam", "scorecam", "crp", "craft"]
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # import fails
    notes: list[str] = []
    methods = build_methods(cfg, model, relevant, notes)
    assert list(methods) == ["gradcam", "crp"]
    assert any(n.startswith("scorecam skipped: grad-cam is not installed") for n in notes)
    assert any("make setup" in n for n in notes)
    assert any(n.startswith("craft skipped: it learns from training images") for n in notes)

    class Refusing(CRPConditional):
        def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no canonizer for this block")

    methods["crp"] = Refusing(model, relevant, pick="crp")
    data = EvaluationSet.from_tensors(images, classes, torch.ones(6, 32, 32, dtype=torch.bool))
    scorer = HeatmapEvaluation({"relevance_mass": RelevanceMass()}, batch_size=3)
    scores = scorer(model, methods, data, progress=False)
    assert list(scores) == ["gradcam"]
    assert scorer.failed == {"crp": "RuntimeError: no canonizer for this block"}


def test_crafts_split_of_the_network_is_exact_and_refuses_a_reused_layer(setup) -> None:
    from vebi.evaluation.peers import _SplitNetwork

    model = _small_vgg()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(images)
    split = _SplitNetwork(model, "relu3", (3, 64, 64))
    try:
        assert split._blank == (3, 16, 16)  # the wasted work before the layer, 16x smaller
        with torch.no_grad():
            a = split.input_to_latent(images)
            assert torch.allclose(split.latent_to_logit(a), expected, atol=1e-5)
    finally:
        split.close()
    reused = nn.ReLU()
    twice = nn.Sequential(nn.Conv2d(3, 4, 3), reused, nn.Conv2d(4, 4, 3), reused, nn.Flatten())
    with pytest.raises(VebiError, match="runs 2 times per forward"):
        _SplitNetwork(twice, "1", (3, 8, 8))
