"""The sanity check (cascading model-parameter randomisation): similarities against hand
computations, the steps, and the whole test against Quantus's MPRT on real MNIST digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from tests.conftest import run_cli
from tests.explain_models import TinyResNet
from tests.mining_models import mnist_subset, seeded_lenet
from tests.wandb_offline import logged_values
from vebi.errors import VebiError
from vebi.evaluation import CascadingRandomisation, EvaluationSet
from vebi.evaluation.methods import CaptumAttribution, CentreGaussian, HeatmapMethod
from vebi.evaluation.sanity import (
    hog_similarity,
    randomisation_layers,
    randomisation_steps,
    randomise,
    rank_correlation,
    seeded_subset,
    similarities,
    ssim,
)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks by hand (ties share the mean of their positions)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def test_rank_correlation_is_pearson_of_average_ranks() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((6, 6)).round(1)  # many ties
    b = a + rng.normal(0, 0.2, size=a.shape)
    expected = np.corrcoef(_ranks(a.ravel()), _ranks(b.ravel()))[0, 1]
    assert rank_correlation(a, b) == pytest.approx(expected, abs=1e-12)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)


def test_undefined_similarities_count_one_when_equal_and_zero_otherwise() -> None:
    zero, ramp = np.zeros((16, 16)), np.tile(np.linspace(0, 1, 16), (16, 1))
    assert rank_correlation(zero, zero) == 1.0 and rank_correlation(zero, ramp) == 0.0
    assert hog_similarity(zero, zero) == 1.0 and hog_similarity(zero, ramp) == 0.0
    assert ssim(zero, zero) == 1.0


def test_ssim_and_hog_of_a_map_with_itself_and_with_its_transpose() -> None:
    ramp = np.tile(np.linspace(0, 1, 28), (28, 1))  # horizontal gradient
    assert ssim(ramp, ramp) == pytest.approx(1.0)
    assert hog_similarity(ramp, ramp) == pytest.approx(1.0)
    # the transposed ramp has the same values but orthogonal gradients: HOG sees it
    assert hog_similarity(ramp, ramp.T) < 0.2
    assert ssim(ramp, ramp.T) < 0.9


def test_steps_go_from_the_logits_down_and_merge_blocks() -> None:
    model = torchvision.models.resnet18(weights=None)
    layers = randomisation_layers(model)
    expected = [
        name
        for name, module in model.named_modules()
        if name and callable(getattr(module, "reset_parameters", None))
    ][::-1]
    assert layers == expected and layers[0] == "fc" and layers[-1] == "conv1"
    blocks = randomisation_steps(model, "block")  # residual blocks whole, as in mining
    assert [s.name for s in blocks] == [
        "fc",
        *(f"layer{i}.{j}" for i in (4, 3, 2, 1) for j in (1, 0)),
        "bn1",
        "conv1",
    ]
    assert blocks[2].layers == tuple(n for n in layers if n.startswith("layer4.0."))
    assert "layer4.0.downsample.0" in blocks[2].layers
    merged = randomisation_steps(TinyResNet(), "layer", max_steps=3)
    layers = randomisation_layers(TinyResNet())
    assert len(merged) == 3
    assert [layer for step in merged for layer in step.layers] == layers  # each layer once
    with pytest.raises(VebiError, match="granularity"):
        randomisation_steps(model, "unit")


def test_randomise_changes_only_the_named_layers_and_keeps_the_callers_random_state() -> None:
    model = seeded_lenet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    randomise(model, ["conv4"], seed=42)
    assert torch.equal(torch.rand(1), expected_next)
    after = model.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key]) != key.startswith("conv4."), key
    again = seeded_lenet()
    randomise(again, ["conv4"], seed=42)
    assert torch.equal(again.conv4.weight, model.conv4.weight)  # seeded: reproducible


def test_mining_images_beyond_the_data_set_are_clamped_with_a_note() -> None:
    dataset = torch.utils.data.TensorDataset(torch.zeros(10, 1))
    subset, note = seeded_subset(dataset, 25, seed=0)
    assert len(subset) == 10 and "clamped to the 10 training images" in note
    subset, note = seeded_subset(dataset, 4, seed=0)
    assert len(subset) == 4 and note is None


class _FailsWhenRandomised(HeatmapMethod):
    """Raises on any network but the one it was first built for."""

    trained: nn.Module | None = None

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        if _FailsWhenRandomised.trained is None:
            _FailsWhenRandomised.trained = self.model
        if self.model is not _FailsWhenRandomised.trained:
            raise VebiError("cannot explain this network")
        return torch.zeros(len(images), *images.shape[-2:])


def _digits(mnist_root: Path, count: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    data = mnist_subset(mnist_root, count)
    return data.tensors[0], data.tensors[1]


def test_a_method_that_fails_on_the_randomised_network_is_skipped_with_a_note(
    mnist_root: Path,
) -> None:
    images, labels = _digits(mnist_root, 4)
    model = seeded_lenet()
    check = CascadingRandomisation(images=4, max_steps=2, remine=False)
    _FailsWhenRandomised.trained = None
    result = check(
        model,
        None,  # type: ignore[arg-type]
        EvaluationSet.from_tensors(images, labels),
        labels,
        lambda net, relevant: {
            "fails": _FailsWhenRandomised(net, relevant),
            "centre": CentreGaussian(net, relevant),
        },
        progress=False,
    )
    assert list(result["methods"]) == ["centre"]
    assert any("fails failed after randomising" in note for note in result["notes"])
    # a model-independent control keeps its map exactly
    assert result["methods"]["centre"]["spearman_mean"] == [1.0, 1.0]


@pytest.mark.parametrize("algorithm", ["guided_backprop", "gradient"])
def test_the_same_similarities_as_quantus_mprt(mnist_root: Path, algorithm: str) -> None:
    """Quantus's model-parameter randomisation test on the same LeNet, digits and Captum
    attribution gives, layer by layer, the same rank correlations (signed and absolute)."""
    quantus = pytest.importorskip("quantus")
    images, labels = _digits(mnist_root)
    model = seeded_lenet().double().float()
    check = CascadingRandomisation(images=len(images), max_steps=None, remine=False, seed=42)
    ours = check(
        model,
        None,  # type: ignore[arg-type]
        EvaluationSet.from_tensors(images, labels),
        labels,
        lambda net, relevant: {algorithm: CaptumAttribution(net, relevant, algorithm)},
        progress=False,
    )
    steps = [step["name"] for step in ours["steps"]]

    def explain(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **_: object):
        method = CaptumAttribution(model, None, algorithm)  # type: ignore[arg-type]
        _, signal = method.maps_and_signal(torch.as_tensor(inputs), torch.as_tensor(targets))
        return signal[:, None].numpy()

    for absolute, key in ((False, "spearman"), (True, "spearman_abs")):
        mprt = quantus.MPRT(
            similarity_func=quantus.similarity_func.correlation_spearman,
            layer_order="top_down",
            seed=42,
            abs=absolute,
            normalise=False,
            disable_warnings=True,
        )
        scores = mprt(
            model=model,
            x_batch=images.numpy(),
            y_batch=labels.numpy(),
            a_batch=None,
            explain_func=explain,
            device="cpu",
            batch_size=len(images),
        )
        assert list(scores)[1:] == steps
        for i, step in enumerate(steps):
            theirs = np.asarray(scores[step])
            assert ours["methods"][algorithm][f"{key}_mean"][i] == pytest.approx(
                theirs.mean(), abs=1e-9
            ), (key, step)
            assert ours["methods"][algorithm][f"{key}_std"][i] == pytest.approx(
                theirs.std(), abs=1e-9
            ), (key, step)


@pytest.mark.slow  # end to end through processes: make acceptance
def test_evaluate_py_runs_the_sanity_check_end_to_end(
    short_run: dict, mnist_root: Path, tmp_path: Path
) -> None:
    result = run_cli(
        "evaluate.py",
        f"ckpt_path={short_run['best_checkpoint']}",
        f"paths.data_dir={mnist_root}",
        f"paths.log_dir={tmp_path}",
        "evaluation.evaluators=[sanity]",
        "evaluation.select=[vebi,guided_backprop,centre_gaussian]",
        "evaluation.sanity.images=6",
        "evaluation.sanity.mining_images=100000",
        "evaluation.sanity.max_steps=2",
        "evaluation.max_images=200",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Sanity: 2 randomisation steps" in result.stderr + result.stdout
    (path,) = tmp_path.rglob("results.json")
    results = json.loads(path.read_text())
    sanity = results["sanity"]
    assert sanity["remined"] and sanity["num_images"] == 6
    assert list(sanity["methods"]) == [
        "vebi",
        "guided_backprop",
        "centre_gaussian",
        "vebi/original_W",
    ]
    assert [len(sanity["steps"]), len(sanity["seconds_per_step"])] == [2, 2]
    for name, curves in sanity["methods"].items():
        for key, values in curves.items():
            assert len(values) == 2, (name, key)
            assert all(v is None or -1 <= v <= 1 for v in values if "mean" in key), (name, key)
    # the whole network randomised: our maps change; the control cannot
    assert sanity["methods"]["vebi"]["spearman_abs_mean"][-1] < 0.9
    assert sanity["methods"]["centre_gaussian"]["ssim_mean"] == [1.0, 1.0]
    assert any("mining_images=100000 clamped" in note for note in results["notes"])
    run = path.parent
    assert "## Sanity: cascading randomisation" in (run / "results.md").read_text()
    assert (run / "sanity_curves.png").is_file()
    assert "Sanity check" in (run / "report.html").read_text()
    values = logged_values(Path(results["wandb_dir"]))
    assert values["sanity/steps/_type"][-1] == "table-file"
    assert "sanity/vebi/ssim" in values


def test_data_randomisation_compares_with_the_other_network(mnist_root: Path) -> None:
    images, labels = _digits(mnist_root, 4)
    trained, permuted = seeded_lenet(0), seeded_lenet(1)
    check = CascadingRandomisation(images=4, max_steps=1, remine=False)

    def build(net: nn.Module, relevant: object) -> dict[str, HeatmapMethod]:
        return {
            "guided_backprop": CaptumAttribution(net, relevant, "guided_backprop"),  # type: ignore[arg-type]
            "centre": CentreGaussian(net, relevant),  # type: ignore[arg-type]
        }

    result = check(
        trained,
        None,  # type: ignore[arg-type]
        EvaluationSet.from_tensors(images, labels),
        labels,
        build,
        progress=False,
        data_randomised=(permuted, None),  # type: ignore[arg-type]
    )
    other = result["data_randomisation"]
    assert other["centre"]["ssim_mean"] == 1.0  # the control cannot see the weights
    ours = CaptumAttribution(trained, None, "guided_backprop")  # type: ignore[arg-type]
    theirs = CaptumAttribution(permuted, None, "guided_backprop")  # type: ignore[arg-type]
    expected = similarities(
        *theirs.maps_and_signal(images, labels), *ours.maps_and_signal(images, labels)
    )
    for key, values in expected.items():
        assert other["guided_backprop"][f"{key}_mean"] == pytest.approx(values.mean(), abs=1e-12)
    assert other["guided_backprop"]["spearman_mean"] < 0.9
