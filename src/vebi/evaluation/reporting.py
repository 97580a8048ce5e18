"""Evaluation results as markdown tables, figures (PNG) and W&B tables, plots and panels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import matplotlib
import numpy as np
import torch
from lightning.pytorch.loggers import Logger, WandbLogger
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from vebi.evaluation.data import EvaluationImages
from vebi.explain.figures import overlay, save_figure, to_rgb
from vebi.utils.io import unique_file_names
from vebi.utils.wandb_media import log_figures

ABLATION_COLUMNS = (
    "drop_own",
    "random_drop_own_mean",
    "random_drop_own_std",
    "drop_others",
    "random_drop_others_mean",
    "random_drop_others_std",
)


def _arrow(higher_is_better: bool) -> str:
    return " (higher better)" if higher_is_better else " (lower better)"


def heatmap_metric_names(
    results: Mapping[str, Mapping[str, Any]], info: Mapping[str, Any]
) -> list[str]:
    """The headline metrics present, in the configured order, then the timing."""
    present = {key for row in results.values() for key in row}
    return [m for m in info["directions"] if m in present] + ["seconds_per_image"]


def heatmap_table(results: Mapping[str, Mapping[str, Any]], info: Mapping[str, Any]) -> str:
    """Markdown: a row per method, a column per metric (direction in the header, best bold)."""
    directions = info["directions"]
    metrics = heatmap_metric_names(results, info)
    best = {}
    for metric in metrics[:-1]:
        values = [row[metric] for row in results.values()]
        best[metric] = max(values) if directions[metric] else min(values)
    header = "| method | " + " | ".join(
        f"{m}{' ↑' if directions[m] else ' ↓'}" if m in directions else "s / image" for m in metrics
    )
    lines = [header + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, row in results.items():
        cells = []
        for metric in metrics:
            value = row[metric]
            text = f"{value:.2e}" if 0 < abs(value) < 0.01 else f"{value:.4f}"
            cells.append(f"**{text}**" if best.get(metric) == value else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(rows: Sequence[Mapping[str, Any]], average: Mapping[str, float]) -> str:
    """Markdown: accuracy drops (percentage points) of the relevant vs random feature sets,
    and of the sets other pickers chose at the same size and layers (CRP's), where compared."""
    compared = [k.removesuffix("_drop_own") for k in average if k.endswith("_drop_own")]
    compared = [name for name in compared if name != "random"]
    lines = [
        "| class | # features | drop on class, relevant | drop on class, random (mean ± std) "
        + "".join(f"| drop on class, {name}'s pick " for name in compared)
        + "| drop on others, relevant | drop on others, random (mean ± std) "
        + "".join(f"| drop on others, {name}'s pick " for name in compared)
        + "|",
        "|---|---|---|---|---|---|" + "---|" * (2 * len(compared)),
    ]

    def pct(value: float) -> str:
        return f"{100 * value:.2f}"

    for row in [*rows, {"class": "**mean**", "features": "", **average}]:
        own = "".join(f"{pct(row[f'{name}_drop_own'])} | " for name in compared)
        others = "".join(f" | {pct(row[f'{name}_drop_others'])}" for name in compared)
        lines.append(
            f"| {row['class']} | {row['features']} | {pct(row['drop_own'])} | "
            f"{pct(row['random_drop_own_mean'])} ± {pct(row['random_drop_own_std'])} | {own}"
            f"{pct(row['drop_others'])} | {pct(row['random_drop_others_mean'])} ± "
            f"{pct(row['random_drop_others_std'])}{others} |"
        )
    return "\n".join(lines)


SANITY_TITLES = {
    "spearman": "Spearman rank correlation",
    "spearman_abs": "Spearman rank correlation of |signal|",
    "ssim": "SSIM",
    "hog": "HOG correlation",
}


def _value(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def sanity_tables(sanity: Mapping[str, Any]) -> str:
    """Markdown: every similarity after the whole network is randomised (mean ± std), then
    |Spearman| after each step of the cascade."""
    methods = sanity["methods"]
    similarities = list(sanity["similarities"])
    lines = [
        "| method | " + " | ".join(f"{s} ↓" for s in similarities) + " |",
        "|---|" + "---|" * len(similarities),
    ]
    for name, curves in methods.items():
        cells = [
            f"{_value(curves[f'{s}_mean'][-1])} ± {_value(curves[f'{s}_std'][-1])}"
            for s in similarities
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    steps = [step["name"] for step in sanity["steps"]]
    lines += [
        "",
        "Spearman rank correlation of |signal| with the trained network's map after each step "
        "(the layers from the logits down to the named one re-initialised):",
        "",
        "| method | " + " | ".join(steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for name, curves in methods.items():
        lines.append(
            f"| {name} | " + " | ".join(_value(v) for v in curves["spearman_abs_mean"]) + " |"
        )
    if sanity.get("data_randomisation"):
        lines += [
            "",
            "Data randomisation: similarity to the maps of the same network trained on randomly "
            "permuted labels (its own W), mean ± std:",
            "",
            "| method | " + " | ".join(f"{s} ↓" for s in similarities) + " |",
            "|---|" + "---|" * len(similarities),
        ]
        for name, values in sanity["data_randomisation"].items():
            cells = [f"{values[f'{s}_mean']:.3f} ± {values[f'{s}_std']:.3f}" for s in similarities]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sanity_figure(sanity: Mapping[str, Any]) -> Figure:
    """One panel per similarity: the mean over images after each randomisation step, a line
    per method (ours drawn thicker, with the trained W kept dashed); the spreads are in the
    tables."""
    similarities = list(sanity["similarities"])
    steps = [step["name"] for step in sanity["steps"]]
    figure = Figure(figsize=(4.2 * len(similarities), 4.2), layout="constrained")
    axes = figure.subplots(1, len(similarities), sharey=True, squeeze=False)[0]
    colours = cast(Sequence[Any], cast(ListedColormap, matplotlib.colormaps["tab20"]).colors)
    xs = list(range(len(steps) + 1))
    for axis, similarity in zip(axes, similarities, strict=True):
        for i, (name, curves) in enumerate(sanity["methods"].items()):
            means = [1.0, *(float("nan") if v is None else v for v in curves[f"{similarity}_mean"])]
            colour = colours[(2 * i) % 20 + (i >= 10)]
            ours = name.startswith("vebi")
            axis.plot(
                xs,
                means,
                label=name,
                color=colour,
                linewidth=2.2 if ours else 1.2,
                linestyle="--" if name.endswith("/original_W") else "-",
                marker="o",
                markersize=3,
            )
        axis.set_xticks(xs, ["trained", *steps], rotation=60, ha="right", fontsize=7)
        axis.set_title(SANITY_TITLES.get(similarity, similarity), fontsize=10)
        axis.axhline(0, color="grey", linewidth=0.6)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("similarity to the trained network's map")
    axes[-1].legend(fontsize=6, ncols=1, loc="upper left", bbox_to_anchor=(1.02, 1))
    figure.suptitle(
        f"Cascading randomisation ({sanity['granularity']} by {sanity['granularity']}, "
        f"{sanity['num_images']} images): lower is better",
        fontsize=10,
    )
    return figure


def _share(value: Any) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.0f} %"


def dissection_tables(dissection: Mapping[str, Any]) -> str:
    """Markdown: per class the share of its relevant features (and of their weight) labelled
    with a deciding part against the random sets, then every feature's label."""
    lines = [
        "| class | relevant features | with a spatial map | on a deciding part ↑ | "
        "weight on a deciding part ↑ | random sets: on a deciding part | random sets: weight |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in dissection["per_class"]:
        lines.append(
            f"| {row['class']} | {row['features']} | {row['spatial_features']} | "
            f"{_share(row['deciding_share'])} | {_share(row['deciding_weight_share'])} | "
            f"{_share(row['random_deciding_share_mean'])} ± "
            f"{_share(row['random_deciding_share_std'])} | "
            f"{_share(row['random_deciding_weight_share_mean'])} ± "
            f"{_share(row['random_deciding_weight_share_std'])} |"
        )
    average = dissection["average"]
    lines.append(
        f"| **mean** |  |  | {_share(average['deciding_share'])} | "
        f"{_share(average['deciding_weight_share'])} | "
        f"{_share(average['random_deciding_share_mean'])} ± "
        f"{_share(average['random_deciding_share_std'])} | "
        f"{_share(average['random_deciding_weight_share_mean'])} ± "
        f"{_share(average['random_deciding_weight_share_std'])} |"
    )
    counts = ", ".join(f"{part} {n}" for part, n in dissection["label_counts"].items())
    lines += [
        "",
        f"Labels of the relevant features: {counts}.",
        "",
        "| class | feature | weight | part | IoU | note |",
        "|---|---|---|---|---|---|",
    ]
    for entry in dissection["features"]:
        iou = entry["iou"]
        lines.append(
            f"| {entry['class']} | {entry['layer']}/{entry['channel']} | {entry['weight']:.3f} | "
            f"{entry['part'] or '-'} | {'-' if iou is None else f'{iou:.3f}'} | "
            f"{entry['note'] or ''} |"
        )
    return "\n".join(lines)


def dissection_figure(dissection: Mapping[str, Any]) -> Figure:
    """Left: per class, the share of relevant features on a deciding part against the random
    sets (mean ± std); right: how many relevant features each part labels."""
    figure = Figure(figsize=(11, 3.8), layout="constrained")
    shares, counts = figure.subplots(1, 2, width_ratios=[3, 1])
    rows = dissection["per_class"]
    xs = np.arange(len(rows))
    nan = float("nan")
    shares.bar(
        xs - 0.2,
        [nan if r["deciding_share"] is None else r["deciding_share"] for r in rows],
        0.4,
        label="relevant features",
        color="#d62728",
    )
    shares.bar(
        xs + 0.2,
        [
            nan if r["random_deciding_share_mean"] is None else r["random_deciding_share_mean"]
            for r in rows
        ],
        0.4,
        yerr=[r["random_deciding_share_std"] or 0.0 for r in rows],
        label=f"random sets ({dissection['draws']} per class)",
        color="#7f7f7f",
        capsize=2,
    )
    shares.set_xticks(xs, [r["class"] for r in rows], rotation=60, ha="right", fontsize=7)
    shares.set_ylim(0, 1.3)
    shares.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    shares.set_ylabel("share on a deciding part")
    shares.set_title(
        "Relevant features whose best part is a deciding one "
        f"({', '.join(dissection['deciding_parts'])})",
        fontsize=9,
    )
    shares.legend(fontsize=7, ncols=2, loc="upper left")
    labels = dissection["label_counts"]
    counts.bar(
        list(labels),
        list(labels.values()),
        color=["#d62728" if p in dissection["deciding_parts"] else "#7f7f7f" for p in labels],
    )
    counts.set_title("labels of the relevant features", fontsize=9)
    counts.tick_params(axis="x", rotation=60, labelsize=7)
    return figure


def results_markdown(result: Mapping[str, Any]) -> str:
    """The whole ``results.md``."""
    parts = [f"# Evaluation of `{result.get('checkpoint') or result.get('model')}`", ""]
    parts.append(
        f"{result['num_test_images']} test images; relevant features "
        f"{result['relevant_features']} (mu = {result['mu']})."
    )
    parts += ["", "| metric | value |", "|---|---|"]
    parts += [f"| {name} | {value:.4f} |" for name, value in result["metrics"].items()]
    if "ablation" in result:
        ablation = result["ablation"]
        parts += [
            "",
            f"## Relevance by ablation ({ablation['draws']} random sets per class, "
            f"{ablation['num_images']} images; accuracy drops in percentage points)",
            "",
            ablation_table(ablation["per_class"], ablation["average"]),
        ]
    if result.get("heatmaps"):
        heatmaps = result["heatmaps"]
        parts += [
            "",
            f"## Heatmaps ({heatmaps['num_images']} test images, explaining the "
            f"{heatmaps['target']} class)",
            "",
            heatmap_table(heatmaps["methods"], heatmaps["metrics"]),
        ]
    if result.get("sanity"):
        sanity = result["sanity"]
        mined = (
            f"W mined again at every step on {sanity['mining_images'] or 'all'} training images"
            if sanity.get("remined")
            else "ours with the trained W kept only"
        )
        parts += [
            "",
            f"## Sanity: cascading randomisation ({len(sanity['steps'])} steps, "
            f"{sanity['granularity']} by {sanity['granularity']}, {sanity['num_images']} test "
            f"images; {mined}; similarity to the trained network's maps after the whole "
            "network is randomised, mean ± std: lower is better)",
            "",
            sanity_tables(sanity),
        ]
    if result.get("dissection"):
        dissection = result["dissection"]
        parts += [
            "",
            f"## Dissection: the part each relevant feature detects ({dissection['num_images']} "
            f"test images; region: the upsampled map at or above its {dissection['quantile']} "
            f"quantile; label: the part of highest IoU, if >= {dissection['iou_floor']}; "
            f"deciding parts: {', '.join(dissection['deciding_parts'])})",
            "",
            dissection_tables(dissection),
        ]
    parts += ["", *[f"- {note}" for note in result.get("notes", [])]]
    return "\n".join(parts).rstrip() + "\n"


def curves_figure(
    results: Mapping[str, Mapping[str, Any]], key: str, xs: list[float], x_label: str, title: str
) -> Figure:
    """One line per method of ``results[method][key + '_curve']`` at ``xs``."""
    figure = Figure(figsize=(5.5, 3.6))
    axis = figure.subplots()
    colours = cast(Sequence[Any], cast(ListedColormap, matplotlib.colormaps["tab20"]).colors)
    for i, (name, row) in enumerate(results.items()):
        curve = row[f"{key}_curve"]
        axis.plot(
            xs,
            curve,
            label=name,
            color=colours[(2 * i) % 20 + (i >= 10)],
            linewidth=2.2 if name.startswith("vebi") else 1.2,
        )
    axis.set_xlabel(x_label)
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncols=2)
    return figure


def panel_figure(
    images: torch.Tensor, maps: Mapping[str, torch.Tensor], masks: torch.Tensor | None, heading: str
) -> Figure:
    """A row per image: the input (mask outlined), then each method's overlay."""
    columns = 1 + len(maps)
    figure = Figure(figsize=(1.7 * columns, 1.8 * len(images)))
    axes = figure.subplots(len(images), columns, squeeze=False)
    for row, image in enumerate(images):
        axes[row, 0].imshow(to_rgb(image))
        if masks is not None:
            axes[row, 0].contour(
                masks[row].float().numpy(), levels=[0.5], colors="white", linewidths=0.8
            )
        for column, (name, method_maps) in enumerate(maps.items(), start=1):
            axes[row, column].imshow(overlay(image, method_maps[row]))
            if row == 0:
                axes[row, column].set_title(name, fontsize=7)
    axes[0, 0].set_title("input", fontsize=7)
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle(heading, fontsize=9)
    return figure


def panel_rows(labels: torch.Tensor, per_class: int) -> dict[int, torch.Tensor]:
    """For each class, the positions of its first ``per_class`` images in ``labels``."""
    return {int(c): (labels == c).nonzero()[:per_class, 0] for c in labels.unique()}


def class_panels(
    images: EvaluationImages,
    rows: Mapping[int, torch.Tensor],
    maps: Mapping[str, torch.Tensor],
    class_names: Sequence[str],
) -> dict[str, Figure]:
    """A panel per class (file-safe class name -> figure) of the images at ``rows[c]``.

    ``maps[method]`` holds each method's maps of the images of ``rows`` in order, class after
    class (what :class:`HeatmapEvaluation` keeps when given ``keep = cat(rows.values())``).
    """
    panels, position = {}, 0
    file_names = unique_file_names(class_names)  # "zero/one" and "zero_one" do not collide
    for c, members in rows.items():
        count = len(members)
        panels[file_names[c]] = panel_figure(
            images.images[members],
            {name: m[position : position + count] for name, m in maps.items()},
            None if images.masks is None else images.masks[members],
            f"class {class_names[c]}: heatmaps of each method",
        )
        position += count
    return panels


def save_figures(
    result: Mapping[str, Any], panels: Mapping[str, Figure], output_dir: Path
) -> dict[str, Path]:
    """Write the curve plots and the per-class panels as PNGs; return name -> path."""
    paths: dict[str, Path] = {}
    heatmaps = result.get("heatmaps") or {}
    methods = heatmaps.get("methods", {})
    first: dict[str, Any] = next(iter(methods.values()), {})
    for key, curve in (heatmaps.get("metrics") or {}).get("curves", {}).items():
        if f"{key}_curve" in first:
            figure = curves_figure(methods, key, curve["x"], curve["x_label"], curve["title"])
            paths[f"{key}_curves"] = save_figure(figure, output_dir / f"{key}_curves.png")
    if result.get("sanity"):
        paths["sanity_curves"] = save_figure(
            sanity_figure(result["sanity"]), output_dir / "sanity_curves.png"
        )
    if result.get("dissection"):
        paths["dissection"] = save_figure(
            dissection_figure(result["dissection"]), output_dir / "dissection.png"
        )
    for name, figure in panels.items():
        paths[f"panel/{name}"] = save_figure(figure, output_dir / "panels" / f"{name}.png")
    return paths


def log_to_wandb(
    loggers: Sequence[Logger], result: Mapping[str, Any], figures: Mapping[str, Path]
) -> None:
    """Summary metrics, a table per evaluator (a row per method/class), line plots of the IoU,
    deletion and insertion curves (``wandb.plot.line_series``) and the heatmap panels."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        run = logger.experiment
        summary = dict(result["metrics"])  # named test/... already
        if "ablation" in result:
            summary |= {f"ablation/{k}": v for k, v in result["ablation"]["average"].items()}
            rows = result["ablation"]["per_class"]
            columns: list[str | int] = ["class", "features", *ABLATION_COLUMNS]
            run.log(
                {
                    "ablation/per_class": wandb.Table(
                        columns=columns, data=[[row[c] for c in columns] for row in rows]
                    )
                }
            )
        heatmaps = result.get("heatmaps") or {}
        methods = heatmaps.get("methods", {})
        if methods:
            info = heatmaps["metrics"]
            directions = info["directions"]
            metrics = heatmap_metric_names(methods, info)
            for name, row in methods.items():
                summary |= {f"heatmaps/{name}/{m}": row[m] for m in metrics}
            present = set(metrics)
            for group, names in info["groups"].items():
                shown = [m for m in names if m in present]
                if not shown:
                    continue
                shown.append("seconds_per_image")
                table = wandb.Table(
                    columns=[
                        "method",
                        *[m + (_arrow(directions[m]) if m in directions else "") for m in shown],
                    ],
                    data=[[name, *[row[m] for m in shown]] for name, row in methods.items()],
                )
                run.log({f"heatmaps/{group}": table})
            for key, curve in info["curves"].items():
                if f"{key}_curve" not in next(iter(methods.values())):
                    continue
                run.log(
                    {
                        f"heatmaps/{key}_curves": wandb.plot.line_series(
                            xs=curve["x"],
                            ys=[row[f"{key}_curve"] for row in methods.values()],
                            keys=list(methods),
                            title=f"{key} curves",
                            xname=curve["x_label"],
                        )
                    }
                )
        if result.get("sanity"):
            summary |= _log_sanity(run, result["sanity"], figures.get("sanity_curves"))
        if result.get("dissection"):
            summary |= _log_dissection(run, result["dissection"], figures.get("dissection"))
        panels = {k: v for k, v in figures.items() if k.startswith("panel/")}
        if panels:
            log_figures(
                [logger],
                "heatmaps/panels",
                list(panels.values()),
                [k.removeprefix("panel/") for k in panels],
            )
        run.summary.update(summary)


def _log_sanity(run: Any, sanity: Mapping[str, Any], figure: Path | None) -> dict[str, float]:
    """The sanity check to a W&B run: a table (a row per method and step), a line plot per
    similarity over the steps and the figure; returns the summary values after the last
    step (``sanity/<method>/<similarity>``)."""
    import wandb

    steps = [step["name"] for step in sanity["steps"]]
    similarities = list(sanity["similarities"])
    columns: list[str | int] = ["method", "step", "randomised down to"]
    columns += [f"{s}_{stat}" for s in similarities for stat in ("mean", "std")]
    rows = [
        [name, i + 1, step, *(curves[key][i] for key in columns[3:])]
        for name, curves in sanity["methods"].items()
        for i, step in enumerate(steps)
    ]
    run.log({"sanity/steps": wandb.Table(columns=columns, data=rows)})
    for similarity in similarities:
        run.log(
            {
                f"sanity/{similarity}": wandb.plot.line_series(
                    xs=list(range(1, len(steps) + 1)),
                    ys=[
                        [float("nan") if v is None else v for v in c[f"{similarity}_mean"]]
                        for c in sanity["methods"].values()
                    ],
                    keys=list(sanity["methods"]),
                    title=f"{SANITY_TITLES.get(similarity, similarity)} after each step",
                    xname="randomisation step (from the logits down)",
                )
            }
        )
    if figure is not None:
        run.log({"sanity/curves": wandb.Image(str(figure))})
    summary = {
        f"sanity/{name}/{s}": curves[f"{s}_mean"][-1]
        for name, curves in sanity["methods"].items()
        for s in similarities
        if curves[f"{s}_mean"][-1] is not None
    }
    for name, values in (sanity.get("data_randomisation") or {}).items():
        summary |= {
            f"sanity/data_randomisation/{name}/{s}": values[f"{s}_mean"] for s in similarities
        }
    return summary


def _log_dissection(
    run: Any, dissection: Mapping[str, Any], figure: Path | None
) -> dict[str, float]:
    """The dissection to a W&B run: a table per class and per feature, and the figure;
    returns the averages (``dissection/<key>``)."""
    import wandb

    rows = dissection["per_class"]
    columns: list[str | int] = list(rows[0])
    run.log(
        {
            "dissection/per_class": wandb.Table(
                columns=columns, data=[[r[c] for c in columns] for r in rows]
            )
        }
    )
    feature_columns: list[str | int] = [
        "class",
        "layer",
        "channel",
        "weight",
        "part",
        "iou",
        "note",
    ]
    run.log(
        {
            "dissection/features": wandb.Table(
                columns=feature_columns,
                data=[[e[c] for c in feature_columns] for e in dissection["features"]],
            )
        }
    )
    if figure is not None:
        run.log({"dissection/figure": wandb.Image(str(figure))})
    return {f"dissection/{k}": v for k, v in dissection["average"].items() if v is not None}
