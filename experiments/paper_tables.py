"""Reproduce the paper-style tables: MNIST relevance by ablation, an8Flower localisation.

    python experiments/paper_tables.py mnist_relevance      # ablation + faithfulness, LeNet
    python experiments/paper_tables.py an8flower_single     # all methods, all metrics
    python experiments/paper_tables.py an8flower_double
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
}


def _run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    if subprocess.run(command, cwd=ROOT, check=False).returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}")


def _has_checkpoint(experiment: str) -> bool:
    return any((ROOT / "logs" / "train" / experiment).glob("*/checkpoints/best.ckpt"))


def reproduce(table: str, extra: list[str], out: Path = DEFAULT_OUT) -> Path:
    """Train if needed, evaluate, and copy the results into ``<out>/<table>``."""
    experiment, overrides, panels = TABLES[table]
    if not _has_checkpoint(experiment):
        print(f"No checkpoint of {experiment}: training one first", flush=True)
        _run([sys.executable, "train.py", f"experiment={experiment}"])
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
