"""Peak memory of the evaluators does not grow with the number of test images.

For 1,000 and 10,000 random test images of 3 x 224 x 224 (generated per index, never held as a
whole), each in a fresh process: the sparse classifier, ablation (5 draws, other-class sample
of 1,000) and deletion/insertion + artefact scoring of 256 images, on a small CNN (the cost of
the network is not what is measured). Prints the peak resident memory of each run and their
ratio (target: within 10 %), next to the float32 size the test images would take in memory.

Usage: python benchmarks/evaluation_memory.py [--sizes 1000 10000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

SIDE = 224
CLASSES = 10


class RandomImages(Dataset):
    """Image i: uniform noise from seed i, label i mod 10."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.labels = torch.arange(size) % CLASSES

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(int(index))
        return torch.rand(3, SIDE, SIDE, generator=generator), int(index) % CLASSES


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(size: int) -> dict:
    from vebi.evaluation import AblationRelevance, EvaluationSet, sparse_classifier_accuracy
    from vebi.evaluation.faithfulness import CheckerboardScore, DeletionArea, InsertionArea
    from vebi.evaluation.heatmaps import HeatmapEvaluation, balanced_subset
    from vebi.evaluation.methods import CentreGaussian
    from vebi.mining.features import FeatureIndex
    from vebi.mining.relevant import RelevantFeatures

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, CLASSES),
    ).eval()
    weights = np.zeros((8, CLASSES))
    for c in range(CLASSES):
        weights[c % 8, c] = 1.0
    relevant = RelevantFeatures(
        weights, FeatureIndex(("1",), (8,)), [str(c) for c in range(CLASSES)], mu=1.0
    )
    data = EvaluationSet.from_dataset(RandomImages(size), batch_size=64)
    started = time.perf_counter()
    sparse_classifier_accuracy(net, relevant, data, batch_size=64)
    AblationRelevance(draws=5, other_images=1000, batch_size=64)(
        net, relevant, data, progress=False
    )
    subset = data.select(balanced_subset(data.labels, 256, 0))
    metrics = {
        "deletion": DeletionArea(steps=10),
        "insertion": InsertionArea(steps=10),
        "artefacts": CheckerboardScore(),
    }
    HeatmapEvaluation(metrics, batch_size=32)(
        net, {"centre": CentreGaussian(net, relevant)}, subset, progress=False
    )
    return {"size": size, "seconds": time.perf_counter() - started, "peak_mb": _peak_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 10_000])
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    rows = []
    for size in args.sizes:
        print(f"... {size} test images", flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--worker", str(size)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"\n{'test images':>11} {'in memory would be':>19} {'peak RSS':>9} {'seconds':>8}")
    for row in rows:
        held = row["size"] * 3 * SIDE * SIDE * 4 / 2**20
        print(
            f"{row['size']:>11} {held:>16.0f} MB {row['peak_mb']:>6.0f} MB {row['seconds']:>8.1f}"
        )
    ratio = rows[-1]["peak_mb"] / rows[0]["peak_mb"]
    print(
        f"\npeak RSS ratio {rows[-1]['size']} / {rows[0]['size']} images: {ratio:.3f}x "
        "(target: within 10 %, i.e. <= 1.10x)"
    )


if __name__ == "__main__":
    main()
