"""Mining at real scale: what it costs as N grows, and a projection for ImageNet-1k train.

ResNet-50 (torchvision, random weights) keeps m = 17,408 aggregated responses at any input
side, so small sides (32, 64 px) make the forward pass cheap and show the costs that grow with
N and C: the dense G (2 m^2 float64 flops per image, upper block triangle only), the cache
writes (m values per image), the streamed passes (2 N m C flops each). 224 px is the real job.

For each side and N, side by side, each gram mode in a fresh process (so that peak memory is
its own):

* ``bare``: one inference pass over the N images (same loader and batch size, no hooks),
  timed in the first mode's process (the others reuse it);
* each gram mode (``dense``: G summed on the model's device, the solve reads no cache;
  ``streamed``: G never formed, two passes over the activation cache per working-set round),
  through ``FeatureMiner.mine`` from scratch: extraction (forward + responses + G or B + cache
  writes), the solve, its passes and their seconds, peak RSS (Linux VmHWM, reset before each
  mode), the cache's size, and mining / bare (target <= 1.3x at 224 px).

Then per-image costs (ms per image; the streamed pass per image and pass) and a projection for
ImageNet-1k train (1.28M images, C = 1000, this m) on one and on eight 8-GPU nodes, from the
measured passes and solve and the stated assumptions (forward throughput per GPU, FP64 rate,
disk bandwidth per node): which term dominates.

Random weights and random images (generated per index, never held in memory as a whole):
fine for time and memory, which do not depend on what the weights are; the relevant features
found mean nothing. Labels are i mod C, so every class has images.

Usage: python benchmarks/scale.py [--sides 32 64 224] [--images 2000 20000] [--classes 1000]
       [--grams dense streamed] [--archs resnet50] [--batch 50] [--device cpu|cuda]
       [--plan 32:2000 32:20000 224:2000] [--json rows.json]
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
IMAGENET_TRAIN = 1_281_167


class RandomImages(Dataset):
    """``size`` random 3 x side x side images in [0, 1], image i drawn from seed i; label i
    mod C."""

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


def _synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(
    arch: str,
    classes: int,
    side: int,
    images: int,
    batch: int,
    device: str,
    grams: list[str],
    cache_dtype: str,
    bare: float | None = None,
) -> list[dict]:
    """One bare pass (unless its seconds are given), then one mining run per gram mode."""
    from vebi.mining import FeatureMiner
    from vebi.models import TorchvisionClassifier

    torch.manual_seed(0)
    model = TorchvisionClassifier(arch, num_classes=classes).to(device).eval()
    data = RandomImages(images, classes, side)
    loader = DataLoader(data, batch_size=batch, shuffle=False)
    if bare is None:
        started = time.perf_counter()
        with torch.no_grad():
            for x, _ in loader:
                model(x.to(device))
        _synchronise(device)
        bare = time.perf_counter() - started
    rows = []
    for gram in grams:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        _reset_peak()
        before = _status_mb("VmRSS")
        with tempfile.TemporaryDirectory(
            dir=ROOT / "logs" if (ROOT / "logs").is_dir() else None
        ) as folder:
            miner = FeatureMiner(
                mu=10.0,
                batch_size=batch,
                cache_dir=folder,
                progress=False,
                gram=gram,
                cache="off" if gram == "dense" else "on",
                cache_dtype=cache_dtype,
            )
            started = time.perf_counter()
            report = miner.mine(model, data)
            _synchronise(device)
            mining = time.perf_counter() - started
            cache_files = list(Path(folder).glob("activations-*.h5"))
            cache_mb = sum(p.stat().st_size for p in cache_files) / 2**20
        solution = report.solution
        m = int(report.relevant.weights.shape[0])
        rows.append(
            {
                "arch": arch,
                "side": side,
                "classes": classes,
                "images": images,
                "m": m,
                "gram": report.gram,
                "why": report.gram_reason,
                "bare_s": bare,
                "mining_s": mining,
                "ratio": mining / bare,
                "extract_s": report.timings["extract_seconds"],
                "solve_s": report.timings["solve_seconds"],
                "passes": int(report.timings["passes"]),
                "pass_s": report.timings["pass_seconds"],
                "rounds": max(solution.iterations),
                "relevant": int((solution.weights > miner.tolerance).sum()),
                "rss_before_mb": before,
                "peak_rss_mb": _status_mb("VmHWM"),
                "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20
                if device.startswith("cuda")
                else 0.0,
                "cache_mb": cache_mb,
            }
        )
        del report, miner
    return rows


def projection(rows: list[dict], args: argparse.Namespace) -> str:
    """ImageNet-1k train on 1 and 8 nodes of 8 GPUs, from the measured rounds and solve of the
    largest N and the assumptions in ``args``."""
    largest = max(r["images"] for r in rows)
    measured = {r["gram"]: r for r in rows if r["images"] == largest}
    m = rows[0]["m"]
    n, c = IMAGENET_TRAIN, 1000
    gpu_rate = args.gpu_images_per_second
    fp64 = args.gpu_fp64_tflops * 1e12
    disk = args.disk_gb_per_second * 1e9
    streamed = measured.get("streamed")
    passes = streamed["passes"] if streamed else 6
    # cvxpy's work: the solve less its passes (it does not grow with N; on one node's CPU)
    solver_s = max(
        ((r["solve_s"] - r["pass_s"]) for r in measured.values() if r["classes"] == c),
        default=60.0,
    )
    cache_bytes = n * m * (2 if args.cache_dtype == "float16" else 4)
    lines = [
        f"\nProjection for ImageNet-1k train (N = {n:,}, m = {m:,}, C = {c}), from the measured "
        f"{passes} streamed passes and {solver_s:.0f} s of cvxpy work at N = {largest:,} (the "
        "solver's work does not grow with N), assuming per GPU "
        f"{gpu_rate:,.0f} img/s ResNet-50 224 px inference (decoded data), "
        f"{args.gpu_fp64_tflops:g} TFLOP/s FP64, and {args.disk_gb_per_second:g} GB/s disk per "
        f"node; activation cache {cache_bytes / 1e9:.0f} GB ({args.cache_dtype}).",
        f"  {'term (seconds)':<52} {'1 node':>10} {'8 nodes':>10}",
    ]
    table: dict[str, list[float]] = {}
    for nodes in (1, 8):
        gpus = 8 * nodes
        forward = n / (gpus * gpu_rate)
        gram = 2 * n * m * m * 0.625 / (gpus * fp64)  # upper block triangle of 4 blocks
        reduce = 2 * 8 * m * m / (args.network_gb_per_second * 1e9) if gpus > 1 else 0.0
        write = cache_bytes / (nodes * disk)
        read = cache_bytes / (nodes * disk)
        pass_flops = 2 * n * m * c / (gpus * fp64)
        one_pass = max(read, pass_flops)
        terms = {
            "bare forward pass": forward,
            "dense G on the GPUs (FP64)": gram,
            "all-reduce of G (8 m^2 bytes)": reduce,
            "cache write (overlapped with the forward)": write,
            f"streamed passes ({passes} x max(read, FP64 products))": passes * one_pass,
            "cvxpy solves, dense G (classes shared by the GPUs)": solver_s / gpus,
            "cvxpy solves, streamed G (every GPU's process)": solver_s,
        }
        for key, value in terms.items():
            table.setdefault(key, []).append(value)
        dense = forward + gram + reduce + solver_s / gpus
        streamed_total = max(forward, write) + passes * one_pass + solver_s
        table.setdefault("mining, dense G, no cache", []).append(dense)
        table.setdefault("mining, streamed G", []).append(streamed_total)
        table.setdefault("  dense / bare", []).append(dense / forward)
        table.setdefault("  streamed / bare", []).append(streamed_total / forward)
    for key, (one, eight) in table.items():
        fmt = "{:>9.2f}x" if "/" in key else "{:>10.0f}"
        lines.append(f"  {key:<52} {fmt.format(one)} {fmt.format(eight)}")
    dense_terms = ("dense G", "cvxpy solves, dense", "all-reduce")
    for column, nodes in ((0, 1), (1, 8)):
        terms = {k: v[column] for k, v in table.items() if k.startswith(dense_terms)}
        worst = max(terms, key=lambda key: terms[key])
        passes_s = table[next(k for k in table if k.startswith("streamed passes"))][column]
        lines.append(
            f"  {nodes} node(s): the forward pass dominates dense mining (next: '{worst}', "
            f"{terms[worst]:.1f} s); streamed, the {passes} reads of the "
            f"{cache_bytes / 1e9:.0f} GB cache ({passes_s:.0f} s) dominate: dense is the default "
            "where G fits a GPU (gram=auto)."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", nargs="+", type=int, default=[32, 64, 224])
    parser.add_argument("--images", nargs="+", type=int, default=[2000])
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--archs", nargs="+", default=["resnet50"])
    parser.add_argument("--classes", nargs="+", type=int, default=[1000])
    parser.add_argument("--grams", nargs="+", default=["dense", "streamed"])
    parser.add_argument("--cache-dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpu-images-per-second", type=float, default=2500.0)
    parser.add_argument("--gpu-fp64-tflops", type=float, default=50.0)
    parser.add_argument("--disk-gb-per-second", type=float, default=2.0)
    parser.add_argument("--network-gb-per-second", type=float, default=50.0)
    parser.add_argument(
        "--plan",
        nargs="+",
        metavar="SIDE:N",
        help="(side, N) pairs to run instead of every side with every N, e.g. 32:20000 224:2000",
    )
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--from-json", help="print the tables of rows written by --json")
    parser.add_argument("--worker", nargs=4, metavar="X", help=argparse.SUPPRESS)
    parser.add_argument("--bare-seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        arch, classes, side, images = args.worker[0], *map(int, args.worker[1:])
        rows = worker(
            arch,
            classes,
            side,
            images,
            args.batch,
            args.device,
            args.grams,
            args.cache_dtype,
            args.bare_seconds,
        )
        print(json.dumps(rows))
        return
    rows: list[dict] = []
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
        args.archs = []
    for arch in args.archs:
        for classes in args.classes:
            plan = [(s, n) for s in args.sides for n in args.images]
            if args.plan:
                plan = [(int(a), int(b)) for a, b in (pair.split(":") for pair in args.plan)]
            for side, images in plan:
                bare: float | None = None
                for gram in args.grams:
                    command = [sys.executable, __file__, "--worker", arch, str(classes)]
                    command += [str(side), str(images), "--batch", str(args.batch)]
                    command += ["--device", args.device, "--cache-dtype", args.cache_dtype]
                    command += ["--grams", gram]
                    if bare is not None:
                        command += ["--bare-seconds", str(bare)]
                    print(f"... {arch}, {side} px, C={classes}, N={images}, {gram}", flush=True)
                    started = time.perf_counter()
                    done = subprocess.run(
                        command, cwd=ROOT, capture_output=True, text=True, check=False
                    )
                    if done.returncode != 0:
                        sys.exit(f"{arch}/{side}/{images}/{gram} failed:\n{done.stderr[-3000:]}")
                    found = json.loads(done.stdout.strip().splitlines()[-1])
                    print(f"    {time.perf_counter() - started:.0f} s", flush=True)
                    print("   ", json.dumps(found[0]), flush=True)
                    bare = found[0]["bare_s"]
                    rows.extend(found)
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    if any(r["classes"] == 1000 for r in rows):
        print(projection([r for r in rows if r["classes"] == 1000], args))


def table(rows: list[dict]) -> str:
    header = (
        f"{'network':<9} {'side':>4} {'C':>5} {'N':>6} {'m':>6} {'G':<8} {'bare s':>7} "
        f"{'extract':>7} {'solve':>6} {'passes':>6} {'pass s':>6} {'mining':>7} {'ratio':>6} "
        f"{'peak RSS':>9} {'cache':>8}"
    )
    lines = ["", header]
    for r in rows:
        per_pass = r["pass_s"] / r["passes"] if r["passes"] else 0.0
        lines.append(
            f"{r['arch']:<9} {r['side']:>4} {r['classes']:>5} {r['images']:>6} {r['m']:>6} "
            f"{r['gram']:<8} {r['bare_s']:>7.1f} {r['extract_s']:>7.1f} {r['solve_s']:>6.1f} "
            f"{r['passes']:>6} {per_pass:>6.1f} {r['mining_s']:>7.1f} {r['ratio']:>5.2f}x "
            f"{r['peak_rss_mb']:>6.0f} MB {r['cache_mb']:>5.0f} MB"
        )
    lines.append(
        "\nPer image (ms): bare forward, extraction overhead over it (responses, G or B, cache "
        "writes), one streamed pass"
    )
    for r in rows:
        n = r["images"]
        per_pass = r["pass_s"] / r["passes"] / n * 1e3 if r["passes"] else 0.0
        lines.append(
            f"  {r['side']:>4} px N={n:>6} {r['gram']:<8} bare {r['bare_s'] / n * 1e3:6.2f}  "
            f"extraction +{(r['extract_s'] - r['bare_s']) / n * 1e3:6.2f}  pass {per_pass:6.2f}"
        )
    sides = sorted({r["side"] for r in rows})
    for side in sides:
        for gram in sorted({r["gram"] for r in rows}):
            series = sorted(
                (r for r in rows if r["side"] == side and r["gram"] == gram),
                key=lambda r: r["images"],
            )
            if len(series) > 1:
                growth = series[-1]["ratio"] / series[0]["ratio"]
                lines.append(
                    f"  {side} px {gram}: mining/bare {series[0]['ratio']:.2f}x at N="
                    f"{series[0]['images']} -> {series[-1]['ratio']:.2f}x at N="
                    f"{series[-1]['images']} ({100 * (growth - 1):+.0f} %; target: at most +10 %)"
                )
    lines.append(
        "targets: mining <= 1.3x the bare pass at 224 px; the ratio flat in N. Random weights "
        "and images: timing and memory only."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
