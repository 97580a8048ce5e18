"""Relevance by ablation and the sparse classifier, on the planted colour task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.mining_models import planted_colour_data, planted_colour_model
from vebi.errors import VebiError
from vebi.evaluation import (
    AblationRelevance,
    EvaluationSet,
    ablated,
    sparse_classifier_accuracy,
)
from vebi.evaluation.ablation import correct_per_image, stratified_sample, summarise_ablation
from vebi.mining.features import FeatureExtractor, FeatureIndex
from vebi.mining.relevant import RelevantFeatures


def _planted_relevant() -> RelevantFeatures:
    """Class c's only relevant feature: channel c of ``relu`` (what mining finds, see
    test_mining.py); ``pool`` features carry no weight."""
    index = FeatureIndex(("relu", "pool"), (6, 6))
    weights = np.zeros((12, 3))
    for c in range(3):
        weights[c, c] = 1.0
    return RelevantFeatures(weights, index, ["red", "green", "blue"], mu=1.0)


def test_ablated_zeroes_exactly_the_listed_channels_and_restores() -> None:
    model = planted_colour_model()
    images = planted_colour_data(per_class=4).tensors[0]
    # read downstream of the ablated layer (hooks on the same module run in registration order)
    with FeatureExtractor(model, ["pool"], "max", False, False) as extractor:
        before, _ = extractor(images)
        with ablated(model, {"relu": [1, 4]}):
            during, _ = extractor(images)
        after, _ = extractor(images)
    assert torch.equal(during[:, [1, 4]], torch.zeros(len(images), 2))
    keep = [0, 2, 3, 5]
    assert torch.equal(during[:, keep], before[:, keep])
    assert torch.equal(after, before)
    with pytest.raises(VebiError, match="unknown layer"), ablated(model, {"nope": [0]}):
        pass


def test_relevant_features_matter_more_than_random_ones() -> None:
    model = planted_colour_model()
    images, labels = planted_colour_data(per_class=30).tensors
    relevant = _planted_relevant()
    assert correct_per_image(model, images, labels, batch_size=50).all()  # a perfect model
    data = EvaluationSet.from_tensors(images, labels)
    records = AblationRelevance(draws=6, seed=0)(model, relevant, data, progress=False)
    assert [r.class_name for r in records] == ["red", "green", "blue"]
    for record in records:
        assert record.num_features == 1 and record.layers == {"relu": 1}
        # without its colour channel class c loses every image; the others keep theirs
        assert record.drop_own == pytest.approx(1.0)
        assert record.drop_others == pytest.approx(0.0)
        assert len(record.random_drop_own) == 6
        # a random channel of relu is the class's own one with probability 1/6 only
        assert np.mean(record.random_drop_own) < 0.75
    average = summarise_ablation(records)
    assert average["drop_own"] == pytest.approx(1.0)
    assert average["random_drop_own_mean"] < 0.75


def test_random_sets_keep_size_and_layer_distribution() -> None:
    relevant = _planted_relevant()
    rng = np.random.default_rng(0)
    draws = [
        AblationRelevance().random_set(relevant, {"relu": 2, "pool": 3}, rng) for _ in range(20)
    ]
    for chosen in draws:
        assert len(chosen["relu"]) == 2 and len(set(chosen["relu"])) == 2
        assert len(chosen["pool"]) == 3 and max(chosen["pool"]) < 6
    assert len({tuple(d["relu"]) for d in draws}) > 1  # actually random
    with pytest.raises(VebiError, match="draws must be in 1.."):
        AblationRelevance(draws=0)


def test_sparse_classifier_accuracy_matches_a_hand_count() -> None:
    model = planted_colour_model()
    images, labels = planted_colour_data(per_class=20).tensors
    relevant = _planted_relevant()
    data = EvaluationSet.from_tensors(images, labels)
    result = sparse_classifier_accuracy(model, relevant, data, batch_size=7)
    with FeatureExtractor(model, relevant.layers, relevant.aggregation) as extractor:
        x, logits = extractor(images)
    expected = (relevant.predict(x.double().numpy()) == labels.numpy()).mean()
    assert result["sparse_accuracy"] == pytest.approx(expected)
    assert result["network_accuracy"] == pytest.approx(
        (logits.argmax(1) == labels).float().mean().item()
    )
    assert result["sparse_accuracy"] > 0.9  # the colour channel decides


def test_ablation_costs_linear_in_the_images_and_agrees_with_the_exact_count() -> None:
    """drop_others on a stratified sample of K other images: N + (1 + draws) * sum_c (N_c +
    K_!c) forwards; with K = all images it is the exact drop over every other image."""
    model = planted_colour_model()
    images, labels = planted_colour_data(per_class=40).tensors
    relevant = _planted_relevant()
    sample = stratified_sample(labels, 30, seed=0)
    assert torch.bincount(labels[sample]).tolist() == [10, 10, 10]
    assert torch.equal(sample, stratified_sample(labels, 30, seed=0))  # seeded
    sampled = AblationRelevance(draws=2, seed=0, other_images=30)
    # 120 baseline + 3 sets x 3 classes x (40 own + 20 others)
    assert sampled.planned_forwards(labels, relevant) == 120 + 3 * 3 * 60
    exact = AblationRelevance(draws=2, seed=0, other_images=None)
    assert exact.planned_forwards(labels, relevant) == 120 + 3 * 3 * 120
    data = EvaluationSet.from_tensors(images, labels)
    fewer = sampled(model, relevant, data, progress=False)
    every = exact(model, relevant, data, progress=False)
    for a, b in zip(fewer, every, strict=True):
        assert a.drop_own == b.drop_own == pytest.approx(1.0)
        assert a.drop_others == b.drop_others == pytest.approx(0.0)
        assert a.random_drop_own == b.random_drop_own  # the same random sets, same own images
    with pytest.raises(VebiError, match="other_images must be"):
        AblationRelevance(other_images=0)


def test_crp_class_level_pick_is_ablated_next_to_the_relevant_features() -> None:
    """On the planted colour task, CRP ranks channel c of ``relu`` first for class c (its
    relevance is the only one reaching logit c), so its pick of one channel is vebi's, and
    ablating it costs class c what ablating the relevant feature costs."""
    from vebi.evaluation.peers import CRPClassPick

    model = planted_colour_model()
    data = planted_colour_data(per_class=20)
    images, labels = data.tensors

    def training(c: int, count: int) -> torch.Tensor:
        return images[labels == c][:count]

    pick = CRPClassPick(model, training, images_per_class=8)
    for c in range(3):
        assert pick(c, {"relu": 1}) == {"relu": [c]}
        relevance = pick.mean_relevance(c, ["relu"])["relu"]
        assert int(relevance.argmax()) == c and float(relevance[c]) > 0.9
    records = AblationRelevance(draws=2, seed=0, other_images=None)(
        model,
        _planted_relevant(),
        EvaluationSet.from_tensors(images, labels),
        progress=False,
        compare={"crp": pick},
    )
    for record in records:
        row = record.row()
        assert row["crp_drop_own"] == pytest.approx(row["drop_own"])
        assert row["crp_drop_others"] == pytest.approx(row["drop_others"])
    average = summarise_ablation(records)
    assert "crp_drop_own" in average
    from vebi.evaluation.reporting import ablation_table

    table = ablation_table([r.row() for r in records], average)
    assert "drop on class, crp's pick" in table and "drop on others, crp's pick" in table
    assert {line.count("|") for line in table.splitlines()} == {9}  # 8 columns on every line
