"""Draw a gallery of generated an8Flower images with their masks (one column per class).

Usage: python experiments/an8flower_gallery.py [--variant double] [--out PATH.png]
(default: logs/figures/an8flower_<variant>.png; --out docs/images/an8flower_<variant>.png
replaces the README's picture)
The images are drawn afresh by the generator (same seed as the data sets: same pictures).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from vebi.data.an8flower import VARIANTS, An8FlowerGenerator
from vebi.explain.figures import save_figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="double", choices=sorted(VARIANTS))
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(f"logs/figures/an8flower_{args.variant}.png")
    generator = An8FlowerGenerator(args.variant, image_size=112, seed=0)
    classes = generator.variant.num_classes
    figure = Figure(figsize=(1.3 * classes, 2.7 * args.per_class))
    axes = figure.subplots(2 * args.per_class, classes)
    for class_id in range(classes):
        images, visible = generator.render(class_id, range(args.per_class))
        masks = generator.deciding_mask(visible)
        for row in range(args.per_class):
            axes[2 * row, class_id].imshow(images[row])
            axes[2 * row + 1, class_id].imshow(
                np.where(masks[row], 0, 255), cmap="gray", vmin=0, vmax=255
            )
        name = generator.variant.class_name(class_id).split("_", 1)[1].replace("_", "\n")
        axes[0, class_id].set_title(name, fontsize=7)
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle(
        f"an8Flower-style {args.variant}: images and masks of the deciding parts (dark)", fontsize=9
    )
    print(save_figure(figure, out))


if __name__ == "__main__":
    main()
