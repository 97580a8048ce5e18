"""Benchmark of explanations, measured side by side in one run.

1. Speed: a full k = 3 explanation (one forward, three batched backward passes, maps and
   combination) against one Captum GuidedBackprop attribution of the same batch and model, and
   against the floor (one forward and three plain backward passes from the deepest layer that
   holds a relevant feature), in one table: the trained MNIST LeNet on 256 test digits, and
   torchvision VGG-16 and ResNet-50 at 224 px on 8 images (random weights and random relevant
   features, 20 per class for 1000 classes, in the deepest third of the layers: fine for timing).
   Target: the k = 3 explanation takes <= 2.5x the time of one GuidedBackprop.
2. Artefacts: checkerboard scores (share of heatmap energy at the stride grid, period 2) of
   guided-backprop feature visualisations under the standard and the stride_fix conv rule,
   on a SmallVGG (strided convolutions, overlapping max-pooling) trained here on real digits.

Usage: python benchmarks/explain.py [--ckpt PATH] [--device cpu|cuda] [--batch 256] [--no-big]
(the default checkpoint is the newest of logs/train/mnist with its mined features; the 224 px
models take a few minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import GuidedBackprop

from vebi import load_classifier
from vebi.checkpoint import newest_checkpoint
from vebi.data import MNISTDataModule
from vebi.explain import (
    Explainer,
    Rules,
    backprop_feature,
    checkerboard_score,
    signal_to_heatmap,
)
from vebi.explain.heatmaps import stride_periods
from vebi.mining import RelevantFeatures
from vebi.mining.features import FeatureIndex, default_feature_layers
from vebi.models import SmallVGG, TorchvisionClassifier
from vebi.models.hooks import trace_leaf_calls
from vebi.utils.allocator import reuse_freed_memory

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 15
BIG_REPEATS = 3


def timed(functions: dict, device: str, repeats: int = REPEATS) -> dict[str, float]:
    """Median wall time of each function over ``repeats`` rounds, after a warm-up round; the
    functions take turns within each round, so drifts of the machine hit all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_number in range(repeats + 1):
        for name, function in functions.items():
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            function()
            if device == "cuda":
                torch.cuda.synchronize()
            if round_number:  # round 0 warms up
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def _ratios(
    name: str,
    model: torch.nn.Module,
    relevant: RelevantFeatures,
    images: torch.Tensor,
    floor_layer: str,
    device: str,
    repeats: int,
) -> dict[str, float | str]:
    """Seconds of the k = 3 explanation, one Captum GuidedBackprop and the floor (one forward
    and three plain backward passes from ``floor_layer``) on the same batch and model."""
    with torch.no_grad():
        targets = model(images).argmax(1)
    explainer = Explainer(model, relevant, k=3)
    guided = GuidedBackprop(model)
    module = dict(model.named_modules())[floor_layer]

    def floor() -> None:
        inputs = images.clone().requires_grad_(True)
        captured = {}
        handle = module.register_forward_hook(lambda m, i, o: captured.__setitem__("a", o))
        model(inputs)
        handle.remove()
        for channel in range(3):
            signal = torch.zeros_like(captured["a"])
            signal[:, channel] = captured["a"][:, channel].detach()
            torch.autograd.grad(
                captured["a"], inputs, grad_outputs=signal, retain_graph=channel < 2
            )

    functions = {
        "ours": lambda: explainer(images),
        "guided": lambda: guided.attribute(images, target=targets),
        "floor": floor,
    }
    seconds = timed(functions, device, repeats)
    return {"model": name, "batch": len(images), **seconds}


