"""Wall-clock speed of vebi against zennit-crp (CRP), measured side by side in one run, on the
same model and the same images.

1. Explanations: vebi's full k = 3 explanation (``Explainer(model, relevant, k=3)(images,
   classes)``: one forward pass, three batched backward passes, maps and their combination)
   against CRP's conditional attribution of the same three features per image
   (``CondAttribution(model)(data, conditions, EpsilonPlusFlat, exclude_parallel=False)``, one
   condition {layer: [channel], "y": [class]} per (image, feature), as
   :meth:`vebi.evaluation.peers.CRPConditional.conditional_maps` runs it, maps included). The
   features are picked once by ``Explainer.choose`` before timing: CRP's time holds CRP alone,
   and the pick (one forward pass) is shown on its own row. The classes are the predicted ones.
2. Reference images (galleries): vebi's average visualisations of every relevant feature of
   every class on its top-N training images of that class (the x rows of the training images
   from the mined feature extractor, then ``average_visualisations``: ranking and one backward
   pass per feature) against CRP's reference images of the same features (layer, channel) on
   the same training images: ``FeatureVisualization.run`` (RelMax/ActMax and statistics over
   the data; the composite EpsilonPlusFlat, the layers holding a relevant feature) then
   ``get_max_reference(channels, layer, "relevance", (0, N), composite)`` per layer, which
   also computes the conditional heatmaps of the references (raw tensors, ``plot_fn=None``).
   CRP ranks a channel over all the images (by their label's relevance), vebi per class:
   a feature relevant to two classes is visualised twice by vebi, once by CRP.

Models: the trained MNIST LeNet with its mined relevant features (256 test digits for part 1,
2,000 training digits for part 2) and, with ``--big``, torchvision VGG-16 at 224 px with random
weights and random relevant features (part 1 only, 8 random images). Timings: median of
``--repeats`` rounds (``--gallery-repeats`` for part 2) after a warm-up round, the contenders
taking turns within each round.

Usage: python benchmarks/peers_speed.py [--ckpt PATH] [--images 256] [--train-images 2000]
[--repeats 3] [--gallery-repeats 1] [--top-n 20] [--device cpu|cuda] [--big]
(the default checkpoint is logs/leaderboard/mnist/seed_301/train with its mined features; a
few minutes on a 2-core CPU, most of them in CRP's reference images; --big adds minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from explain import timed  # the same side-by-side timer (benchmarks/ is the script's path)
from vebi import load_classifier
from vebi.data import MNISTDataModule
from vebi.evaluation.peers import CRPConditional, frozen_parameters, lrp_composite
from vebi.explain import Explainer
from vebi.explain.interpretation import average_visualisations
from vebi.mining import RelevantFeatures
from vebi.models import TorchvisionClassifier
from vebi.models.hooks import eval_mode
from vebi.pipelines.common import mined_features_path
from vebi.utils.allocator import reuse_freed_memory

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CKPT = ROOT / "logs/leaderboard/mnist/seed_301/train/checkpoints/best.ckpt"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """CRP's prints and tqdm bars kept off the table."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


# --------------------------------------------------------------------------------------------
# 1. explanations


def explanation_speed(
    name: str,
    model: nn.Module,
    relevant: RelevantFeatures,
    images: torch.Tensor,
    device: str,
    repeats: int,
) -> list[dict[str, Any]]:
    """Rows: vebi's k = 3 explanation against CRP's conditional maps of the same features, and
    vebi's pick alone (what CRP would add to use it)."""
    with torch.no_grad():
        classes = model(images).argmax(1)
    explainer = Explainer(model, relevant, k=3)
    crp = CRPConditional(model, relevant, pick="vebi", k=3)
    chosen = [[(f.layer, f.channel) for f in row] for row in explainer.choose(images, classes)]
    crp.chosen = lambda _images, _classes: chosen  # the pick, made once: CRP alone is timed
    conditions = sum(len(row) for row in chosen)
    seconds = timed(
        {
            "vebi": lambda: explainer(images, classes),
            "crp": lambda: crp.conditional_maps(images, classes),
            "choose": lambda: explainer.choose(images, classes),
        },
        device,
        repeats,
    )
    return [
        {
            "what": f"explanation k = 3 ({conditions} CRP conditions)",
            "model": name,
            "images": len(images),
            "vebi": seconds["vebi"],
            "crp": seconds["crp"],
        },
        {
            "what": "  vebi's pick alone (Explainer.choose; not in either)",
            "model": name,
            "images": len(images),
            "vebi": seconds["choose"],
            "crp": None,
        },
    ]


