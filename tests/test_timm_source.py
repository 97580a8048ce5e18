"""timm as a model source: ``model=timm model.net.name=<timm name>`` through mine.py, and the
errors of a wrong name (random weights; timm's downloads are never reached in tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from vebi.errors import VebiError

timm = pytest.importorskip("timm")


@pytest.mark.slow  # end to end through processes: make acceptance
def test_a_timm_network_is_mined_with_its_galleries_through_mine_py(tmp_path: Path) -> None:
    result = run_cli(
        "mine.py",
        "~data",
        "+data._target_=tests.planted_data.PlantedMaskData",
        "model_source=config",
        "model=timm",
        "model.net.name=mobilenetv3_small_050",
        "model.num_classes=3",
        "model_source.allow_random_init=true",
        f"paths.log_dir={tmp_path}",
        "logger=none",
        "trainer.accelerator=cpu",
        "mining.progress=false",
        "mining.mu=5",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = next(tmp_path.glob("mine/*/*/"))
    assert (run / "relevant_features.h5").is_file()
    assert list((run / "galleries").glob("class_*.png"))
    # one layer per block: the stem, the 11 blocks' outputs, the head (about 2,000 features)
    assert (
        "Mining " in result.stderr + result.stdout and "blocks.5.0" in result.stderr + result.stdout
    )


def test_the_timm_classifier_normalises_with_its_config_and_names_wrong_models() -> None:
    from vebi.models import TimmClassifier

    model = TimmClassifier("resnet18", num_classes=4).eval()
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 4)
    config = model.net.pretrained_cfg
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor(config["mean"]))
    with pytest.raises(VebiError, match="timm has no model 'resnet19'; similar names: resnet"):
        TimmClassifier("resnet19")