def synthetic_relevant(
    model: torch.nn.Module, probe: torch.Tensor, classes: int, per_class: int, seed: int = 0
) -> tuple[RelevantFeatures, str]:
    """Random relevant features (``per_class`` per class, weights in (0, 1]) in the deepest
    third of the default feature layers, where most relevant features of ImageNet classes
    lie: each explanation then propagates through nearly the whole network (the costly case).
    Returns the features and the deepest layer that holds one (the floor's start)."""
    layers = default_feature_layers(model, probe)
    modules = dict(model.named_modules())
    shapes = dict(trace_leaf_calls(model, probe, {n: modules[n] for n in layers}))
    index = FeatureIndex(tuple(layers), tuple(shapes[layer][1] for layer in layers))
    deep = range(index.offsets[2 * len(layers) // 3], index.size)
    generator = np.random.default_rng(seed)
    weights = np.zeros((index.size, classes))
    for c in range(classes):
        chosen = generator.choice(deep, per_class, replace=False)
        weights[chosen, c] = generator.uniform(0.05, 1.0, per_class)
    deepest_layer = max(
        (index.locate(int(f))[0] for f in np.flatnonzero(weights.any(1))), key=layers.index
    )
    relevant = RelevantFeatures(weights, index, [str(c) for c in range(classes)], mu=10.0)
    return relevant, deepest_layer


def speed(ckpt: Path, device: str, batch: int, datamodule: MNISTDataModule, big: bool) -> None:
    rows = []
    model = load_classifier(ckpt, map_location=device).net.eval()
    relevant = RelevantFeatures.load(ckpt.parent.parent / "mining" / "relevant_features.h5")
    images = datamodule.data_test.tensors[0][:batch].to(device)
    rows.append(_ratios("LeNet (trained)", model, relevant, images, "relu3", device, REPEATS))
    if big:
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(8, 3, 224, 224, generator=generator).to(device)
        for architecture in ("vgg16", "resnet50"):
            torch.manual_seed(0)
            net = TorchvisionClassifier(architecture, num_classes=1000).to(device).eval()
            for module in net.modules():  # Captum's hooks need out-of-place ReLUs
                if isinstance(module, torch.nn.ReLU):
                    module.inplace = False
            relevant, deepest = synthetic_relevant(net, images[:1], classes=1000, per_class=20)
            name = f"{architecture} (random weights, 224 px)"
            rows.append(_ratios(name, net, relevant, images, deepest, device, BIG_REPEATS))
    print(
        f"\nSpeed of a k = 3 explanation (median of {REPEATS} rounds, {BIG_REPEATS} for the 224 px"
    )
    print(f"models, after a warm-up round; the three take turns in each round; device {device}):")
    header = (
        f"  {'model':34s} {'batch':>5s} {'ours s':>8s} {'guided s':>9s} {'floor s':>8s} "
        f"{'ours/guided':>12s} {'floor/guided':>13s}"
    )
    print(header)
    for row in rows:
        print(
            f"  {row['model']:34s} {row['batch']:5d} {row['ours']:8.3f} {row['guided']:9.3f} "
            f"{row['floor']:8.3f} {row['ours'] / row['guided']:11.2f}x "
            f"{row['floor'] / row['guided']:12.2f}x"
        )
    print("  target: ours/guided <= 2.5x; floor = 1 forward + 3 plain backward passes from the")
    print("  deepest layer holding a relevant feature (what any k = 3 method pays)")


def most_active_channel(model: torch.nn.Module, images: torch.Tensor, layer: str) -> int:
    captured = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: captured.__setitem__("a", o))
    with torch.no_grad():
        model(images)
    handle.remove()
    return int(captured["a"].pow(2).sum(dim=(0, 2, 3)).argmax())


def artefact_figure(
    model: torch.nn.Module, images: torch.Tensor, layer: str, channel: int, path: Path
) -> None:
    """Heatmaps of one feature on a few digits: standard vs stride_fix conv rule."""
    from matplotlib.figure import Figure

    from vebi.explain.figures import save_figure

    maps = {
        conv: signal_to_heatmap(
            backprop_feature(model, images, layer, channel, rules=Rules(conv=conv))
        )
        for conv in ("standard", "stride_fix")
    }
    figure = Figure(figsize=(1.6 * len(images), 3.6))
    axes = figure.subplots(2, len(images), squeeze=False)
    for row, conv in enumerate(maps):
        for column in range(len(images)):
            axes[row, column].imshow(maps[conv][column].cpu(), cmap="jet")
            axes[row, column].axis("off")
        axes[row, 0].set_title(f"{conv} ({layer}/{channel})", fontsize=8, loc="left")
    save_figure(figure, path)
    print(f"  figure: {path}")


def artefacts(device: str, datamodule: MNISTDataModule, figure: Path | None) -> None:
    images, labels = datamodule.data_train.tensors
    torch.manual_seed(0)
    model = SmallVGG(num_classes=10, in_channels=1).to(device)
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for start in [*range(0, 8000, 100)] * 2:
        batch = images[start : start + 100].to(device)
        loss = F.cross_entropy(model(batch), labels[start : start + 100].to(device))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    test_images, test_labels = (t[:512].to(device) for t in datamodule.data_test.tensors)
    with torch.no_grad():
        accuracy = (model(test_images).argmax(1) == test_labels).float().mean().item()
    periods = stride_periods(model)[:1]
    print(
        f"\nCheckerboard scores (period {periods[0]}, mean over 512 test digits; SmallVGG"
        f" trained on 8k digits, test accuracy {100 * accuracy:.1f}%; lower is better):"
    )
    print(f"  {'layer':8s} {'channel':>7s} {'standard':>10s} {'stride_fix':>11s} {'ratio':>7s}")
    for layer in ("relu2", "pool2", "relu3"):
        channel = most_active_channel(model, test_images, layer)
        scores = {}
        for conv in ("standard", "stride_fix"):
            signal = backprop_feature(
                model, test_images, layer, channel, rules=Rules(relu="guided", conv=conv)
            )
            scores[conv] = checkerboard_score(signal_to_heatmap(signal), periods).mean().item()
        print(
            f"  {layer:8s} {channel:7d} {scores['standard']:10.4f} {scores['stride_fix']:11.4f} "
            f"{scores['stride_fix'] / scores['standard']:7.2f}"
        )
        if figure is not None and layer == "pool2":
            artefact_figure(model, test_images[:6], layer, channel, figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--no-big", action="store_true", help="skip VGG-16 and ResNet-50 at 224 px (minutes)"
    )
    parser.add_argument(
        "--figure", type=Path, default=None, help="save standard vs stride_fix maps"
    )
    args = parser.parse_args()
    ckpt = Path(args.ckpt) if args.ckpt else newest_checkpoint(ROOT / "logs" / "train" / "mnist")
    print(f"checkpoint: {ckpt}\ndevice: {args.device}, torch threads: {torch.get_num_threads()}")
    datamodule = MNISTDataModule(data_dir=ROOT / "data")
    datamodule.prepare_data()
    datamodule.setup()
    speed(ckpt, args.device, args.batch, datamodule, big=not args.no_big)
    artefacts(args.device, datamodule, args.figure)


if __name__ == "__main__":
    reuse_freed_memory()  # as the entry points do (vebi.utils.allocator)
    main()
