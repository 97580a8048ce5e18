"""The pipeline on a GPU, checked against the CPU: `make gpu-check`.

On a CUDA machine: generates an8Flower double (12 classes, 112 px), trains a SmallVGG for a few
epochs, then mines, explains and evaluates on the GPU, mines and evaluates the same checkpoint
on the CPU, and prints one table of stage timings and the agreement of W (mined weights) and of
the evaluation metrics between the two devices. Then it times mining at ImageNet width on the
GPU: a torchvision ResNet-50 at 224 px with random weights (m = 17,408), C = 1000, a few
thousand random images, dense G on the device against streamed G, each against the bare
inference pass (``benchmarks/scale.py``'s table and its ImageNet-1k projection). Without CUDA
it says so and exits 0.

Usage: python benchmarks/gpu_check.py [--epochs 3] [--out logs/gpu_check]
       [--mining-images 3000] [--only pipeline|mining]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run(stage: str, script: str, args: list[str], timings: dict[str, float]) -> None:
    command = [sys.executable, str(ROOT / script), *args]
    print(f"... {stage}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    timings[stage] = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{stage} failed ({' '.join(command)}):\n{done.stderr[-4000:]}")


def newest(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(f"nothing matches {folder / pattern}")
    return found[-1]


def flat_metrics(result: dict) -> dict[str, float]:
    """The numbers of a results.json worth comparing: test metrics, ablation averages, and
    every heatmap method's scalar scores."""
    values = {f"metrics/{k}": v for k, v in result.get("metrics", {}).items()}
    for key, value in (result.get("ablation") or {}).get("average", {}).items():
        values[f"ablation/{key}"] = value
    for method, scores in (result.get("heatmaps") or {}).get("methods", {}).items():
        for key, value in scores.items():
            if isinstance(value, int | float):
                values[f"{method}/{key}"] = value
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "logs" / "gpu_check"))
    parser.add_argument("--mining-images", type=int, default=3000)
    parser.add_argument("--only", choices=["pipeline", "mining"])
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing to check (skipped).")
        return
    if args.only != "mining":
        pipeline(args, torch)
    if args.only != "pipeline":
        mining_at_scale(args.mining_images)


def mining_at_scale(images: int) -> None:
    """Dense-on-device against streamed mining of a ResNet-50 at 224 px, C = 1000, on the GPU
    (benchmarks/scale.py), with the bare pass: the printed table."""
    command = [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--device", "cuda"]
    command += ["--sides", "224", "--images", str(images), "--classes", "1000", "--batch", "100"]
    print(
        f"... mining a ResNet-50 at 224 px on the GPU ({images} images, 1000 classes)", flush=True
    )
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"mining at scale failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    print(done.stdout)


def pipeline(args: argparse.Namespace, torch: Any) -> None:
    """The an8Flower pipeline on the GPU against the CPU (module doc)."""
    out = Path(args.out)
    common = [
        "experiment=an8flower_double",
        f"paths.log_dir={out / 'logs'}",
        f"paths.data_dir={out / 'data'}",
        "logger=none",
    ]
    timings: dict[str, float] = {}
    run(
        "train (GPU)",
        "train.py",
        [*common, "trainer=gpu", f"trainer.max_epochs={args.epochs}", "~callbacks.feature_mining"],
        timings,
    )
    ckpt = newest(out / "logs" / "train" / "an8flower_double", "*/checkpoints/best.ckpt")
    with_ckpt = [*common, f"ckpt_path={ckpt}"]
    run(
        "mine (GPU)",
        "mine.py",
        [*with_ckpt, "trainer=gpu", "mining.progress=false", "interpretation.galleries=true"],
        timings,
    )
    gpu_features = newest(out / "logs" / "mine" / "an8flower_double", "*/relevant_features.h5")
    run(
        "mine (CPU)",
        "mine.py",
        [*with_ckpt, "trainer=cpu", "mining.progress=false", "interpretation.galleries=false"],
        timings,
    )
    cpu_features = newest(out / "logs" / "mine" / "an8flower_double", "*/relevant_features.h5")
    explain = [*with_ckpt, f"relevant_features={gpu_features}", "num_images=64"]
    run("explain 64 images (GPU)", "explain.py", [*explain, "trainer=gpu"], timings)
    evaluate = [*with_ckpt, f"relevant_features={gpu_features}"]
    run("evaluate (GPU)", "evaluate.py", [*evaluate, "trainer=gpu"], timings)
    gpu_result = newest(out / "logs" / "evaluate" / "an8flower_double", "*/results.json")
    run("evaluate (CPU)", "evaluate.py", [*evaluate, "trainer=cpu"], timings)
    cpu_result = newest(out / "logs" / "evaluate" / "an8flower_double", "*/results.json")

    from vebi.mining import RelevantFeatures

    w_gpu = RelevantFeatures.load(gpu_features).weights
    w_cpu = RelevantFeatures.load(cpu_features).weights
    gpu_values = flat_metrics(json.loads(gpu_result.read_text()))
    cpu_values = flat_metrics(json.loads(cpu_result.read_text()))
    shared = sorted(set(gpu_values) & set(cpu_values))
    differences = {k: abs(gpu_values[k] - cpu_values[k]) for k in shared}
    worst = max(differences, key=differences.get) if differences else None

    print(f"\nGPU check on {torch.cuda.get_device_name(0)} (an8Flower double, SmallVGG):")
    print(f"  {'stage':<26} {'seconds':>8}")
    for stage, seconds in timings.items():
        print(f"  {stage:<26} {seconds:>8.1f}")
    print(f"  {'total':<26} {sum(timings.values()):>8.1f}")
    print("\nAgreement GPU vs CPU (same checkpoint):")
    same_sets = all(
        set(np.flatnonzero(w_gpu[:, c] > 1e-6)) == set(np.flatnonzero(w_cpu[:, c] > 1e-6))
        for c in range(w_gpu.shape[1])
    )
    largest = np.max(np.abs(w_gpu - w_cpu))
    print(f"  W: max |difference| {largest:.2e}, same relevant sets: {same_sets}")
    if worst is not None:
        print(
            f"  metrics: {len(shared)} compared, max |difference| {differences[worst]:.2e} "
            f"({worst})"
        )


if __name__ == "__main__":
    main()
