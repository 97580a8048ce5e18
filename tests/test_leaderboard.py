"""experiments/leaderboard.py: a tiny configuration of the real command (MNIST, one seed, every
method through train.py and evaluate.py), its resuming, and the aggregation over seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import leaderboard  # noqa: E402


def test_a_tiny_leaderboard_runs_every_method_and_resumes(
    mnist_root: Path, tmp_path: Path, capsys
) -> None:
    runs, out = tmp_path / "runs", tmp_path / "tables"
    argv = ["--tables", "mnist", "--seeds", "1", "--tiny", "--runs", str(runs), "--out", str(out)]
    leaderboard.main([*argv, f"paths.data_dir={mnist_root}"])
    board = json.loads((out / "mnist.json").read_text())
    assert board["seeds"] == [301]
    methods = board["methods"]
    for name in (
        "vebi",
        "crp",
        "crp_vebi_features",
        "lrp_epsilon_gamma_box",
        "scorecam",
        "integrated_gradients",
        "smoothgrad",
        "guided_backprop_captum",
        "eigencam",
    ):
        cells = methods[name]
        assert {"deletion_auc", "insertion_auc", "artefact_score", "sanity_ssim"} <= set(cells)
        assert cells["deletion_auc"]["n"] == 1 and 0 <= cells["deletion_auc"]["mean"] <= 1
    # CRAFT crops colour images only: a noted row with its reason, the others went on
    assert "craft" not in methods and "colour images" in board["noted"]["craft"][0]
    table = (out / "mnist.md").read_text()
    assert "| craft | – |" in table and "deletion ↓" in table and "| vebi |" in table
    assert "**" not in table  # one seed: no spread, nothing marked best
    # running again reuses the finished runs: nothing is trained or evaluated again
    capsys.readouterr()
    stamp = (runs / "mnist" / "seed_301" / "evaluate" / "results.json").stat().st_mtime_ns
    leaderboard.main(argv)
    assert "$ " not in capsys.readouterr().out
    assert (runs / "mnist" / "seed_301" / "evaluate" / "results.json").stat().st_mtime_ns == stamp


def _cell(mean: float, std: float, n: int = 3) -> dict[str, float]:
    return {"mean": mean, "std": std, "n": n}


def test_best_is_marked_only_beyond_the_spread() -> None:
    summary = {
        "a": {"relevance_mass": _cell(0.80, 0.02), "deletion_auc": _cell(0.10, 0.05)},
        "b": {"relevance_mass": _cell(0.70, 0.03), "deletion_auc": _cell(0.12, 0.01)},
        "c": {"relevance_mass": _cell(0.50, 0.01), "deletion_auc": _cell(0.30, 0.01)},
    }
    assert leaderboard.best_beyond_spread(summary, "relevance_mass", higher=True) == "a"
    # 0.10 vs 0.12 is within a's spread of 0.05
    assert leaderboard.best_beyond_spread(summary, "deletion_auc", higher=False) is None
    one_seed = {k: {"deletion_auc": _cell(v, 0.0, n=1)} for k, v in (("a", 0.1), ("b", 0.5))}
    assert leaderboard.best_beyond_spread(one_seed, "deletion_auc", higher=False) is None


def test_aggregate_gives_mean_and_sample_std_over_seeds() -> None:
    def run(deletion: float, ssim: float) -> dict:
        return {
            "metrics": {"test/acc": 0.99},
            "config": {"methods": {"vebi": {}, "crp": {}}},
            "heatmaps": {"methods": {"vebi": {"deletion_auc": deletion}}, "failed": {}},
            "sanity": {"methods": {"vebi": {"ssim_mean": [0.9, ssim]}}},
            "notes": ["crp skipped: zennit-crp is not installed"],
        }

    board = leaderboard.aggregate("t", {1: run(0.1, 0.2), 2: run(0.3, 0.4)})
    cell = board["methods"]["vebi"]["deletion_auc"]
    assert cell["mean"] == pytest.approx(0.2) and cell["std"] == pytest.approx(0.1414213, rel=1e-5)
    assert board["methods"]["vebi"]["sanity_ssim"]["mean"] == pytest.approx(0.3)  # last step
    assert board["noted"] == {"crp": ["skipped: zennit-crp is not installed"]}