# --------------------------------------------------------------------------------------------
# 2. reference images


class LabelledImages(Dataset):
    """(image, integer label) pairs: what CRP's FeatureVisualization indexes (its conditions
    take the label as the class) and vebi's average visualisations read."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels.tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.labels[index]


class FeatureRows:
    """Rows of X in memory, in the layout of ``ActivationCache.iter_chunks``."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def iter_chunks(
        self,
        rows: int | None = None,
        *,
        fields: Sequence[str] = ("features", "labels", "predictions", "indices"),
    ) -> Iterator[dict[str, np.ndarray]]:
        total = len(self.arrays["indices"])
        step = rows or 1024
        for start in range(0, total, step):
            yield {name: self.arrays[name][start : start + step] for name in fields}


def feature_rows(
    model: nn.Module, relevant: RelevantFeatures, dataset: LabelledImages, batch: int
) -> FeatureRows:
    """x of every image (the mined feature extractor: one forward pass), its label and
    prediction: the rows the mining pipeline caches."""
    features, predictions = [], []
    with eval_mode(model), torch.no_grad(), relevant.extractor(model) as extractor:
        for start in range(0, len(dataset), batch):
            x, logits = extractor.forward(dataset.images[start : start + batch])
            features.append(x.cpu().numpy())
            predictions.append(logits.argmax(1).cpu().numpy())
    return FeatureRows(
        {
            "features": np.concatenate(features),
            "labels": np.asarray(dataset.labels),
            "predictions": np.concatenate(predictions),
            "indices": np.arange(len(dataset)),
        }
    )


def gallery_speed(
    name: str,
    model: nn.Module,
    relevant: RelevantFeatures,
    dataset: LabelledImages,
    top_n: int,
    batch: int,
    device: str,
    repeats: int,
) -> list[dict[str, Any]]:
    """Rows: vebi's x pass, then ranking + average visualisations, against CRP's run, then
    get_max_reference of the same (layer, channel) features; and the totals."""
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept
    from crp.visualization import FeatureVisualization

    features = [f for c in range(relevant.num_classes) for f in relevant.relevant(c)]
    channels: dict[str, list[int]] = {}
    for feature in features:
        if feature.channel not in channels.setdefault(feature.layer, []):
            channels[feature.layer].append(feature.channel)
    layers = [layer for layer in relevant.layers if layer in channels]  # in network order
    state: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="crp_fv_"))

    def vebi_rows() -> None:
        state["rows"] = feature_rows(model, relevant, dataset, batch)

    def vebi_visualise() -> None:
        state["vis"] = average_visualisations(model, relevant, dataset, state["rows"], top_n)

    def crp_run() -> None:
        path = Path(tempfile.mkdtemp(dir=work))
        with eval_mode(model), frozen_parameters(model), quiet():
            attribution = CondAttribution(model, no_param_grad=False)
            layer_map = {layer: ChannelConcept() for layer in layers}
            visualization = FeatureVisualization(attribution, dataset, layer_map, path=str(path))
            composite = lrp_composite("epsilon_plus_flat", model, dataset.images[:1])
            visualization.run(composite, 0, len(dataset), batch_size=batch)
        state["fv"] = visualization

    def crp_references() -> None:
        references = {}
        with eval_mode(model), frozen_parameters(model), quiet():
            for layer in layers:
                composite = lrp_composite("epsilon_plus_flat", model, dataset.images[:1])
                references[layer] = state["fv"].get_max_reference(
                    channels[layer], layer, "relevance", (0, top_n), composite, plot_fn=None
                )
        state["refs"] = references

    try:
        seconds = timed(
            {
                "vebi_rows": vebi_rows,
                "vebi_vis": vebi_visualise,
                "crp_run": crp_run,
                "crp_refs": crp_references,
            },
            device,
            repeats,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)  # CRP's .npy files of every round
    # sanity: both produced what they were asked for
    unique = sum(len(c) for c in channels.values())
    made = sum(len(r) for r in state["refs"].values())
    assert made == unique, (made, unique)
    assert all(len(refs[c][1]) == top_n for refs in state["refs"].values() for c in refs)
    count = len(dataset)
    return [
        {
            "what": "  x forward pass vs FeatureVisualization.run",
            "model": name,
            "images": count,
            "vebi": seconds["vebi_rows"],
            "crp": seconds["crp_run"],
        },
        {
            "what": f"  ranking + {len(state['vis'])} avg vis vs get_max_reference x {unique}",
            "model": name,
            "images": count,
            "vebi": seconds["vebi_vis"],
            "crp": seconds["crp_refs"],
        },
        {
            "what": f"reference images, top {top_n} (total)",
            "model": name,
            "images": count,
            "vebi": seconds["vebi_rows"] + seconds["vebi_vis"],
            "crp": seconds["crp_run"] + seconds["crp_refs"],
        },
    ]


