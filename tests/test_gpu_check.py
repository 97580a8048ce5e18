"""`make gpu-check` skips cleanly where there is no CUDA device (CI, this project's CPUs)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: it would run")
def test_gpu_check_skips_without_cuda() -> None:
    result = run_cli("benchmarks/gpu_check.py")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no CUDA device here" in result.stdout and "skipped" in result.stdout
