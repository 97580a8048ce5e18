"""python evaluate.py end to end: every evaluator on a trained MNIST LeNet, localisation on a
small generated an8Flower model, multirun over mu and k, and the bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.wandb_offline import logged_values
from vebi.mining.features import FeatureIndex
from vebi.mining.relevant import RelevantFeatures

#: every configured method but CRAFT, which crops colour images only (a noted row on MNIST)
METHODS = [
    "vebi",
    "vebi_paper",
    "vebi_class_conditioned",
    "vebi_standard_conv",
    "vebi_deconvnet_relu",
    "vebi_best_feature",
    "deconvnet",
    "guided_backprop",
    "deconvnet_captum",
    "guided_backprop_captum",
    "gradient",
    "gradcam",
    "integrated_gradients",
    "smoothgrad",
    "lrp_epsilon_plus_flat",
    "lrp_epsilon_gamma_box",
    "crp_vebi_features",
    "crp",
    "gradcam_pgc",
    "gradcam_plus_plus",
    "layercam",
    "scorecam",
    "eigencam",
    "top_unit_activation",
    "centre_gaussian",
    "uniform_random",
]


def _only_run(root: Path) -> Path:
    (results,) = root.rglob("results.json")
    return results.parent


@pytest.mark.slow  # end to end through processes: make acceptance
def test_evaluate_runs_every_evaluator_on_mnist(
    short_run: dict, mnist_root: Path, tmp_path: Path
) -> None:
    result = run_cli(
        "evaluate.py",
        f"ckpt_path={short_run['best_checkpoint']}",
        f"paths.data_dir={mnist_root}",
        f"paths.log_dir={tmp_path}",
        "evaluation.max_images=600",
        "evaluation.heatmap_images=24",
        "evaluation.steps=5",
        "evaluation.panel_images_per_class=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = _only_run(tmp_path)
    results = json.loads((run / "results.json").read_text())
    # the features mined in the training run are reused (same mu)
    assert results["relevant_features"] == short_run["relevant_features"]
    metrics = results["metrics"]
    assert metrics["test/acc"] > 0.85 and 0.5 < metrics["test/sparse_accuracy"] <= 1
    ablation = results["ablation"]
    assert ablation["draws"] == 5 and len(ablation["per_class"]) == 10
    relevant = RelevantFeatures.load(short_run["relevant_features"])
    for c, row in enumerate(ablation["per_class"]):
        assert row["features"] == len(relevant.relevant(c))
    # zeroing a class's relevant features hurts that class more than random sets do
    assert ablation["average"]["drop_own"] > ablation["average"]["random_drop_own_mean"]
    methods = results["heatmaps"]["methods"]
    assert list(methods) == METHODS
    for name, row in methods.items():
        assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1, name
        assert len(row["deletion_curve"]) == 6 and "iou_mean" not in row
    assert "localisation skipped: the data set has no ground-truth masks" in results["notes"]
    assert "dissection skipped: the data set has no part masks" in results["notes"]
    assert any(
        n.startswith("craft failed while fitting: VebiError: CRAFT") for n in results["notes"]
    )
    assert "dissection" not in results
    # ours removes the evidence faster than a random ordering of the pixels
    assert methods["vebi"]["deletion_auc"] < methods["uniform_random"]["deletion_auc"]
    markdown = (run / "results.md").read_text()
    assert "## Relevance by ablation" in markdown and "| gradcam |" in markdown
    assert "deletion_auc ↓" in result.stdout  # the table is printed too
    assert sorted(p.name for p in (run / "panels").glob("*.png")) == [f"{c}.png" for c in range(10)]
    assert (run / "deletion_curves.png").is_file() and (run / "insertion_curves.png").is_file()
    values = logged_values(Path(results["wandb_dir"]))
    # a table per evaluator, a row per method; no localisation table without masks
    for evaluator in ("faithfulness", "artefacts"):
        assert values[f"heatmaps/{evaluator}/_type"][-1] == "table-file"
        assert values[f"heatmaps/{evaluator}/nrows"][-1] == len(METHODS)
    assert "heatmaps/localisation/_type" not in values
    assert values["ablation/per_class/nrows"][-1] == 10
    assert values["ablation/per_class/nrows"][-1] == 10
    assert values["heatmaps/vebi/deletion_auc"][-1] == pytest.approx(
        methods["vebi"]["deletion_auc"]
    )
    # line_series plots: one (x, y, method) row per point of every method's curve
    assert values["heatmaps/deletion_curves_table/nrows"][-1] == 6 * len(METHODS)
    assert values["heatmaps/panels/count"][-1] == 10
    # test metrics under their own names, the prefix once
    assert values["test/sparse_accuracy"][-1] == pytest.approx(metrics["test/sparse_accuracy"])
    assert not [key for key in values if key.startswith("test/test/")]


@pytest.mark.slow  # end to end through processes: make acceptance
def test_multirun_over_mu_and_k_mines_what_is_missing(
    short_run: dict, mnist_root: Path, tmp_path: Path
) -> None:
    result = run_cli(
        "evaluate.py",
        "-m",
        f"ckpt_path={short_run['best_checkpoint']}",
        f"paths.data_dir={mnist_root}",
        f"paths.log_dir={tmp_path}",
        "logger=none",
        f"mining.cache_dir={tmp_path / 'cache'}",
        "data.train_subset=3000",
        "mining.progress=false",
        "evaluation.evaluators=[sparse,faithfulness]",
        "evaluation.max_images=300",
        "evaluation.heatmap_images=8",
        "evaluation.steps=4",
        "evaluation.select=[vebi]",
        "mining.mu=5,10",
        "k=1,3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(tmp_path.rglob("results.json"))
    assert len(runs) == 4
    seen = {}
    for path in runs:
        results = json.loads(path.read_text())
        seen[(results["mu"], results["k"])] = results["relevant_features"]
    assert set(seen) == {(5.0, 1), (5.0, 3), (10.0, 1), (10.0, 3)}
    # mu = 10 is what training mined with: reused; mu = 5 is mined in the evaluation run
    assert seen[(10.0, 1)] == short_run["relevant_features"]
    assert seen[(5.0, 1)].startswith(str(tmp_path)) and seen[(5.0, 1)].endswith(
        "mining/relevant_features.h5"
    )
    # one table for the whole sweep, a row per job
    (summary,) = tmp_path.rglob("sweep_summary.json")
    rows = json.loads(summary.read_text())
    assert sorted((row["mu"], row["k"]) for row in rows) == sorted(seen)
    assert all("vebi/deletion_auc" in row and "test/sparse_accuracy" in row for row in rows)
    assert "mining.mu=5" in rows[0]["overrides"] and "paths." not in rows[0]["overrides"]
    markdown = summary.with_suffix(".md").read_text()
    assert markdown.startswith("# Sweep: 4 jobs") and markdown.count("\n| ") == 5


@pytest.mark.slow  # end to end through processes: make acceptance
def test_class_mismatch_is_a_clear_error(short_run: dict, mnist_root: Path, tmp_path: Path) -> None:
    index = FeatureIndex(("relu3",), (500,))
    wrong = RelevantFeatures(np.zeros((500, 6)), index, [f"c{i}" for i in range(6)], mu=1.0)
    path = wrong.save(tmp_path / "six_classes.h5")
    result = run_cli(
        "evaluate.py",
        f"ckpt_path={short_run['best_checkpoint']}",
        f"paths.data_dir={mnist_root}",
        f"paths.log_dir={tmp_path}",
        "logger=none",
        f"relevant_features={path}",
    )
    assert result.returncode == 1
    assert "were mined for 6 classes but the checkpoint predicts 10" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("results.json"))
    result = run_cli(
        "evaluate.py",
        f"ckpt_path={short_run['best_checkpoint']}",
        f"paths.data_dir={mnist_root}",
        f"paths.log_dir={tmp_path}",
        "logger=none",
        "evaluation.evaluators=[sparse,bogus]",
    )
    assert result.returncode == 1 and "unknown evaluator(s) ['bogus']" in result.stderr


@pytest.mark.slow  # end to end through processes: make acceptance
def test_localisation_on_generated_an8flower(tmp_path: Path) -> None:
    common = [
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"mining.cache_dir={tmp_path / 'cache'}",
        "data.images_per_class=14",
        "data.image_size=48",
        "data.progress=false",
        "mining.progress=false",
    ]
    train = run_cli(
        "train.py",
        "experiment=an8flower_single",
        "trainer.max_epochs=1",
        *common,
        "logger=none",
        "interpretation.thumbnails=0",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    # the galleries are labelled with the part each feature detects (the data has part masks)
    assert (
        "Labelling the relevant features with the parts they detect" in train.stdout + train.stderr
    )
    assert list((tmp_path / "logs" / "train").rglob("galleries/class_*.png"))
    result = run_cli(
        "evaluate.py",
        "experiment=an8flower_single",
        *common,
        "evaluation.evaluators=[localisation,artefacts,dissection]",
        "evaluation.heatmap_images=null",
        "evaluation.select=[vebi,vebi_standard_conv,gradcam,centre_gaussian]",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Using the newest checkpoint of experiment 'an8flower_single'" in result.stdout
    run = _only_run(tmp_path / "logs" / "evaluate")
    results = json.loads((run / "results.json").read_text())
    assert results["notes"] == []
    methods = results["heatmaps"]["methods"]
    assert list(methods) == ["vebi", "vebi_standard_conv", "gradcam", "centre_gaussian"]
    for name, row in methods.items():
        assert len(row["iou_curve"]) == 19 and 0 <= row["iou_mean"] <= 1, name
        for key in ("iou_at_map_mean", "pointing_game", "relevance_mass", "artefact_score"):
            assert 0 <= row[key] <= 1, (name, key)
    # the stride fix removes grid energy from our maps
    assert methods["vebi"]["artefact_score"] < methods["vebi_standard_conv"]["artefact_score"]
    assert (run / "iou_curves.png").is_file()
    values = logged_values(Path(results["wandb_dir"]))
    assert values["heatmaps/localisation/nrows"][-1] == 4
    assert values["heatmaps/iou_curves_table/nrows"][-1] == 19 * 4
    assert values["heatmaps/vebi/iou_mean"][-1] == pytest.approx(methods["vebi"]["iou_mean"])
    assert len(list((run / "panels").glob("*.png"))) == 6
    dissection = results["dissection"]
    assert len(dissection["per_class"]) == 6 and dissection["deciding_parts"] == ["petals"]
    assert sum(dissection["label_counts"].values()) == len(dissection["features"]) > 0
    for entry in dissection["features"]:
        assert entry["part"] is None or entry["iou"] >= dissection["iou_floor"], entry
    assert (run / "dissection.png").is_file()
    assert "## Dissection" in (run / "results.md").read_text()
    assert "Dissection: % of each class" in (run / "report.html").read_text()
    assert values["dissection/per_class/nrows"][-1] == 6


def test_results_name_paths_relative_to_the_project(tmp_path: Path) -> None:
    from vebi.pipelines.evaluate import portable_paths

    root = tmp_path / "project"
    result = {
        "checkpoint": str(root / "logs/train/mnist/run/checkpoints/best.ckpt"),
        "output_dir": str(root / "logs/evaluate/mnist/run"),
        "relevant_features": "/elsewhere/relevant_features.h5",
        "wandb_dir": None,
        "figures": {"iou_curves": str(root / "logs/evaluate/mnist/run/iou_curves.png")},
        "metrics": {"test/acc": 0.99},
        "model": str(root / "logs/train/mnist/run/checkpoints/best.ckpt"),
        "sanity": {"data_randomised_checkpoint": str(root / "logs/train/permuted/best.ckpt")},
        "config": {"sanity": {"data_randomised_checkpoint": str(root / "logs/p.ckpt")}},
        "notes": ["a note that names /anything stays as it is"],
    }
    portable = portable_paths(result, root)
    assert portable["model"] == "logs/train/mnist/run/checkpoints/best.ckpt"
    assert portable["sanity"]["data_randomised_checkpoint"] == "logs/train/permuted/best.ckpt"
    assert portable["config"]["sanity"]["data_randomised_checkpoint"] == "logs/p.ckpt"
    assert portable["notes"] == result["notes"]
    assert portable["checkpoint"] == "logs/train/mnist/run/checkpoints/best.ckpt"
    assert portable["figures"]["iou_curves"] == "logs/evaluate/mnist/run/iou_curves.png"
    assert portable["relevant_features"] == "/elsewhere/relevant_features.h5"  # outside: kept
    assert portable["wandb_dir"] is None and portable["metrics"] == result["metrics"]
    assert result["checkpoint"].startswith(str(root))  # the in-memory result is untouched
