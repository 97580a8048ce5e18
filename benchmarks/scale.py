"""Mining at real scale: torchvision VGG-16 and ResNet-50 at 224 px, 12 and 1000 classes.

For each network and class count, in a fresh process (so that peak memory is its own):

* m (default feature layers) and the number of images N;
* ``bare``: one inference pass over the N images (same loader and batch size, no hooks);
* ``mining``: ``FeatureMiner.mine`` from scratch (extraction into the activation cache,
  B = X^T Y, the mu-lasso for every class) and its ratio to the bare pass (target <= 1.3x);
* ``solve``: the mu-lasso part of it, and how G was handled (streamed above 4096 features);
* ``peak RSS``: the process's peak resident memory during mining (Linux VmHWM, reset after
  the bare pass; target <= 4 GB), and the resident memory before mining (model + torch).

Random weights and random images (generated per index, never held in memory as a whole):
fine for time and memory, which do not depend on what the weights are; the relevant features
found mean nothing. Labels are i mod C, so every class has images.

Usage: python benchmarks/scale.py [--images 600] [--batch 25] [--archs vgg16 resnet50]
       [--classes 12 1000] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]


class RandomImages(Dataset):
    """``size`` random 3 x 224 x 224 images in [0, 1], image i drawn from seed i; label i mod C."""

    def __init__(self, size: int, classes: int, side: int = 224) -> None:
        self.size, self.classes, self.side = size, classes, side

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(int(index))
        image = torch.rand(3, self.side, self.side, generator=generator)
        return image, int(index) % self.classes


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(arch: str, classes: int, images: int, batch: int, device: str) -> dict:
    from vebi.mining import FeatureMiner
    from vebi.models import TorchvisionClassifier

    torch.manual_seed(0)
    model = TorchvisionClassifier(arch, num_classes=classes).to(device).eval()
    data = RandomImages(images, classes)
    loader = DataLoader(data, batch_size=batch, shuffle=False)
    started = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            model(x.to(device))
    if device == "cuda":
        torch.cuda.synchronize()
    bare = time.perf_counter() - started
    _reset_peak()
    before = _status_mb("VmRSS")
    with tempfile.TemporaryDirectory() as cache_dir:
        miner = FeatureMiner(mu=10.0, batch_size=batch, cache_dir=cache_dir, progress=False)
        started = time.perf_counter()
        report = miner.mine(model, data)
        if device == "cuda":
            torch.cuda.synchronize()
        mining = time.perf_counter() - started
        cache_mb = report.cache_path.stat().st_size / 2**20
    solution = report.solution
    return {
        "arch": arch,
        "classes": classes,
        "images": images,
        "m": int(report.relevant.weights.shape[0]),
        "gram": "dense" if miner._dense(report.relevant.weights.shape[0]) else "streamed",
        "bare_s": bare,
        "mining_s": mining,
        "ratio": mining / bare,
        "extract_s": report.timings["extract_seconds"],
        "solve_s": report.timings["solve_seconds"],
        "rounds": max(solution.iterations),
        "relevant": int((solution.weights > miner.tolerance).sum()),
        "rss_before_mb": before,
        "peak_rss_mb": _status_mb("VmHWM"),
        "cache_mb": cache_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--archs", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--classes", nargs="+", type=int, default=[12, 1000])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", nargs=2, metavar=("ARCH", "CLASSES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        arch, classes = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(arch, classes, args.images, args.batch, args.device)))
        return
    rows = []
    for arch in args.archs:
        for classes in args.classes:
            command = [sys.executable, __file__, "--worker", arch, str(classes)]
            command += ["--images", str(args.images), "--batch", str(args.batch)]
            command += ["--device", args.device]
            print(f"... {arch}, {classes} classes, {args.images} images", flush=True)
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{arch}/{classes} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print()
    print(
        f"{'network':<9} {'C':>5} {'N':>5} {'m':>6} {'G':<8} {'bare s':>7} {'mining s':>8} "
        f"{'ratio':>6} {'solve s':>7} {'rounds':>6} {'RSS before':>10} {'peak RSS':>9} {'cache':>7}"
    )
    for r in rows:
        print(
            f"{r['arch']:<9} {r['classes']:>5} {r['images']:>5} {r['m']:>6} {r['gram']:<8} "
            f"{r['bare_s']:>7.1f} {r['mining_s']:>8.1f} {r['ratio']:>5.2f}x {r['solve_s']:>7.1f} "
            f"{r['rounds']:>6} {r['rss_before_mb']:>7.0f} MB {r['peak_rss_mb']:>6.0f} MB "
            f"{r['cache_mb']:>4.0f} MB"
        )
    print(
        "\ntargets: mining <= 1.3x the bare pass; peak RSS <= 4 GB (4096 MB). Random weights "
        "and images: timing and memory only."
    )


if __name__ == "__main__":
    main()
