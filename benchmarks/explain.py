"""Benchmark of explanations (issue: explanation targets), measured side by side in one run.

1. Speed: images per second of a full k = 3 explanation (one forward, three batched backward
   passes, maps and combination) against one Captum GuidedBackprop attribution and one Captum
   Grad-CAM (with upsampling), on the same trained MNIST LeNet and the same batch of test digits.
   Target: the k = 3 explanation takes <= 2.5x the time of one GuidedBackprop.
2. Artefacts: checkerboard scores (share of heatmap energy at the stride grid, period 2) of
   guided-backprop feature visualisations under the standard and the stride_fix conv rule,
   on a SmallVGG (strided convolutions, overlapping max-pooling) trained here on real digits.

Usage: python benchmarks/explain.py [--ckpt PATH] [--device cpu|cuda] [--batch 256]
(the default checkpoint is the newest of logs/train/mnist with its mined features).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from captum.attr import GuidedBackprop, LayerAttribution, LayerGradCam

from vebi import load_classifier
from vebi.checkpoint import newest_checkpoint
from vebi.data import MNISTDataModule
from vebi.explain import Explainer, backprop_feature, checkerboard_score, signal_to_heatmap
from vebi.explain.heatmaps import stride_periods
from vebi.mining import RelevantFeatures
from vebi.models import SmallVGG

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 5


def timed(function, device: str) -> float:
    """Median wall time of ``REPEATS`` calls after one warm-up."""
    function()
    times = []
    for _ in range(REPEATS):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def speed(ckpt: Path, device: str, batch: int, datamodule: MNISTDataModule) -> None:
    model = load_classifier(ckpt, map_location=device).net.eval()
    relevant = RelevantFeatures.load(ckpt.parent.parent / "mining" / "relevant_features.h5")
    images = datamodule.data_test.tensors[0][:batch].to(device)
    with torch.no_grad():
        targets = model(images).argmax(1)
    explainer = Explainer(model, relevant, k=3)
    guided = GuidedBackprop(model)
    gradcam = LayerGradCam(model, model.conv3)

    def run_gradcam() -> torch.Tensor:
        cam = gradcam.attribute(images, target=targets, relu_attributions=True)
        return LayerAttribution.interpolate(cam, images.shape[-2:], interpolate_mode="bilinear")

    def floor() -> None:
        """One forward and three plain backward passes from relu3: what any k=3 method pays."""
        inputs = images.clone().requires_grad_(True)
        captured = {}
        handle = model.relu3.register_forward_hook(lambda m, i, o: captured.__setitem__("a", o))
        model(inputs)
        handle.remove()
        for channel in range(3):
            signal = torch.zeros_like(captured["a"])
            signal[:, channel] = 1.0
            torch.autograd.grad(
                captured["a"], inputs, grad_outputs=signal, retain_graph=channel < 2
            )

    seconds = {
        "vebi k=3 explanation": timed(lambda: explainer(images), device),
        "floor: 1 fwd + 3 bwd": timed(floor, device),
        "Captum GuidedBackprop": timed(lambda: guided.attribute(images, target=targets), device),
        "Captum Grad-CAM": timed(run_gradcam, device),
    }
    print(f"\nSpeed on {batch} MNIST test digits (trained LeNet, median of {REPEATS}):")
    for name, value in seconds.items():
        print(f"  {name:24s} {value:7.3f} s   {batch / value:9.0f} images/s")
    ours, guided = seconds["vebi k=3 explanation"], seconds["Captum GuidedBackprop"]
    floor_ratio = seconds["floor: 1 fwd + 3 bwd"] / guided
    print(f"  ratio k=3 explanation / one GuidedBackprop: {ours / guided:.2f}x (target <= 2.5x)")
    print(f"  ratio floor / one GuidedBackprop:           {floor_ratio:.2f}x")
    print(f"  ratio k=3 explanation / one Grad-CAM:       {ours / seconds['Captum Grad-CAM']:.2f}x")


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
        conv: signal_to_heatmap(backprop_feature(model, images, layer, channel, conv=conv))
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
            signal = backprop_feature(model, test_images, layer, channel, relu="guided", conv=conv)
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
        "--figure", type=Path, default=None, help="save standard vs stride_fix maps"
    )
    args = parser.parse_args()
    ckpt = Path(args.ckpt) if args.ckpt else newest_checkpoint(ROOT / "logs" / "train" / "mnist")
    print(f"checkpoint: {ckpt}\ndevice: {args.device}, torch threads: {torch.get_num_threads()}")
    datamodule = MNISTDataModule(data_dir=ROOT / "data")
    datamodule.prepare_data()
    datamodule.setup()
    speed(ckpt, args.device, args.batch, datamodule)
    artefacts(args.device, datamodule, args.figure)


if __name__ == "__main__":
    main()
