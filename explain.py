"""Explain predictions: ``python explain.py [ckpt_path=...] input=<image, folder or test>``."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vebi.pipelines.common import argv_with_checkpoint_settings
from vebi.pipelines.explain import explain
from vebi.utils.allocator import reuse_freed_memory
from vebi.utils.cli import report_user_errors


@hydra.main(version_base="1.3", config_path="configs", config_name="explain")
@report_user_errors
def main(cfg: DictConfig) -> None:
    explain(cfg)


if __name__ == "__main__":
    reuse_freed_memory()  # CPU tensor work 2-3x faster (vebi.utils.allocator)
    # the settings ckpt_path was trained with, checked as data before Hydra composes anything
    sys.argv = argv_with_checkpoint_settings(sys.argv, Path(__file__).parent / "configs")
    main()
