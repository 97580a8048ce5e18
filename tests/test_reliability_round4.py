"""Reliability, round 4: report.py as careful as the jobs (its output a file it creates or a
report it made, never a device, a folder or a link's target; one error line for bad run files;
signals), checkpoints whose stored overrides name no place, and the user's own train ->
evaluate round trip over every key of every data config."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import REPO_ROOT, compose_config, run_cli
from tests.test_hostile_checkpoints import GOOD, lenet_checkpoint
from vebi.checkpoint import check_data_override, check_settings, load_classifier
from vebi.errors import CheckpointError, VebiError
from vebi.pipelines.common import (
    CONFIG_DIR,
    _storable,
    data_config_keys,
    with_checkpoint_settings,
)
from vebi.pipelines.report import GENERATOR_MARK, write_report


# ------------------------------------------------------------------ a small run dir
def small_run(folder: Path, names: list[str] | None = None) -> Path:
    """A run dir with the mined features of ``names`` (two classes by default) and nothing else."""
    names = names or ["zero", "one"]
    folder.mkdir(parents=True)
    relevant = {
        "layers": ["conv2"],
        "channels": [8],
        "class_names": names,
        "mu": 1.0,
        "class_counts": [5] * len(names),
        "metrics": {"sparse_accuracy_train": 0.9},
        "relevant": {
            n: [{"layer": "conv2", "channel": i, "weight": 1.0}] for i, n in enumerate(names)
        },
        "per_layer_counts": {"conv2": [1] * len(names)},
    }
    (folder / "relevant_features.json").write_text(json.dumps(relevant))
    return folder


def report_cli(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "report.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "Error executing job" not in result.stderr, result.stderr
    return lines[0]


# ------------------------------------------------------------------ 1. where report.py writes
def test_report_out_is_never_a_device_a_folder_a_foreign_file_or_a_link(tmp_path: Path) -> None:
    run = small_run(tmp_path / "run")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    foreign = tmp_path / "notes.html"
    foreign.write_text("my notes")
    os.symlink(other, tmp_path / "linked.html")

    for out, reason in (
        ("/dev/null", "an .html file"),
        (str(other), "an .html file"),
        (str(foreign), "not a report written by vebi"),
        (str(tmp_path / "linked.html"), "symbolic link"),
        ("/proc/nope/x.html", "cannot write to /proc/nope"),
    ):
        line = one_error_line(report_cli(str(run), "--out", out))
        assert reason in line, (out, line)
    assert foreign.read_text() == "my notes"
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]
    assert Path("/dev/null").is_char_device()
    assert not (tmp_path / "report").exists()  # no page went next to a refused target

    # the class pages' folder may not be a link either: nothing lands in its target
    os.symlink(other, run / "report")
    line = one_error_line(report_cli(str(run)))
    assert "symbolic link" in line
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]


def test_two_reports_in_one_folder_keep_their_own_pages_and_links(tmp_path: Path) -> None:
    first = small_run(tmp_path / "first", ["cat", "dog"])
    second = small_run(tmp_path / "second", ["apple", "pear", "plum"])
    out = tmp_path / "out"
    one = write_report([first], out / "one.html")
    two = write_report([second], out / "two.html")
    assert sorted(p.name for p in (out / "one").iterdir()) == ["class_0.html", "class_1.html"]
    assert len(list((out / "two").iterdir())) == 3
    assert 'href="one/class_0.html"' in one.read_text()
    assert "cat" in (out / "one" / "class_0.html").read_text()
    assert 'href="../two.html"' in (out / "two" / "class_0.html").read_text()
    assert GENERATOR_MARK in two.read_text()
    # written again from a run with fewer classes: the stale page goes
    write_report([small_run(tmp_path / "third", ["only"])], out / "two.html")
    assert [p.name for p in (out / "two").iterdir()] == ["class_0.html"]
    # a pages folder holding anything else is not ours
    (out / "one" / "mine.txt").write_text("x")
    with pytest.raises(VebiError, match="not class pages of a vebi report"):
        write_report([first], out / "one.html")


# ------------------------------------------------------------------ 7. malformed run files
def malformed_runs(tmp_path: Path) -> dict[str, Path]:
    """One run dir per malformed input a careless or hostile user gave report.py."""
    cases: dict[str, Any] = {
        "results.json a list": ("results.json", "[1, 2]"),
        "results.json not UTF-8": ("results.json", b"\xff\xfe{"),
        "results.json not JSON": ("results.json", "{nope"),
        "results.json deep": ("results.json", "[" * 100_000),
        "heatmaps a list": ("results.json", '{"heatmaps": [1]}'),
        "methods a string": ("results.json", '{"heatmaps": {"methods": "x"}}'),
        "ablation rows of numbers": ("results.json", '{"ablation": {"per_class": [1, 2]}}'),
        "notes a number": ("results.json", '{"notes": 5}'),
        "metrics a list": ("results.json", '{"metrics": [1]}'),
        "summary.json a string": ("summary.json", '"x"'),
        "config not YAML": (".hydra/config.yaml", "a: [b"),
        "config a list": (".hydra/config.yaml", "- 1"),
        "config of aliases": (
            ".hydra/config.yaml",
            "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c]\n",
        ),
        "overrides a mapping": (".hydra/overrides.yaml", "a: 1"),
        "explanations a string": ("explanations/explanations.json", '{"explanations": "x"}'),
        "probability a word": (
            "explanations/explanations.json",
            json.dumps(
                {
                    "explanations": [
                        {
                            "image": "a.png",
                            "class": "zero",
                            "probability": "x",
                            "correct": True,
                            "features": [],
                            "figure": "a.png",
                        }
                    ]
                }
            ),
        ),
        "features of strings": (
            "explanations/explanations.json",
            json.dumps(
                {
                    "explanations": [
                        {
                            "image": "a.png",
                            "class": "zero",
                            "probability": 0.5,
                            "correct": True,
                            "features": ["x"],
                            "figure": "a.png",
                        }
                    ]
                }
            ),
        ),
    }
    runs = {}
    for number, (name, (file_name, content)) in enumerate(cases.items()):
        run = small_run(tmp_path / f"case{number}")
        path = run / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        runs[name] = run
    return runs


def test_malformed_run_files_are_one_clear_error_and_write_nothing(tmp_path: Path) -> None:
    for name, run in malformed_runs(tmp_path).items():
        try:
            write_report([run])
        except VebiError as error:
            assert str(run) in str(error) or "run files" in str(error), (name, error)
            assert not (run / "report.html").exists(), name
            assert not any(p.name.endswith(".tmp") for p in run.rglob("*")), name
        except Exception as error:  # noqa: BLE001 - the defect under test
            pytest.fail(f"{name}: {type(error).__name__}: {error}")
    # through the entry point: one line, exit 1 (two of them, as a user meets them)
    runs = malformed_runs(tmp_path / "cli")
    for name in ("results.json not UTF-8", "config of aliases"):
        one_error_line(report_cli(str(runs[name])))


def test_oversized_run_file_is_refused_before_it_is_read(tmp_path: Path, monkeypatch) -> None:
    import vebi.pipelines.report as report

    run = small_run(tmp_path / "run")
    (run / "results.json").write_text(json.dumps({"notes": ["x" * 2000]}))
    monkeypatch.setattr(report, "MAX_RUN_FILE_BYTES", 1000)
    with pytest.raises(VebiError, match="more than a vebi job writes"):
        write_report([run])


def test_odd_class_names_and_paths_give_working_pages(tmp_path: Path) -> None:
    """A lone surrogate in a class name is written (replaced), image links with ``#``, ``?``
    and ``%41`` in the run path are URL-encoded, and the printed URL opens."""
    from PIL import Image

    run = small_run(tmp_path / "a#b?c%41" / "run", ["ok", "bad\udc80name"])
    gallery = run / "galleries"
    gallery.mkdir()
    from vebi.explain.interpretation import gallery_file

    Image.new("RGB", (4, 4)).save(gallery_file(gallery, 0, "ok"))
    index = write_report([run])
    page = (run / "report" / "class_0.html").read_text()
    assert "galleries/" in page and "%41" not in page.split("galleries/")[0][-40:]
    src = page.split('<img src="')[1].split('"')[0]
    assert "#" not in src and "?" not in src
    from urllib.parse import unquote

    assert (run / "report" / unquote(src)).resolve().is_file()
    assert "bad?name" in (run / "report" / "class_1.html").read_text()
    result = report_cli(str(run))
    assert result.returncode == 0, result.stderr
    url = result.stdout.split("open it in a browser: ")[1].rstrip(")\n ")
    from urllib.request import url2pathname

    assert Path(url2pathname(url.removeprefix("file://"))) == index.resolve()


def test_relevant_features_path_is_resolved_where_the_job_ran_and_must_be_one(
    tmp_path: Path,
) -> None:
    """A relative path in results.json is relative to the directory the job ran from (Hydra's
    runtime cwd), not to report.py's; an absolute path to another JSON file is not read."""
    mined = small_run(tmp_path / "project" / "train" / "mining", ["from_mining", "b"])
    run = tmp_path / "evaluate"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  runtime:\n    cwd: {tmp_path / 'project'}\n"
    )
    (run / "results.json").write_text(
        json.dumps({"relevant_features": "train/mining/relevant_features.h5"})
    )
    result = report_cli(str(run), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "from_mining" in (run / "report.html").read_text()

    elsewhere = tmp_path / "secret.json"
    elsewhere.write_text(json.dumps({"class_names": ["secret"]}))
    (run / "results.json").write_text(json.dumps({"relevant_features": str(elsewhere)}))
    write_report([run])
    assert "secret" not in (run / "report.html").read_text()
    assert mined.is_dir()


def test_report_py_stops_on_signals_with_no_temporary_files(tmp_path: Path) -> None:
    """SIGINT and SIGTERM: exit 128 + the signal, one line, no ``.class_N.html.*.tmp``."""
    names = [f"class {c}" for c in range(20_000)]  # long enough to be stopped half-way
    run = small_run(tmp_path / "run", names)
    for signum in (signal.SIGINT, signal.SIGTERM):
        shutil.rmtree(run / "report", ignore_errors=True)  # pages of the run before
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "report.py"), str(run)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        pages = run / "report"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (pages.is_dir() and any(pages.iterdir())):
            time.sleep(0.02)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 128 + signum, stderr
        assert "Traceback" not in stderr and "interrupted" in stderr, stderr
        assert not any(p.name.endswith(".tmp") for p in run.rglob("*"))
        assert not (run / "report.html").exists()


