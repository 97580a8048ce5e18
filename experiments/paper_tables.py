"""Reproduce the paper-style tables: MNIST relevance by ablation, an8Flower localisation.

    python experiments/paper_tables.py mnist_relevance      # ablation + faithfulness, LeNet
    python experiments/paper_tables.py an8flower_single     # all methods, all metrics
    python experiments/paper_tables.py an8flower_double
    python experiments/paper_tables.py mnist_sanity          # cascading + data randomisation
    python experiments/paper_tables.py an8flower_double_sanity
    python experiments/paper_tables.py all

Each table runs ``evaluate.py`` on the newest checkpoint of its experiment (training one first
with ``train.py`` when there is none) and copies the results (``results.md``, ``results.json``)
and a few figures into ``<out>/<table>/``, replacing the previous ones at once. ``--out``
defaults to ``logs/paper_tables`` (not tracked); ``--out experiments/results`` updates the
recorded tables of the repository. Extra arguments after ``--`` go to evaluate.py as Hydra
overrides.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "experiments" / "results"
DEFAULT_OUT = ROOT / "logs" / "paper_tables"

#: table -> (experiment, evaluate.py overrides, how many per-class panels to keep)
TABLES: dict[str, tuple[str, list[str], int]] = {
    "mnist_relevance": (
        "mnist",
        ["evaluation.evaluators=[sparse,ablation,faithfulness,artefacts]"],
        2,
    ),
    "an8flower_single": ("an8flower_single", [], 2),
    "an8flower_double": ("an8flower_double", [], 3),
    "mnist_sanity": ("mnist", ["evaluation.evaluators=[sanity]"], 0),
    "an8flower_double_sanity": ("an8flower_double", ["evaluation.evaluators=[sanity]"], 0),
}
#: experiment -> train.py overrides of its data-randomisation twin: the same network trained on
#: randomly permuted labels until it fits them (2,000 digits, 50 epochs, the last kept), which
#: the sanity tables of that experiment compare with (evaluation.sanity.data_randomised_checkpoint)
PERMUTED_LABELS: dict[str, list[str]] = {
    "mnist": [
        "data.label_permutation_seed=0",
        "data.train_subset=2000",
        "data.val_size=500",
        "trainer.max_epochs=50",
        "callbacks.model_checkpoint.monitor=train/acc",
        "experiment_name=mnist_permuted_labels",
    ],
}


def _run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    if subprocess.run(command, cwd=ROOT, check=False).returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}")


def _newest_checkpoint(experiment_name: str) -> Path | None:
    found = sorted((ROOT / "logs" / "train" / experiment_name).glob("*/checkpoints/best.ckpt"))
    return found[-1] if found else None


def _has_checkpoint(experiment: str) -> bool:
    return _newest_checkpoint(experiment) is not None


def permuted_labels_checkpoint(experiment: str) -> Path:
    """The checkpoint of ``experiment``'s network trained on permuted labels (trained now when
    there is none)."""
    overrides = PERMUTED_LABELS[experiment]
    name = next(o for o in overrides if o.startswith("experiment_name=")).partition("=")[2]
    if _newest_checkpoint(name) is None:
        print(f"No {name} checkpoint: training one on permuted labels first", flush=True)
        _run([sys.executable, "train.py", f"experiment={experiment}", *overrides])
    found = _newest_checkpoint(name)
    assert found is not None
    return found


def reproduce(table: str, extra: list[str], out: Path = DEFAULT_OUT) -> Path:
    """Train if needed, evaluate, and copy the results into ``<out>/<table>``."""
    experiment, overrides, panels = TABLES[table]
    if not _has_checkpoint(experiment):
        print(f"No checkpoint of {experiment}: training one first", flush=True)
        _run([sys.executable, "train.py", f"experiment={experiment}"])
    if table.endswith("_sanity") and experiment in PERMUTED_LABELS:
        checkpoint = permuted_labels_checkpoint(experiment)
        overrides = [*overrides, f"evaluation.sanity.data_randomised_checkpoint={checkpoint}"]
    run_dir = Path(tempfile.mkdtemp(prefix=f"{table}-", dir=ROOT / "logs"))
    _run(
        [
            sys.executable,
            "evaluate.py",
            f"experiment={experiment}",
            f"hydra.run.dir={run_dir}",
            *overrides,
            *extra,
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{table}-", dir=out))
    try:
        _collect(run_dir, staging, panels)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    target = out / table
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    print(f"\n{table}: results in {target}", flush=True)
    return target


def _collect(run_dir: Path, staging: Path, panels: int) -> None:
    """Copy the tables, the curve plots and the first ``panels`` per-class panels."""
    for name in (
        "results.md",
        "results.json",
        "iou_curves.png",
        "deletion_curves.png",
        "insertion_curves.png",
    ):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, staging / name)
    if (run_dir / "sanity_curves.png").is_file():
        compact_png(run_dir / "sanity_curves.png", staging / "sanity_curves.png", width=2000)
    if (run_dir / "dissection.png").is_file():
        compact_png(run_dir / "dissection.png", staging / "dissection.png")
    for path in sorted((run_dir / "panels").glob("*.png"))[:panels]:
        compact_png(path, staging / f"panel_{path.name}")


def compact_png(source: Path, target: Path, width: int = 1400) -> None:
    """A smaller copy for the repository: at most ``width`` pixels wide, 256 colours."""
    from PIL import Image

    with Image.open(source) as image:
        image = image.convert("RGB")
        if image.width > width:
            image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        image.quantize(256).save(target, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("table", choices=[*TABLES, "all"])
    parser.add_argument("overrides", nargs="*", help="extra evaluate.py overrides (after --)")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder of the tables (default {DEFAULT_OUT.relative_to(ROOT)}; "
        f"{RECORDED.relative_to(ROOT)} updates the recorded ones)",
    )
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.overrides = [*args.overrides, *extra]
    (ROOT / "logs").mkdir(exist_ok=True)
    for table in TABLES if args.table == "all" else [args.table]:
        reproduce(table, args.overrides, args.out.resolve())


if __name__ == "__main__":
    main()
