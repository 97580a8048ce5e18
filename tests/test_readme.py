"""The README's Python API example runs as written."""

from __future__ import annotations

import re
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