# ------------------------------------------------------------------ 2. checkpoint overrides
@pytest.mark.parametrize(
    "override",
    [
        "data.name=../../X",
        "data.data_dir=/tmp/elsewhere",
        "data.mirrors=[http://127.0.0.1:8765/mnist/]",
        "data.sources=[torchvision]",
        "data.root=/tmp/images",
        "data.cache_dir=x",
        "data.name=~/x",
    ],
)
def test_stored_overrides_name_no_place(override: str, tmp_path: Path) -> None:
    assert not _storable(override)  # train.py never stores it...
    ckpt = lenet_checkpoint(tmp_path / "a.ckpt", {**GOOD, "data_overrides": [override]})
    with pytest.raises(CheckpointError, match="refusing its stored settings"):
        with_checkpoint_settings(["mine.py", f"ckpt_path={ckpt}"])  # ...and no job uses it


@pytest.mark.slow  # a real mine.py process: make acceptance
def test_a_checkpoint_naming_a_data_path_generates_nothing(tmp_path: Path) -> None:
    ckpt = lenet_checkpoint(
        tmp_path / "a.ckpt", {**GOOD, "data_overrides": ["data.mirrors=[http://127.0.0.1:9/]"]}
    )
    result = run_cli("mine.py", f"ckpt_path={ckpt}", f"paths.log_dir={tmp_path / 'logs'}")
    assert "settings.data_overrides[0]" in one_error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]