# --------------------------------------------------------------------------------------------
# models


def synthetic_relevant(model: nn.Module, probe: torch.Tensor, classes: int) -> RelevantFeatures:
    """Random relevant features in the deepest third of the layers (benchmarks/explain.py)."""
    spec = importlib.util.spec_from_file_location(
        "explain_benchmark", ROOT / "benchmarks/explain.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    relevant, _ = module.synthetic_relevant(model, probe, classes=classes, per_class=20)
    return relevant


def big_rows(device: str, repeats: int) -> list[dict[str, Any]]:
    """Part 1 on torchvision VGG-16 at 224 px (random weights and features, 8 images)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 224, 224, generator=generator).to(device)
    torch.manual_seed(0)
    net = TorchvisionClassifier("vgg16", num_classes=1000).to(device).eval()
    for module in net.modules():  # the peers' hooks need out-of-place ReLUs
        if isinstance(module, nn.ReLU):
            module.inplace = False
    relevant = synthetic_relevant(net, images[:1], classes=1000)
    return explanation_speed("VGG-16 (random, 224 px)", net, relevant, images, device, repeats)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| measurement | model | images | vebi s | CRP s | vebi ms/image | CRP ms/image "
        "| CRP / vebi |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        vebi, crp, count = row["vebi"], row["crp"], row["images"]
        crp_cells = (
            f"{crp:.3f} | {1000 * vebi / count:.3f} | {1000 * crp / count:.3f} | {crp / vebi:.2f}x"
            if crp is not None
            else f"- | {1000 * vebi / count:.3f} | - | -"
        )
        lines.append(f"| {row['what']} | {row['model']} | {count} | {vebi:.3f} | {crp_cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    parser.add_argument("--images", type=int, default=256, help="test digits (part 1)")
    parser.add_argument("--train-images", type=int, default=2000, help="training digits (part 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of part 1")
    parser.add_argument(
        "--gallery-repeats", type=int, default=1, help="timed rounds of part 2 (long ones)"
    )
    parser.add_argument("--top-n", type=int, default=20, help="reference images per feature")
    parser.add_argument("--batch", type=int, default=256, help="batch of the part 2 passes")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--big", action="store_true", help="part 1 on VGG-16 at 224 px too")
    args = parser.parse_args()
    print(f"checkpoint: {args.ckpt}")
    print(
        f"device: {args.device}, torch threads: {torch.get_num_threads()}, "
        f"torch {torch.__version__}, zennit {version('zennit')}, zennit-crp {version('zennit-crp')}"
    )
    model = load_classifier(args.ckpt, map_location=args.device).net.eval()
    relevant = RelevantFeatures.load(mined_features_path(args.ckpt))
    datamodule = MNISTDataModule(data_dir=ROOT / "data")
    datamodule.prepare_data()
    datamodule.setup()
    test = datamodule.data_test.tensors[0][: args.images].to(args.device)
    train_images, train_labels = (t[: args.train_images] for t in datamodule.data_train.tensors)
    train = LabelledImages(train_images.to(args.device), train_labels)

    lenet = "LeNet (trained)"
    rows = explanation_speed(lenet, model, relevant, test, args.device, args.repeats)
    rows += gallery_speed(
        lenet, model, relevant, train, args.top_n, args.batch, args.device, args.gallery_repeats
    )
    big_repeats = min(args.repeats, 3)
    if args.big:
        rows += big_rows(args.device, big_repeats)
    print(
        f"\nvebi vs zennit-crp: medians after a warm-up round, contenders taking turns in each "
        f"round ({args.repeats} rounds for the explanations, {args.gallery_repeats} for the "
        f"reference images{f', {big_repeats} for VGG-16' if args.big else ''}); ms/image of the "
        "reference images: per training image scanned\n"
    )
    print(table(rows))


if __name__ == "__main__":
    reuse_freed_memory()  # as the entry points do (vebi.utils.allocator)
    main()
