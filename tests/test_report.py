"""report.html: built from a real run's files, opened in a real browser (headless Chromium),
from the file system and from a local static server, with no request leaving the machine."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from vebi.errors import VebiError
from vebi.pipelines.report import read_run, write_report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: Flags of a headless Chromium that makes no connection of its own (updates, sync, ...).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium_or_skip() -> None:
    if Path(CHROMIUM).is_file():
        return
    message = "Chromium is not installed (apt-get install chromium; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)  # CI installs it: never skipped there
    pytest.skip(message)


@pytest.fixture(scope="module")
def report_runs(short_run: dict, mnist_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """The short MNIST training run, an evaluation of its checkpoint and an explanation run,
    each of which wrote its own report.html."""
    logs = tmp_path_factory.mktemp("report_logs")
    common = [
        f"ckpt_path={short_run['best_checkpoint']}",
        f"paths.data_dir={mnist_root}",
        f"paths.log_dir={logs}",
        "logger=none",
    ]
    evaluated = run_cli(
        "evaluate.py",
        *common,
        "evaluation.max_images=300",
        "evaluation.heatmap_images=40",
        "evaluation.select=[vebi,gradient,gradcam]",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    explained = run_cli("explain.py", *common, "num_images=6")
    assert explained.returncode == 0, explained.stderr[-3000:]
    (evaluation,) = (logs / "evaluate" / "mnist").glob("*/results.json")
    (explanation,) = (logs / "explain" / "mnist").glob("*/explanations")
    assert "report:" in evaluated.stdout and "report:" in explained.stdout
    return {
        "train": Path(short_run["output_dir"]),
        "evaluate": evaluation.parent,
        "explain": explanation.parent,
    }


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def static_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``python -m http.server`` on loopback, serving a folder (yields url, folder)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


def _visit(page, url: str, screenshot: Path) -> dict:
    """Open ``url``; return what a person would be bothered by: broken images, console
    errors, requests to other hosts, and the class-index links that do not resolve."""
    errors: list[str] = []
    outside: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    def request(route, req) -> None:
        if req.url.startswith(("file://", "http://127.0.0.1", "data:")):
            route.continue_()
        else:
            outside.append(req.url)
            route.abort()

    page.route("**/*", request)
    page.goto(url, wait_until="load")
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # lazy images
    page.wait_for_function("[...document.images].every(i => i.complete)")
    broken = page.evaluate(
        "[...document.images].filter(i => !(i.naturalWidth > 0)).map(i => i.src)"
    )
    images = page.evaluate("document.images.length")
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(screenshot), full_page=True)
    return {"errors": errors, "outside": outside, "broken": broken, "images": images}


@pytest.mark.slow  # evaluate.py and explain.py runs for report_runs (about 40 s): make acceptance
def test_report_in_a_real_browser(report_runs: dict, static_server, tmp_path: Path) -> None:
    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    combined = write_report([report_runs["train"], report_runs["evaluate"]], tmp_path / "r.html")
    url, served = static_server
    shutil.copytree(report_runs["evaluate"], served / "evaluate")
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        # the training run and its evaluation in one report, from the file system
        seen = _visit(page, combined.resolve().as_uri(), tmp_path / "combined.png")
        assert seen["errors"] == [] and seen["outside"] == [] and seen["broken"] == []
        assert seen["images"] == 2  # the deletion and insertion curves (no masks: no IoU)
        text = page.inner_text("body")
        assert "Classes (10 of 10)" in text and "Heatmaps on 40 test images" in text
        best = page.eval_on_selector_all("td.best", "cells => cells.length")
        assert best >= 3  # deletion, insertion, artefacts: one per column at least
        # the class index: the search box filters, every link opens a page with its gallery
        page.fill("#search", "7")
        assert page.inner_text("#shown") == "1"
        page.fill("#search", "")
        links = page.eval_on_selector_all("#classes a", "links => links.map(a => a.href)")
        assert len(links) == 10
        for number, link in enumerate(links):
            seen = _visit(page, link, tmp_path / f"class_{number}.png")
            assert seen["errors"] == [] and seen["outside"] == [] and seen["broken"] == []
            assert seen["images"] == 3, link  # the gallery, the top images, the heatmap panel
            assert "Relevant features (" in page.inner_text("body")
        # the evaluation run's own report, from a local static server
        seen = _visit(page, f"{url}/evaluate/report.html", tmp_path / "served.png")
        assert seen["errors"] == [] and seen["outside"] == []
        # the explanation run: overlays with class, probability and features
        seen = _visit(
            page, (report_runs["explain"] / "report.html").as_uri(), tmp_path / "explain.png"
        )
        assert seen["broken"] == [] and seen["images"] == 6
        assert "Explanations (6)" in page.inner_text("body")
        browser.close()
    assert (tmp_path / "combined.png").stat().st_size > 20_000


@pytest.mark.slow  # evaluate.py and explain.py runs for report_runs (about 40 s): make acceptance
def test_report_of_what_is_not_a_run_or_lacks_parts(report_runs: dict, tmp_path: Path) -> None:
    with pytest.raises(VebiError, match="not a vebi run dir"):
        write_report([tmp_path])
    result = run_cli("report.py", str(tmp_path))
    assert (
        result.returncode == 1
        and "error: " in result.stderr
        and "not a vebi run dir" in (result.stderr)
    )
    # a run without mined features: said on the page, the rest still shown
    bare = tmp_path / "bare"
    shutil.copytree(report_runs["explain"], bare)
    records = bare / "explanations" / "explanations.json"
    records.write_text(records.read_text().replace('"checkpoint": "', '"checkpoint_was": "'))
    page = write_report([bare]).read_text()
    assert "hold no mined features" in page and "Explanations (6)" in page
    assert read_run(bare).relevant is None


@pytest.mark.slow  # evaluate.py and explain.py runs for report_runs (about 40 s): make acceptance
def test_report_on_a_read_only_run_dir_is_one_clear_error(
    report_runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    folder = tmp_path / "readonly"
    shutil.copytree(report_runs["explain"], folder)
    (folder / "report.html").unlink()
    shutil.rmtree(folder / "report", ignore_errors=True)
    real_open = os.open

    def refuse(path: object, *args: object, **kwargs: object) -> int:
        if str(path).endswith(".tmp"):  # the temporary file every write goes through
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    # the tests run as root, whom no permission bit stops: the refusal the OS gives others
    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(VebiError, match="cannot write the report .* read-only"):
        write_report([folder])
    monkeypatch.undo()
    assert not (folder / "report.html").exists()
    assert not any(p.name.endswith(".tmp") for p in folder.rglob("*"))


def test_a_1000_class_report_stays_light(tmp_path: Path) -> None:
    """ImageNet-size: one small page per class and an index of links, not one huge page."""
    import json

    names = [f"n{c:08d} class {c}" for c in range(1000)]
    relevant = {
        "layers": ["layer4"],
        "channels": [2048],
        "class_names": names,
        "mu": 10.0,
        "class_counts": [50] * 1000,
        "metrics": {"sparse_accuracy_train": 0.7},
        "relevant": {
            name: [
                {"layer": "layer4", "channel": (c * 7 + j) % 2048, "weight": 1.0 / (j + 1)}
                for j in range(25)
            ]
            for c, name in enumerate(names)
        },
        "per_layer_counts": {"layer4": [25] * 1000},
    }
    run = tmp_path / "run"
    run.mkdir()
    (run / "relevant_features.json").write_text(json.dumps(relevant))
    index = write_report([run])
    pages = sorted((run / "report").glob("class_*.html"))
    assert len(pages) == 1000
    assert index.stat().st_size < 1_000_000
    assert max(page.stat().st_size for page in pages) < 100_000
    page = (run / "report" / "class_0.html").read_text()
    assert "Relevant features (25, by weight)" in page
    assert 'href="class_' in page  # the channels shared with other classes are linked


def test_the_training_run_gives_its_report_to_wandb(short_run: dict) -> None:
    from tests.wandb_offline import logged_values

    values = logged_values(Path(short_run["wandb_dir"]))
    kinds = values.get("report/_type") or [v.get("_type") for v in values.get("report", [])]
    assert kinds and kinds[-1] == "html-file", sorted(values)[:40]
    assert Path(short_run["output_dir"], "report.html").is_file()
    assert short_run["report"] == Path(short_run["output_dir"], "report.html")
