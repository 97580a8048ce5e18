"""The README's Python API example runs as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule

from tests.mining_models import planted_colour_data, planted_colour_model
from vebi import ClassifierModule, Explainer, VebiError, mine_features

REPO_ROOT = Path(__file__).resolve().parents[1]


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of a README section (## heading to the next ## heading)."""
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)


def test_python_api_example_runs(tmp_path: Path) -> None:
    (block,) = python_blocks("Python API")
    script = tmp_path / "example.py"
    script.write_text(block + "\nassert explanation.combined.shape == (4, 32, 32)\n")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.Size([4, 32, 32])" in done.stdout
    assert (tmp_path / "explanation.png").stat().st_size > 10_000


def test_a_lightning_module_is_explained_through_its_network() -> None:
    """Passing vebi's ClassifierModule (loss and metrics inside) works like passing its net;
    a LightningModule without a network says what to pass."""
    net = planted_colour_model()
    module = ClassifierModule(net=net, num_classes=3).eval()
    data = planted_colour_data(per_class=20)
    relevant = mine_features(module, data, mu=5.0, progress=False)
    direct = mine_features(net, data, mu=5.0, progress=False)
    assert (relevant.weights == direct.weights).all()
    images = data.tensors[0][:4]
    torch.testing.assert_close(
        Explainer(module, relevant)(images).combined, Explainer(net, relevant)(images).combined
    )
    with pytest.raises(VebiError, match="pass the network inside it"):
        Explainer(LightningModule(), relevant)


def test_the_readme_metric_plugs_in_through_the_config(
    tmp_path: Path, compose_cfg, monkeypatch
) -> None:
    """The README's example metric, saved as my_metrics.py, is picked up from the config
    override it shows and scores as computed by hand."""
    from vebi.evaluation.heatmaps import metric_info
    from vebi.pipelines.evaluate import build_metrics

    (block,) = python_blocks("Evaluation")
    (tmp_path / "my_metrics.py").write_text(block)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_cfg(
        "evaluate", ["+evaluation.metrics.top_pixels._target_=my_metrics.TopPixelPrecision"]
    )
    metrics = build_metrics(cfg.evaluation, ["localisation"])
    assert list(metrics)[-1] == "top_pixels" and "deletion" not in metrics
    metric = metrics["top_pixels"]
    heatmaps = torch.arange(20.0).reshape(2, 2, 5) / 20  # top 10 %: the last pixel of each map
    masks = torch.zeros(2, 2, 5, dtype=torch.bool)
    masks[0, 1, 4] = True
    metric.update(heatmaps, masks)
    assert metric.result() == {"top_pixel_precision": 0.5}
    assert metric_info({"top_pixels": metric})["directions"] == {"top_pixel_precision": True}


ENTRY_POINTS = ("train.py", "mine.py", "explain.py", "evaluate.py")


def readme_commands() -> list[list[str]]:
    """Every ``python <script> ...`` line of the README's bash blocks, split as a shell would."""
    text = (REPO_ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("python "):
                commands.append(shlex.split(line, comments=True)[1:])
    return commands


def first_of_sweeps(overrides: list[str]) -> list[str]:
    """A multirun's overrides with each swept value replaced by its first (``seed=1,2,3``)."""
    return [
        re.sub(r"=([^,\[{]*),.*$", r"=\1", o) if "," in o and "[" not in o else o for o in overrides
    ]


def test_every_readme_command_composes_and_its_model_takes_its_data(tmp_path: Path) -> None:
    """Each entry-point command of the README composes as written (its overrides, experiment
    and group names exist), and each one that builds its network from the config gets a
    network that takes the images of its data (the README's random-weights ResNet-18 on
    1-channel MNIST digits used to end in a raw ValueError)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.conftest import compose_config
    from vebi.pipelines.common import check_model_takes_data

    commands = readme_commands()
    scripts = {command[0] for command in commands}
    assert set(ENTRY_POINTS) <= scripts, scripts
    checked = 0
    for script, *arguments in commands:
        assert (REPO_ROOT / script).is_file(), script
        if script not in ENTRY_POINTS:
            continue
        # placeholders (<timestamp>) stand for the user's paths
        filled = [re.sub(r"<[a-z]+>", "x", a) for a in arguments if a != "-m"]
        overrides = first_of_sweeps(filled)
        cfg = compose_config(
            script.removesuffix(".py"), [*overrides, f"paths.log_dir={tmp_path}"], tmp_path / "run"
        )
        if (cfg.get("model_source") or {}).get("from") == "config":
            datamodule = instantiate(cfg.data)
            net_cfg = OmegaConf.to_container(cfg.model.net, resolve=True)
            if "pretrained" in net_cfg:  # the shapes are what is checked: no download
                net_cfg["pretrained"] = False
            check_model_takes_data(instantiate(net_cfg), datamodule, " ".join(arguments))
            checked += 1
        GlobalHydra.instance().clear()
    assert checked >= 3  # the ImageNet commands and the random-weights ResNet-18


def test_a_model_that_cannot_take_the_data_is_one_clear_error(tmp_path: Path) -> None:
    from tests.conftest import compose_config
    from vebi.pipelines.mine import mine

    cfg = compose_config(
        "mine",
        [
            "model_source=config",
            "model=resnet18",
            "model.num_classes=10",
            "model_source.allow_random_init=true",
            "logger=none",
            f"paths.log_dir={tmp_path}",
        ],
        tmp_path / "run",
    )
    with pytest.raises(VebiError) as raised:
        mine(cfg)
    message = str(raised.value)
    assert "shaped (1, 28, 28)" in message and "takes 3-channel images" in message
    assert "model=resnet18" in message and "data=mnist" in message
