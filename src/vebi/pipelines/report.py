"""The run report: ``report.html`` in a run dir, a page a person opens to see what the network
relies on, class by class (``python report.py <run dir> [<run dir> ...]``).

It is built from the files the jobs write (no second drawing code: the images are the PNGs
that W&B gets too), opens from the file system and from any static server, and needs no
network: no script, font or style sheet is fetched, images are relative links.

* ``report.html``: the overview (model, data, accuracies, mu, m, the layers and their feature
  counts, timings, the settings), the evaluation's tables (metric directions, the best value
  per column marked) and curves, the explanations, and a class index with a search box;
* ``report/class_<c>.html``, one page per class (1000 ImageNet classes stay light): its
  relevant features ranked by weight (features relevant to several classes marked and linked
  to those classes), their average visualisations (the class's gallery), its ablation row
  against random sets, its heatmap panel and the explanations predicted as that class.

What a run lacks (no mined features, no evaluation) is said on the page, not guessed.
"""

from __future__ import annotations

import functools
import html
import json
import os
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vebi.errors import VebiError
from vebi.explain.interpretation import gallery_file
from vebi.mining.reporting import ARTEFACT_NAME
from vebi.utils.io import atomic_path
from vebi.utils.log import get_logger

log = get_logger(__name__)

REPORT_NAME = "report.html"
#: The marker in the head of every page this module writes: ``--out`` replaces only files
#: that carry it (a report made before), never another file.
GENERATOR_MARK = '<meta name="generator" content="vebi report">'
#: Largest run file read (results.json, summary.json, ...): jobs write a few MB at most.
MAX_RUN_FILE_BYTES = 64 * 2**20
#: Largest ``.hydra/*.yaml`` read (Hydra writes a few kB).
MAX_CONFIG_BYTES = 2 * 2**20