def test_nested_pretrained_networks_are_built_without_a_download(
    tmp_path: Path, monkeypatch
) -> None:
    import torchvision

    def no_download(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a checkpoint's network tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", no_download)
    inner = {
        "_target_": "vebi.models.TorchvisionClassifier",
        "architecture": "resnet18",
        "num_classes": 3,
        "pretrained": True,
    }
    architecture = {"_target_": "torch.nn.Sequential", "_args_": [inner]}
    from vebi.models import TorchvisionClassifier

    net = torch.nn.Sequential(TorchvisionClassifier("resnet18", num_classes=3))
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    path = tmp_path / "nested.ckpt"
    torch.save(
        {"state_dict": state, "vebi": {"num_classes": 3, "architecture": architecture}}, path
    )
    module = load_classifier(path)
    assert torch.equal(module.net.state_dict()["0.net.fc.weight"], state["net.0.net.fc.weight"])

    partial = {"_target_": "torch.nn.Sequential", "_args_": [{**inner, "_partial_": True}]}
    torch.save({"state_dict": state, "vebi": {"num_classes": 3, "architecture": partial}}, path)
    with pytest.raises(CheckpointError, match="_partial_"):
        load_classifier(path)


# ------------------------------------------------------------------ 3. the round trip
def _override_value(value: Any) -> str:
    """``value`` written as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    return str(value)


def every_storable_data_override() -> list[tuple[str, str]]:
    """(data config, ``data.<key>=<its default>``) for every key of every data config that
    train.py would store, inherited keys included."""
    cases = []
    for path in sorted((CONFIG_DIR / "data").glob("*.yaml")):
        composed = compose_config("train", [f"data={path.stem}"], Path("/tmp/unused"))
        data = OmegaConf.to_container(composed.data, resolve=False)
        assert set(data) - {"_target_"} <= data_config_keys(CONFIG_DIR, path.stem) | {"_target_"}
        for key, value in data.items():
            override = f"data.{key}={_override_value(value)}"
            if _storable(override):
                cases.append((path.stem, override))
    return cases


def test_every_override_train_stores_round_trips(tmp_path: Path) -> None:
    """``experiment=an8flower_single data.generator_seed=97`` used to be refused by
    evaluate.py ("data has no key 'generator_seed'"): keys inherited through a data config's
    defaults count. Each stored override is accepted and composes."""
    cases = every_storable_data_override()
    inherited = [o for data, o in cases if data == "an8flower_single"]
    assert any(o.startswith("data.generator_seed=") for o in inherited)
    assert any(o.startswith("data.images_per_class=") for o in inherited)
    for data, override in cases:
        settings = {**GOOD, "data": data, "experiment": None, "data_overrides": [override]}
        assert check_settings(settings, "x.ckpt") == settings
        ckpt = lenet_checkpoint(tmp_path / f"{data}.ckpt", settings)
        for job in ("mine.py", "explain.py", "evaluate.py"):
            argv = with_checkpoint_settings([job, f"ckpt_path={ckpt}"])
            assert override in argv, (job, argv)
        composed = compose_config(
            "evaluate", [a for a in argv[1:] if not a.startswith("ckpt_path=")], tmp_path / "c"
        )
        key, value = check_data_override(override)
        assert OmegaConf.select(composed, key) == value, (data, override)


# ------------------------------------------------------------------ 4. names are text
ODD_NAMES = ["$\\notacmd$", "caf\udce9", "50% $x^2$ {a}", "\\\\server\\share"]


def test_every_figure_draws_odd_names_as_text(tmp_path: Path) -> None:
    """Class names, file names and layer names reach figure titles: never mathtext, and a
    lone surrogate (a Latin-1 file name) is drawn as an escape, not a crash."""
    from PIL import Image

    from vebi.explain.figures import (
        explanation_figure,
        gallery_figure,
        save_figure,
        top_images_figure,
    )

    image, maps = torch.rand(3, 16, 16), torch.rand(2, 16, 16)
    figures = {
        "explanation": explanation_figure(image, maps, maps[0], ODD_NAMES[:2], ODD_NAMES[2]),
        "gallery": gallery_figure([maps[0]] * 4, [image] * 4, ODD_NAMES, ODD_NAMES[0]),
        "top": top_images_figure([[image, image]] * 4, ODD_NAMES, ODD_NAMES[1]),
    }
    axes = figures["gallery"].axes[0]
    axes.set_xticks([0, 1])
    axes.set_xticklabels(ODD_NAMES[:2])
    for name, figure in figures.items():
        path = save_figure(figure, tmp_path / f"{name}.png")
        assert Image.open(path).size[0] > 50, name
    texts = [t.get_text() for t in figures["gallery"].findobj(lambda a: hasattr(a, "get_text"))]
    assert "$\\notacmd$" in texts and "caf\\udce9" in texts


# ------------------------------------------------------------------ 6. more classes than outputs
def test_data_with_more_classes_than_the_checkpoint_is_refused(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from vebi.pipelines.common import check_class_count

    module = load_classifier(lenet_checkpoint(tmp_path / "a.ckpt", GOOD))
    eleven = SimpleNamespace(num_classes=11, class_names=[str(c) for c in range(10)] + ["extra"])
    with pytest.raises(VebiError, match="11 classes but .* 10 outputs .*extra"):
        check_class_count(module, eleven, "a.ckpt")
    check_class_count(module, SimpleNamespace(num_classes=10, class_names=list("0123456789")), "x")


# ------------------------------------------------------------------ 5. upper bounds
def test_a_huge_16_bit_png_is_read_in_flat_memory(tmp_path: Path) -> None:
    """A 12000 x 12000 16-bit PNG (a few hundred kB on disk) used to take 4.5 GB more through
    float64 copies; now about its own 288 MB (its pixels, read once)."""
    from PIL import Image

    big = tmp_path / "big.png"
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        Image.new("I;16", (12000, 12000), 30000).save(big)
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    script = f"""
import resource
from PIL import Image
from vebi.explain.inputs import image_to_tensor
Image.MAX_IMAGE_PIXELS = None
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with Image.open({str(big)!r}) as image:
    tensor = image_to_tensor(image, (3, 64, 64))
assert abs(float(tensor.mean()) - 30000 / 65535) < 1e-3, float(tensor.mean())
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    added_gb = float(result.stdout.split()[-1])
    assert added_gb < 1.0, f"reading it took {added_gb:.2f} GB more"


# ------------------------------------------------------------------ 9. smaller cases
def test_a_killed_generation_leaves_no_staging_folder_forever(tmp_path: Path) -> None:
    from vebi.data.an8flower import staging_folder

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    stale = tmp_path / f".an8flower_double.{dead.stdout.strip()}.abc"
    (stale / "images").mkdir(parents=True)
    running = tmp_path / f".an8flower_double.{os.getpid()}.xyz"
    running.mkdir()
    other = tmp_path / ".an8flower_double_PARTS.1.x"
    other.mkdir()
    new = staging_folder(tmp_path, "an8flower_double")
    assert not stale.exists() and running.is_dir() and other.is_dir() and new.is_dir()
    assert new.name.startswith(f".an8flower_double.{os.getpid()}.")


def test_impossible_evaluation_settings_are_one_line_before_work(tmp_path: Path) -> None:
    from vebi.evaluation.ablation import AblationRelevance
    from vebi.evaluation.localisation import ThresholdIoU
    from vebi.mining.miner import FeatureMiner
    from vebi.pipelines.evaluate import _check_settings
    from vebi.utils.instantiate import instantiate_checked

    composed = compose_config("evaluate", [], tmp_path / "run")
    for key, value in (("steps", 1_000_000_000), ("steps", 0)):
        settings = composed.evaluation.copy()
        settings[key] = value
        with pytest.raises(VebiError, match=f"evaluation.{key}"):
            _check_settings(settings)
    with pytest.raises(VebiError, match="draws must be in 1..1000"):
        AblationRelevance(draws=1_000_000_000)
    for thresholds in ([-1.0, 0.5], [0.5, 2.0], [float("nan")], []):
        with pytest.raises(VebiError, match=r"thresholds must be .* in \[0, 1\]"):
            ThresholdIoU(thresholds=thresholds)
    # a constructor's refusal comes out as itself, not inside Hydra's InstantiationException
    for mu in (0, -1, float("inf"), float("nan")):
        config = OmegaConf.to_container(composed.mining, resolve=True)
        config["mu"] = mu
        with pytest.raises(VebiError) as raised:
            instantiate_checked(config, FeatureMiner, "mining")
        assert "Error in call to target" not in str(raised.value), str(raised.value)
        assert "mu" in str(raised.value)


@pytest.mark.slow  # a real mine.py process on the short run's checkpoint: make acceptance
def test_invalid_mining_mu_is_one_error_line_through_mine_py(
    short_run: dict, mnist_root: Path, tmp_path: Path
) -> None:
    result = run_cli(
        "mine.py",
        f"ckpt_path={short_run['best_checkpoint']}",
        f"paths.data_dir={mnist_root}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "logger=none",
        "mining.mu=-1",
    )
    line = one_error_line(result)
    assert "mu" in line and "Error executing job" not in result.stderr
