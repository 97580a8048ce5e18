"""Evaluation results as markdown tables, figures (PNG) and W&B tables, plots and panels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import torch
from lightning.pytorch.loggers import Logger, WandbLogger
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
    """Markdown: accuracy drops (percentage points) of the relevant vs random feature sets."""
    lines = [
        "| class | # features | drop on class, relevant | drop on class, random (mean ± std) "
        "| drop on others, relevant | drop on others, random (mean ± std) |",
        "|---|---|---|---|---|---|",
    ]

    def pct(value: float) -> str:
        return f"{100 * value:.2f}"

    for row in [*rows, {"class": "**mean**", "features": "", **average}]:
        lines.append(
            f"| {row['class']} | {row['features']} | {pct(row['drop_own'])} | "
            f"{pct(row['random_drop_own_mean'])} ± {pct(row['random_drop_own_std'])} | "
            f"{pct(row['drop_others'])} | {pct(row['random_drop_others_mean'])} ± "
            f"{pct(row['random_drop_others_std'])} |"
        )
    return "\n".join(lines)


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
    parts += ["", *[f"- {note}" for note in result.get("notes", [])]]
    return "\n".join(parts).rstrip() + "\n"


def curves_figure(
    results: Mapping[str, Mapping[str, Any]], key: str, xs: list[float], x_label: str, title: str
) -> Figure:
    """One line per method of ``results[method][key + '_curve']`` at ``xs``."""
    figure = Figure(figsize=(5.5, 3.6))
    axis = figure.subplots()
    colours = matplotlib.colormaps["tab20"].colors
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
    first = next(iter(methods.values()), {})
    for key, curve in (heatmaps.get("metrics") or {}).get("curves", {}).items():
        if f"{key}_curve" in first:
            figure = curves_figure(methods, key, curve["x"], curve["x_label"], curve["title"])
            paths[f"{key}_curves"] = save_figure(figure, output_dir / f"{key}_curves.png")
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
            columns = ["class", "features", *ABLATION_COLUMNS]
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
                columns = [m for m in names if m in present]
                if not columns:
                    continue
                columns.append("seconds_per_image")
                table = wandb.Table(
                    columns=[
                        "method",
                        *[m + (_arrow(directions[m]) if m in directions else "") for m in columns],
                    ],
                    data=[[name, *[row[m] for m in columns]] for name, row in methods.items()],
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
        panels = {k: v for k, v in figures.items() if k.startswith("panel/")}
        if panels:
            log_figures(
                [logger],
                "heatmaps/panels",
                list(panels.values()),
                [k.removeprefix("panel/") for k in panels],
            )
        run.summary.update(summary)