#: The numbers shown first in the overview, and those left out (steps, duplicates).
HEADLINE = (
    "test/acc",
    "test/sparse_accuracy",
    "test/network_accuracy",
    "val/acc_best",
    "mining/sparse_accuracy_val",
    "mining/sparse_accuracy_train",
    "mu",
    "m (features)",
    "mining images",
    "train_seconds",
    "mining/solve_seconds",
)
HIDDEN = ("train/loss_step", "train/loss_epoch", "mining/mu")

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;
background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c9d1e0}main{padding:8px 24px 40px;max-width:1400px}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;margin:16px 0;padding:12px 16px}
h2{font-size:17px;margin:4px 0 10px}h3{font-size:15px;margin:12px 0 6px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #e1e4ea;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f0f2f5}td.num{text-align:right;
font-variant-numeric:tabular-nums}.best{font-weight:700;background:#e6f4ea}
.note{color:#8a5a00;background:#fff6e0;border-left:3px solid #f0b429;padding:6px 10px;margin:6px 0}
img{max-width:100%;border:1px solid #e1e4ea;border-radius:4px;background:#fff}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{width:300px}.card img{width:300px}
.index{columns:4 220px;list-style:none;padding:0}.index li{margin:2px 0}
#search{font-size:14px;padding:5px 8px;width:320px;margin:4px 0 8px}
.shared{color:#6b3fa0;font-size:12px}a{color:#1a56db}small{color:#667}
.card.wide{width:440px}.card.wide img{width:440px}.ok{color:#1a7f37;font-weight:600}
.wrong{color:#b42318;font-weight:600}
"""

SEARCH_SCRIPT = """
document.getElementById('search').addEventListener('input', function (event) {
  var wanted = event.target.value.toLowerCase();
  var shown = 0;
  document.querySelectorAll('#classes li').forEach(function (item) {
    var hit = item.dataset.name.indexOf(wanted) >= 0;
    item.style.display = hit ? '' : 'none';
    shown += hit ? 1 : 0;
  });
  document.getElementById('shown').textContent = shown;
});
"""


@dataclass
class RunFiles:
    """What one run dir holds, read from its files."""

    folder: Path
    task: str
    config: dict[str, Any]
    overrides: list[str]
    relevant: dict[str, Any] | None = None  # relevant_features.json
    relevant_path: Path | None = None
    galleries: dict[int, Path] = field(default_factory=dict)
    top_images: dict[int, Path] = field(default_factory=dict)
    results: dict[str, Any] | None = None  # evaluate.py's results.json
    explanations: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None  # train.py's summary.json


def _read_limited(path: Path, limit: int) -> str:
    """The text of ``path``, refused beyond ``limit`` bytes (said before anything is read)."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise VebiError(
                f"cannot read {path}: {size / 2**20:.1f} MB, more than a vebi job writes "
                f"({limit / 2**20:.0f} MB at most); is it the file the job wrote?"
            )
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise VebiError(f"cannot read {path}: not UTF-8 text ({error.reason})") from None
    except OSError as error:
        raise VebiError(f"cannot read {path}: {error.strerror or error}") from None


def _read_json(path: Path, kind: type = dict) -> Any:
    """A run file written by a vebi job: JSON whose top level is a ``kind``."""
    try:
        value = json.loads(_read_limited(path, MAX_RUN_FILE_BYTES))
    except json.JSONDecodeError as error:
        raise VebiError(f"cannot read {path}: not JSON ({error})") from None
    except RecursionError:
        raise VebiError(f"cannot read {path}: nested too deeply") from None
    if not isinstance(value, kind):
        raise VebiError(
            f"cannot read {path}: a {type(value).__name__} where the job writes a "
            f"{kind.__name__}; rerun the job that wrote it"
        )
    return value


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: Hydra never writes them, and nested aliases expand
    into gigabytes (a "billion laughs" file)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("YAML aliases are not allowed in a run's Hydra files")
        return super().compose_node(parent, index)


def _read_yaml(path: Path, kind: type) -> Any:
    """A ``.hydra/*.yaml`` file: plain YAML whose top level is a ``kind`` (empty: one)."""
    try:
        value = yaml.load(_read_limited(path, MAX_CONFIG_BYTES), Loader=_NoAliasLoader)
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())
        raise VebiError(f"cannot read {path}: not valid YAML ({reason})") from None
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise VebiError(f"cannot read {path}: a {type(value).__name__}, not a {kind.__name__}")
    return value


def _relevant_summary(folder: Path, used: Sequence[Path]) -> Path | None:
    """The relevant_features.json of a run: its own, else the one its job used (the
    evaluation's features, the training run of the explained checkpoint). A path a run file
    names counts only when it is a mining artefact (``relevant_features.h5`` or ``.json``),
    so a results.json cannot pull another JSON file into the page."""
    candidates = [folder / "relevant_features.json", folder / "mining" / "relevant_features.json"]
    candidates += [
        path.with_suffix(".json") for path in used if path.stem == Path(ARTEFACT_NAME).stem
    ]
    return next((path for path in candidates if path.is_file()), None)


def _job_directory(folder: Path) -> Path | None:
    """The working directory the run's job was started from (Hydra keeps it in
    ``.hydra/hydra.yaml``): relative paths in its files are relative to it."""
    hydra_file = folder / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return None
    try:
        cwd = ((_read_yaml(hydra_file, dict).get("hydra") or {}).get("runtime") or {}).get("cwd")
    except (VebiError, AttributeError):
        return None
    return Path(cwd) if isinstance(cwd, str) and cwd else None


#: What each job leaves in its run dir (a folder with none of them is no run dir).
RUN_ARTEFACTS = (
    "summary.json",
    "mining",
    "relevant_features.json",
    "results.json",
    "explanations",
)


def _task_of(artefacts: Sequence[Path]) -> str:
    names = {path.name for path in artefacts}
    for name, task in (
        ("results.json", "evaluate"),
        ("explanations", "explain"),
        ("summary.json", "train"),
        ("relevant_features.json", "mine"),
    ):
        if name in names:
            return task
    return "train"


def read_run(folder: str | os.PathLike[str]) -> RunFiles:
    """The files of a vebi run dir (train, mine, explain or evaluate); a folder that is not
    one is a :class:`VebiError` that says what a run dir holds."""
    folder = Path(folder)
    config_file = folder / ".hydra" / "config.yaml"
    artefacts = [folder / name for name in RUN_ARTEFACTS if (folder / name).exists()]
    if not folder.is_dir() or not (config_file.is_file() or artefacts):
        raise VebiError(
            f"{folder} is not a vebi run dir (no .hydra/config.yaml, none of "
            f"{', '.join(RUN_ARTEFACTS)}): pass the folder a job printed as its run files, "
            "e.g. logs/train/mnist/<timestamp>"
        )
    config = _read_yaml(config_file, dict) if config_file.is_file() else {}
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = _read_yaml(overrides_file, list) if overrides_file.is_file() else []
    task = config.get("task_name") or _task_of(artefacts)
    run = RunFiles(folder, str(task), config, [str(o) for o in overrides])
    if (folder / "results.json").is_file():
        run.results = _read_json(folder / "results.json")
    if (folder / "summary.json").is_file():
        run.summary = _read_json(folder / "summary.json")
    used = []
    if run.results and run.results.get("relevant_features"):
        used.append(Path(str(run.results["relevant_features"])))
    explanations = folder / "explanations" / "explanations.json"
    if explanations.is_file():
        written = _read_json(explanations)
        records = written.get("explanations", [])
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise VebiError(f"cannot read {explanations}: 'explanations' is not a list of records")
        for record in records:
            record["figure_path"] = explanations.parent / Path(str(record.get("figure"))).name
        run.explanations = records
        if written.get("checkpoint"):  # the features mined in the checkpoint's training run
            used.append(Path(str(written["checkpoint"])).parent.parent / "mining" / ARTEFACT_NAME)
    # relative paths were written relative to the directory the job ran from
    started_in = _job_directory(folder) or Path.cwd()
    used = [path if path.is_absolute() else started_in / path for path in used]
    run.relevant_path = _relevant_summary(folder, used)
    if run.relevant_path is not None:
        run.relevant = _read_json(run.relevant_path)
        names = run.relevant.get("class_names", [])
        gallery_dir = run.relevant_path.parent / "galleries"
        for class_id, name in enumerate(names):
            path = gallery_file(gallery_dir, class_id, str(name))
            if path.is_file():
                run.galleries[class_id] = path
            top = gallery_file(gallery_dir, class_id, str(name), "top")
            if top.is_file():
                run.top_images[class_id] = top
    return run


# ------------------------------------------------------------------ html pieces
def _e(value: Any) -> str:
    return html.escape(str(value))


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return _e(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def _cell(value: Any) -> str:
    """A right-aligned number cell."""
    return f'<td class="num">{_number(value)}'


def _spread(mean: Any, std: Any) -> str:
    """A ``mean ± std`` cell."""
    return f'<td class="num">{_number(mean)} ± {_number(std)}'


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table of already escaped cells (``<td>`` added unless a cell starts with ``<td``)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path, page_dir: Path, alt: str) -> str:
    """An ``<img>`` whose relative link is URL-encoded (a run path with ``#``, ``?`` or ``%``
    is a path, not a fragment, a query or an escape)."""
    link = urllib.parse.quote(Path(os.path.relpath(path, page_dir)).as_posix())
    return f'<img src="{_e(link)}" alt="{_e(alt)}" loading="lazy">'


def _page(title: str, subtitle: str, body: str, script: str = "") -> str:
    tail = f"<script>{script}</script>" if script else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'{GENERATOR_MARK}<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p>{_e(subtitle)}</p></header><main>{body}</main>"
        f"{tail}</body></html>"
    )


def _note(text: str) -> str:
    return f'<div class="note">{_e(text)}</div>'


# ------------------------------------------------------------------ the report
@dataclass
class _Report:
    runs: list[RunFiles]
    out: Path

    @property
    def pages(self) -> Path:
        """The folder of the class pages: the report's name without ``.html`` (``report.html``
        -> ``report/``), so two reports in one folder never share a page."""
        return class_pages(self.out)

    @property
    def relevant(self) -> dict[str, Any] | None:
        return next((r.relevant for r in self.runs if r.relevant), None)

    @property
    def class_names(self) -> list[str]:
        if self.relevant:
            return [str(n) for n in self.relevant.get("class_names", [])]
        for run in self.runs:
            if run.results and run.results.get("ablation"):
                return [str(row["class"]) for row in run.results["ablation"]["per_class"]]
        return []

    def gallery(self, class_id: int) -> Path | None:
        return next((r.galleries[class_id] for r in self.runs if class_id in r.galleries), None)

    def top_images(self, class_id: int) -> Path | None:
        return next((r.top_images[class_id] for r in self.runs if class_id in r.top_images), None)

    def results(self) -> dict[str, Any] | None:
        return next((r.results for r in self.runs if r.results), None)

    def evaluation_run(self) -> RunFiles | None:
        return next((r for r in self.runs if r.results), None)

    # -------------------------------------------------------------- overview
    def overview(self) -> str:
        rows = []
        for run in self.runs:
            data = (run.config.get("data") or {}).get("_target_", "?")
            model = (run.results or {}).get("model") or run.config.get("ckpt_path")
            if not model and run.config.get("model"):
                net = run.config["model"].get("net") or {}
                model = " ".join(str(net.get(k, "")) for k in ("_target_", "architecture"))
            model = model or "?"
            rows.append(
                [
                    _e(run.task),
                    _e(run.folder.name),
                    _e(data.rsplit(".", 1)[-1]),
                    _e(model),
                    _e(" ".join(run.overrides) or "(defaults)"),
                ]
            )
        parts = [_table(["job", "run", "data", "model", "settings"], rows)]
        metrics: dict[str, Any] = {}
        for run in self.runs:
            metrics.update({k: v for k, v in (run.summary or {}).items() if _is_number(v)})
            metrics.update((run.results or {}).get("metrics", {}))
        relevant = self.relevant
        if relevant:
            counts = relevant.get("class_counts") or []
            metrics.update({f"mining/{k}": v for k, v in relevant.get("metrics", {}).items()})
            metrics["mu"] = relevant.get("mu")
            metrics["m (features)"] = sum(relevant.get("channels", []))
            metrics["mining images"] = sum(counts)
        if metrics:
            shown = [k for k in HEADLINE if k in metrics]
            shown += [k for k in metrics if k not in shown and k not in HIDDEN]
            metrics = {k: metrics[k] for k in shown}
            parts.append(
                "<h3>Numbers</h3>"
                + _table(
                    ["", "value"],
                    [[_e(k), f'<td class="num">{_number(v)}'] for k, v in metrics.items()],
                )
            )
        if relevant:
            per_layer = relevant.get("per_layer_counts", {})
            rows = [
                [
                    _e(layer),
                    f'<td class="num">{channels}',
                    f'<td class="num">{sum(per_layer.get(layer, []))}',
                ]
                for layer, channels in zip(relevant["layers"], relevant["channels"], strict=True)
            ]
            parts.append(
                "<h3>Layers mined</h3>"
                + _table(["layer", "features", "relevant (all classes)"], rows)
            )
        else:
            parts.append(
                _note(
                    "These runs hold no mined features: mine them (python mine.py "
                    "ckpt_path=...) to see what each class relies on."
                )
            )
        return "<section><h2>Overview</h2>" + "".join(parts) + "</section>"

    # -------------------------------------------------------------- evaluation
    def evaluation(self) -> str:
        results = self.results()
        if not results:
            return (
                "<section><h2>Evaluation</h2>"
                + _note("No evaluation in these runs: python evaluate.py ckpt_path=... adds one.")
                + "</section>"
            )
        run = self.evaluation_run()
        assert run is not None
        parts = []
        ablation = results.get("ablation")
        if ablation:
            average = ablation.get("average", {})
            parts.append(
                "<h3>Relevance by ablation (accuracy drop; mean over classes)</h3>"
                + _table(
                    ["", "relevant features", "random sets (mean ± std)"],
                    [
                        [
                            "own class",
                            f'<td class="num">{_number(average.get("drop_own"))}',
                            f'<td class="num">{_number(average.get("random_drop_own_mean"))} ± '
                            f"{_number(average.get('random_drop_own_std'))}",
                        ],
                        [
                            "other classes",
                            f'<td class="num">{_number(average.get("drop_others"))}',
                            f'<td class="num">{_number(average.get("random_drop_others_mean"))} ± '
                            f"{_number(average.get('random_drop_others_std'))}",
                        ],
                    ],
                )
            )
        heatmaps = results.get("heatmaps")
        if heatmaps:
            parts.append(self._heatmap_table(heatmaps))
            figures = [
                run.folder / f"{name}.png"
                for name in ("iou_curves", "deletion_curves", "insertion_curves")
                if (run.folder / f"{name}.png").is_file()
            ]
            if figures:
                parts.append(
                    '<div class="grid">'
                    + "".join(
                        f'<div class="card">{_image(f, self.out.parent, f.stem)}</div>'
                        for f in figures
                    )
                    + "</div>"
                )
        for key, table, figure_name in (
            ("sanity", self._sanity_table, "sanity_curves"),
            ("dissection", self._dissection_table, "dissection"),
        ):
            if not results.get(key):
                continue
            parts.append(table(results[key]))
            figure = run.folder / f"{figure_name}.png"
            if figure.is_file():
                image = _image(figure, self.out.parent, figure_name.replace("_", " "))
                parts.append(f'<div class="card">{image}</div>')
        for note in results.get("notes", []):
            parts.append(_note(str(note)))
        return "<section><h2>Evaluation</h2>" + "".join(parts) + "</section>"

    @staticmethod
    def _dissection_table(dissection: dict[str, Any]) -> str:
        def share(value: Any) -> str:
            return _number(None if value is None or value != value else 100 * value, 1)

        rows = [
            [
                _e(row["class"]),
                f'<td class="num">{_e(row["features"])}',
                f'<td class="num">{share(row["deciding_share"])}',
                f'<td class="num">{share(row["deciding_weight_share"])}',
                f'<td class="num">{share(row["random_deciding_share_mean"])} ± '
                f"{share(row['random_deciding_share_std'])}",
            ]
            for row in dissection.get("per_class", [])
        ]
        deciding = _e(", ".join(dissection.get("deciding_parts", [])))
        return (
            "<h3>Dissection: % of each class's relevant features (and of their weight) whose "
            f"region overlaps a deciding part ({deciding}) best, against random sets "
            "(↑ higher is better)</h3>"
            + _table(
                ["class", "features", "% on a deciding part", "% of the weight", "random sets"],
                rows,
            )
        )

    @staticmethod
    def _sanity_table(sanity: dict[str, Any]) -> str:
        similarities = list(sanity.get("similarities", []))
        rows = []
        for method, curves in sanity.get("methods", {}).items():
            row = [_e(method)]
            for similarity in similarities:
                mean = (curves.get(f"{similarity}_mean") or [None])[-1]
                std = (curves.get(f"{similarity}_std") or [None])[-1]
                row.append(_spread(mean, std))
            rows.append(row)
        return (
            f"<h3>Sanity check: similarity to the trained network's maps once all "
            f"{len(sanity.get('steps', []))} randomisation steps are done, on "
            f"{_e(sanity.get('num_images'))} test images (↓ lower is better: the maps depend "
            "on the weights)</h3>"
            + _table(["method", *(f"{s} ↓" for s in similarities)], rows)
            + _Report._data_randomisation_table(sanity, similarities)
        )

    @staticmethod
    def _data_randomisation_table(sanity: dict[str, Any], similarities: list[str]) -> str:
        other = sanity.get("data_randomisation")
        if not other:
            return ""
        rows = [
            [_e(method), *(_spread(v.get(f"{s}_mean"), v.get(f"{s}_std")) for s in similarities)]
            for method, v in other.items()
        ]
        return (
            "<h3>Data randomisation: similarity to the maps of the same network trained on "
            "permuted labels (↓ lower is better)</h3>"
            + _table(["method", *(f"{s} ↓" for s in similarities)], rows)
        )

    @staticmethod
    def _heatmap_table(heatmaps: dict[str, Any]) -> str:
        directions = heatmaps.get("metrics", {}).get("directions", {})
        methods = heatmaps.get("methods", {})
        columns = [m for m in directions if any(_is_number(s.get(m)) for s in methods.values())]
        best = {}
        for metric in columns:
            values = [s[metric] for s in methods.values() if _is_number(s.get(metric))]
            best[metric] = max(values) if directions[metric] else min(values)
        header = ["method", *(f"{m} {'↑' if directions[m] else '↓'}" for m in columns)]
        rows = []
        for method, scores in methods.items():
            row = [_e(method)]
            for metric in columns:
                value = scores.get(metric)
                mark = " best" if _is_number(value) and value == best[metric] else ""
                row.append(f'<td class="num{mark}">{_number(value)}')
            rows.append(row)
        return (
            f"<h3>Heatmaps on {_e(heatmaps.get('num_images'))} test images (↑ higher is better, "
            "↓ lower is better; the best value of each column is marked)</h3>"
            + _table(header, rows)
        )

    # -------------------------------------------------------------- classes
    def class_index(self) -> str:
        names = self.class_names
        if not names:
            return ""
        relevant = self.relevant or {}
        counts = {n: len(v) for n, v in relevant.get("relevant", {}).items()}
        folder = _e(urllib.parse.quote(self.pages.name))
        items = "".join(
            f'<li data-name="{_e(name.lower())}"><a href="{folder}/class_{c}.html">'
            f"{_e(name)}</a> <small>{counts.get(name, 0)} features</small></li>"
            for c, name in enumerate(names)
        )
        return (
            f'<section><h2>Classes (<span id="shown">{len(names)}</span> of {len(names)})</h2>'
            '<input id="search" type="search" placeholder="search class names" '
            'aria-label="search class names">'
            f'<ul class="index" id="classes">{items}</ul></section>'
        )

    def explanations_section(self, records: list[dict[str, Any]], page_dir: Path) -> str:
        cards = []
        for record in records:
            figure = Path(record["figure_path"])
            features = ", ".join(
                f"{f['layer']}/{f['channel']} ({f['score']:.3f})" for f in record["features"]
            )
            image = _image(figure, page_dir, record["image"]) if figure.is_file() else ""
            note = f"<br><small>{_e(record['note'])}</small>" if record.get("note") else ""
            truth = ""
            if "correct" in record:
                truth = (
                    ' <span class="ok">correct</span>'
                    if record["correct"]
                    else f' <span class="wrong">wrong: it is {_e(record["label"])}</span>'
                )
            cards.append(
                f'<div class="card wide">{image}<br><b>{_e(record["image"])}</b>: predicted '
                f"{_e(record['class'])} (p = {record['probability']:.3f}){truth}<br>"
                f"<small>features: {_e(features) or 'none fired'}</small>{note}</div>"
            )
        return '<div class="grid">' + "".join(cards) + "</div>" if cards else ""

    def shared_features(self) -> dict[tuple[str, int], list[int]]:
        """(layer, channel) -> the classes it is relevant to."""
        shared: dict[tuple[str, int], list[int]] = {}
        relevant = self.relevant or {}
        for c, name in enumerate(self.class_names):
            for feature in relevant.get("relevant", {}).get(name, []):
                shared.setdefault((feature["layer"], int(feature["channel"])), []).append(c)
        return shared

    def class_page(self, class_id: int, shared: dict[tuple[str, int], list[int]]) -> str:
        names = self.class_names
        name = names[class_id]
        page_dir = self.pages
        back = _e(urllib.parse.quote(self.out.name))
        parts = [f'<p><a href="../{back}">&larr; all classes</a></p>']
        relevant = self.relevant
        if relevant:
            features = relevant.get("relevant", {}).get(name, [])
            rows = []
            for rank, feature in enumerate(features):
                others = [
                    c for c in shared[(feature["layer"], int(feature["channel"]))] if c != class_id
                ]
                links = ", ".join(f'<a href="class_{c}.html">{_e(names[c])}</a>' for c in others)
                rows.append(
                    [
                        f'<td class="num">{rank + 1}',
                        _e(feature["layer"]),
                        f'<td class="num">{feature["channel"]}',
                        f'<td class="num">{feature["weight"]:.4f}',
                        f'<span class="shared">also relevant to {links}</span>' if others else "",
                    ]
                )
            if rows:
                parts.append(
                    f"<section><h2>Relevant features ({len(rows)}, by weight)</h2>"
                    + _table(["rank", "layer", "channel", "weight", "shared"], rows)
                    + "</section>"
                )
            else:
                parts.append(
                    "<section><h2>Relevant features</h2>"
                    + _note(
                        f"class {name} has no relevant feature (no mining image, or mu too small)"
                    )
                    + "</section>"
                )
            gallery = self.gallery(class_id)
            parts.append(
                "<section><h2>Average visualisations</h2>"
                "<p><small>Each relevant feature: its heatmap averaged over the class's top "
                "training images (left) and those images averaged (right).</small></p>"
                + (
                    _image(gallery, page_dir, f"gallery of {name}")
                    if gallery
                    else _note("no gallery in these runs (interpretation.galleries=false?)")
                )
                + "</section>"
            )
            top = self.top_images(class_id)
            if top:
                parts.append(
                    "<section><h2>Top training images of each relevant feature</h2>"
                    + _image(top, page_dir, f"top training images of {name}")
                    + "</section>"
                )
        results = self.results()
        if results:
            ablation = results.get("ablation") or {}
            row = next((r for r in ablation.get("per_class", []) if str(r["class"]) == name), None)
            if row:
                parts.append(
                    "<section><h2>Ablation</h2>"
                    + _table(
                        [
                            "features",
                            "drop (own)",
                            "random (own)",
                            "drop (others)",
                            "random (others)",
                        ],
                        [
                            [
                                _cell(row["features"]),
                                _cell(row["drop_own"]),
                                _spread(row["random_drop_own_mean"], row["random_drop_own_std"]),
                                _cell(row["drop_others"]),
                                _spread(
                                    row["random_drop_others_mean"], row["random_drop_others_std"]
                                ),
                            ]
                        ],
                    )
                    + "</section>"
                )
            run = self.evaluation_run()
            assert run is not None
            panel = run.folder / "panels" / f"{_panel_name(names, class_id)}.png"
            if panel.is_file():
                parts.append(
                    "<section><h2>Heatmaps of test images of this class, every method</h2>"
                    + _image(panel, page_dir, f"heatmap panel of {name}")
                    + "</section>"
                )
        records = [
            r
            for run in self.runs
            for r in run.explanations
            if name in (str(r["class"]), str(r.get("label")))
        ]
        if records:
            parts.append(
                f"<section><h2>Explanations predicted as {_e(name)} or of images of "
                f"{_e(name)} ({len(records)})</h2>"
                + self.explanations_section(records, page_dir)
                + "</section>"
            )
        return _page(f"class {name}", f"class {class_id} of {len(names)}", "".join(parts))

    def index_page(self) -> str:
        parts = [self.overview(), self.evaluation()]
        records = [r for run in self.runs for r in run.explanations]
        if records:
            parts.append(
                f"<section><h2>Explanations ({len(records)})</h2>"
                + self.explanations_section(records[:60], self.out.parent)
                + (_note(f"the first 60 of {len(records)} shown") if len(records) > 60 else "")
                + "</section>"
            )
        parts.append(self.class_index())
        named = [r.config.get("experiment_name") for r in self.runs if r.config]
        title = f"vebi report: {next((n for n in named if n), self.runs[0].folder.name)}"
        subtitle = " + ".join(f"{r.task} {r.folder.name}" for r in self.runs)
        return _page(title, subtitle, "".join(parts), SEARCH_SCRIPT if self.class_names else "")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@functools.lru_cache(maxsize=4)
def _panel_names(names: tuple[str, ...]) -> list[str]:
    """The panel file name of each class, as evaluate.py names them."""
    from vebi.utils.io import unique_file_names

    return unique_file_names(names)


def _panel_name(names: Sequence[str], class_id: int) -> str:
    return _panel_names(tuple(names))[class_id]


def class_pages(report: Path) -> Path:
    """Where the class pages of the report file ``report`` go (see :attr:`_Report.pages`)."""
    return report.with_suffix("")


def _made_by_vebi(page: Path) -> bool:
    try:
        with page.open("rb") as handle:
            return GENERATOR_MARK.encode() in handle.read(4096)
    except OSError:
        return False


def check_report_target(target: Path, default: bool) -> None:
    """Refuse to write a report anywhere but a new ``.html`` file or a report written before:
    never through a link, onto a folder or a device, nor over another file (``default``: the
    run dir's own ``report.html``, replaced whatever it holds); its pages folder must be one
    this module made (class pages only)."""
    if target.suffix.lower() != ".html":
        raise VebiError(f"--out {target}: the report is an .html file; give a name ending in .html")
    pages = class_pages(target)
    for path, what in ((target, "the report"), (pages, "its class pages' folder")):
        if path.is_symlink():
            raise VebiError(
                f"{path} ({what}) is a symbolic link: refusing to write through it; remove the "
                "link or give --out another file name"
            )
    if target.exists():
        if not target.is_file():
            raise VebiError(
                f"{target} exists and is not a file (a folder or a device): give --out a new "
                "file name ending in .html"
            )
        if not default and not _made_by_vebi(target):
            raise VebiError(
                f"{target} exists and is not a report written by vebi: refusing to overwrite it; "
                "give --out a new file name (or delete that file yourself)"
            )
    if pages.exists():
        stray = (
            [pages.name]
            if not pages.is_dir()
            else [
                p.name
                for p in pages.iterdir()
                if not (p.name.startswith("class_") and p.suffix == ".html" and p.is_file())
                and not p.name.endswith(".tmp")
                and not p.is_symlink()
            ]
        )
        linked = [p.name for p in pages.iterdir() if p.is_symlink()] if pages.is_dir() else []
        if stray or linked:
            raise VebiError(
                f"{pages} (where the class pages of {target.name} go) holds "
                f"{', '.join((stray + linked)[:3])}, which are not class pages of a vebi "
                "report: give --out another file name"
            )


def write_report(
    folders: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str] | None = None
) -> Path:
    """Write the report of ``folders`` (one or more run dirs: e.g. a training run and the
    evaluation of its checkpoint) as ``<out>`` (default ``<first run dir>/report.html``) and
    its class pages in the folder of the same name (:func:`class_pages`); every file written
    to a temporary name, then renamed; pages of classes the runs no longer have removed.

    Run files that are not what vebi's jobs write (another JSON shape, values of the wrong
    type, too large, not UTF-8) are a :class:`VebiError` naming the run, never a traceback."""
    if not folders:
        raise VebiError("give at least one run dir")
    runs = [read_run(folder) for folder in folders]
    target = Path(out) if out else runs[0].folder / REPORT_NAME
    check_report_target(target, default=out is None)
    report = _Report(runs, target)
    try:
        shared = report.shared_features()
        pages = {
            class_id: report.class_page(class_id, shared)
            for class_id in range(len(report.class_names))
        }
        index = report.index_page()
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as error:
        raise VebiError(
            f"the run files of {', '.join(str(f) for f in folders)} are not what vebi's jobs "
            f"write ({type(error).__name__}: {error}); rerun the job that wrote them"
        ) from None
    folder = report.pages
    try:
        for class_id, page in pages.items():
            with atomic_path(folder / f"class_{class_id}.html") as tmp:
                tmp.write_text(page, encoding="utf-8", errors="replace")
        for old in folder.glob("class_*.html") if folder.is_dir() else ():
            if old.stem.removeprefix("class_").isdigit() and int(old.stem[6:]) >= len(pages):
                old.unlink()  # a class the runs no longer have
        with atomic_path(target) as tmp:
            tmp.write_text(index, encoding="utf-8", errors="replace")
    except PermissionError as error:
        raise VebiError(
            f"cannot write the report into {target.parent}: {error.strerror} (the run dir is "
            "read-only? pass --out <file> to write it elsewhere)"
        ) from None
    return target


def report_run(output_dir: str | os.PathLike[str], loggers: Sequence[Any] = ()) -> Path | None:
    """The job's ``report.html`` (first process only), also given to W&B as HTML media
    (``report``); None on the other processes, or when it could not be written (said: the
    job's own files are already written and stay)."""
    from lightning.pytorch.loggers import WandbLogger

    from vebi.utils.distributed import is_main_process

    if not is_main_process():
        return None
    try:
        path = write_report([output_dir])
    except (VebiError, OSError) as error:
        log.warning("no report.html: %s", error)
        return None
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log({"report": wandb.Html(path.read_text(), inject=False)})
    return path
