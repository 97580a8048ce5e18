"""Benchmark of relevant-feature mining on the trained MNIST LeNet (issue: mining targets).

Prints, measured side by side in one run:

* the time of a bare inference pass over the training digits (same loader and batch size),
  of extraction + accumulation (activation cache, G = X^T X, B = X^T Y) and of the solve,
  and their ratios (targets: whole mining <= 1.3x the bare pass; solve <= 10% of it);
* peak extra memory of mining for N = 10k and N = 60k digits (target: flat in N), each in a
  fresh process;
* the working-set cvxpy solver against the exact LARS homotopy at m = 1140 (LeNet responses)
  and m = 4000 (random ReLU features of the digits): time, objective agreement, L1 bound
  (target: within 2x of the homotopy's time, agreement <= 1e-6).

Usage: python benchmarks/mining.py [--ckpt PATH] [--device cpu|cuda]
(the default checkpoint is the newest of logs/train/mnist; `make run` makes one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from vebi import load_classifier
from vebi.checkpoint import newest_checkpoint
from vebi.data import MNISTDataModule
from vebi.mining import FeatureExtractor, FeatureMiner, mu_lasso
from vebi.mining.solver import lasso_objective
from vebi.testing import lasso_homotopy_reference
from vebi.utils.allocator import reuse_freed_memory

ROOT = Path(__file__).resolve().parents[1]
BATCH = 500
REPEATS = 2


def training_digits(size: int | None = None) -> TensorDataset:
    """The 60k official training digits (train + val splits), or the first ``size``."""
    datamodule = MNISTDataModule(data_dir=ROOT / "data")
    datamodule.prepare_data()
    datamodule.setup()
    images = torch.cat([datamodule.data_train.tensors[0], datamodule.data_val.tensors[0]])
    labels = torch.cat([datamodule.data_train.tensors[1], datamodule.data_val.tensors[1]])
    return TensorDataset(images[:size], labels[:size])


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (Linux VmHWM)."""
    return _status_mb("VmHWM")


def bare_inference_seconds(model: torch.nn.Module, data: TensorDataset, device: str) -> float:
    loader = DataLoader(data, batch_size=BATCH, shuffle=False)
    started = time.perf_counter()
    with torch.no_grad():
        for images, _ in loader:
            model(images.to(device))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def mine_seconds(model: torch.nn.Module, data: TensorDataset) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as cache:
        miner = FeatureMiner(batch_size=BATCH, cache_dir=cache, progress=False)
        started = time.perf_counter()
        report = miner.mine(model, data)
        total = time.perf_counter() - started
    return {"total": total, **report.timings}


def memory_child(ckpt: str, size: int, device: str) -> None:
    """Run in a fresh process: peak extra RSS of mining ``size`` digits."""
    model = load_classifier(ckpt, map_location=device).net
    data = training_digits(size)
    before = current_rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    mine_seconds(model, data)
    print(json.dumps({"size": size, "before_mb": before, "peak_mb": peak_rss_mb()}))


def median_seconds(function, repeats: int = 5) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def solver_comparison(gram: np.ndarray, cross: np.ndarray, n: int, label: str) -> None:
    """Both solvers timed alike: a warm-up call each, then the median of 5 runs; the homotopy
    follows the path only until ||w||_1 crosses mu (not the whole path)."""
    homotopy = median_seconds(lambda: lasso_homotopy_reference(gram, cross, 10.0, n))
    ours = median_seconds(lambda: mu_lasso(gram, cross, 10.0))
    reference = lasso_homotopy_reference(gram, cross, 10.0, n)
    solution = mu_lasso(gram, cross, 10.0)
    a, b = lasso_objective(gram, cross, solution.weights), lasso_objective(gram, cross, reference)
    print(
        f"  {label}: cvxpy working set {ours:.2f} s, homotopy {homotopy:.2f} s (medians of 5 "
        f"after a warm-up), ratio {ours / homotopy:.2f}x (target <= 2x); max relative objective "
        f"difference {np.max(np.abs(a - b) / np.abs(b)):.1e}; "
        f"max ||w||_1 - mu = {np.max(np.abs(solution.weights).sum(0) - 10.0):.1e}; "
        f"working sets {min(solution.working_set_sizes)}-{max(solution.working_set_sizes)} features"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    ckpt = args.ckpt or str(newest_checkpoint(ROOT / "logs" / "train" / "mnist"))
    if args.memory_child:
        memory_child(ckpt, args.memory_child, args.device)
        return

    print(f"checkpoint: {ckpt}\ndevice: {args.device}, torch threads: {torch.get_num_threads()}")
    model = load_classifier(ckpt, map_location=args.device).net
    data = training_digits()
    bare_inference_seconds(
        model, TensorDataset(*(t[:2000] for t in data.tensors)), args.device
    )  # warm-up
    # interleaved repeats, best of each: this machine's timings vary by 10-20% run to run
    bares, mines = [], []
    for _ in range(REPEATS):
        bares.append(bare_inference_seconds(model, data, args.device))
        mines.append(mine_seconds(model, data))
    bare = min(bares)
    mined = min(mines, key=lambda row: row["total"])
    print(f"\nMining the 60k training digits (batch {BATCH}, best of {REPEATS} interleaved runs):")
    print(f"  bare inference pass:        {bare:7.2f} s")
    print(f"  extraction + cache + G, B:  {mined['extract_seconds']:7.2f} s")
    print(f"  solve (10 classes, m=1140): {mined['solve_seconds']:7.2f} s")
    print(f"  whole mining:               {mined['total']:7.2f} s")
    print(f"  ratio whole mining / bare inference: {mined['total'] / bare:.2f}x (target <= 1.3x)")
    solve_ratio = mined["solve_seconds"] / bare
    print(f"  ratio solve / bare inference:        {solve_ratio:.3f} (target <= 0.10)")

    print("\nPeak extra memory of mining (fresh process each):")
    peaks = {}
    for size in (10_000, 60_000):
        command = [sys.executable, __file__, "--ckpt", ckpt, "--device", args.device]
        command += ["--memory-child", str(size)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        peaks[size] = row["peak_mb"] - row["before_mb"]
        print(f"  N = {size:6d}: {peaks[size]:7.1f} MB above the data set in memory")
    print(f"  ratio 60k / 10k: {peaks[60_000] / peaks[10_000]:.2f}x (target: flat, ~1x)")

    print("\nSolver against the exact homotopy (10 classes, N = 10k digits, mu = 10):")
    subset = TensorDataset(*(t[:10_000] for t in data.tensors))
    images, labels = subset.tensors
    y = np.eye(10)[labels.numpy()]
    layers = ["conv1", "pool1", "conv2", "pool2", "conv3", "relu3"]
    with FeatureExtractor(model, layers) as extractor:
        x = torch.cat(
            [
                extractor(images[i : i + BATCH].to(args.device))[0].cpu()
                for i in range(0, 10_000, BATCH)
            ]
        )
    x = x.double().numpy()
    solver_comparison(x.T @ x, x.T @ y, len(x), "m = 1140 (LeNet responses)")
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(784, 4000, generator=generator, dtype=torch.float64)
    features = torch.relu(images.flatten(1).double() @ projection)
    features = (features / features.norm(dim=1, keepdim=True)).numpy()
    solver_comparison(
        features.T @ features, features.T @ y, len(features), "m = 4000 (random ReLU features)"
    )


if __name__ == "__main__":
    reuse_freed_memory()  # as the entry points do (vebi.utils.allocator)
    main()
