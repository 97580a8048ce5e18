"""Sanity checks of heatmap methods: cascading model-parameter randomisation
(docs/method.md, section 5).

Adebayo et al. ("Sanity Checks for Saliency Maps", NeurIPS 2018) re-initialise a trained
network's layers from the logits down, one at a time and cumulatively, and compare every
method's maps after each step with the trained network's maps on the same images and classes.
A method whose maps stay the same explains the input, not the network. Ours picks its features
through the mined W, so after each step it is run twice: with W mined again on the randomised
network (``<method>``, compared with W mined the same way, on the same training images, on the
trained network) and with the trained network's W kept (``<method>/original_W``, compared with
the trained network's maps).
The *data randomisation* test compares, in the same way, the maps of the network with those
of the same architecture trained on randomly permuted labels (its own W mined on its own
training run), given as ``data_randomised_checkpoint``.

Similarity of a randomised map b to the trained map a, per image:

* ``spearman``: Spearman's rank correlation of the signed signals (the input-space signal
  summed over colour channels, :meth:`~vebi.evaluation.methods.HeatmapMethod.maps_and_signal`;
  the map itself for methods whose output is non-negative);
* ``spearman_abs``: the same of their absolute values;
* ``ssim``: the structural similarity of the maps (scikit-image, 7 x 7 window, data range the
  range of both maps, as Quantus);
* ``hog``: Pearson's correlation of the maps' histograms of oriented gradients (9
  orientations, cells of a 1/8 of the map's side, 2 x 2 cells per block, L2-Hys).

A correlation that is undefined (a constant map) counts 1 when the two maps are equal, else 0:
a randomisation that flattens a map has changed it. Each layer is re-initialised by its own
``reset_parameters`` (PyTorch's default initialisation) right after seeding torch's generator
with ``seed + 1``, every module that has ``reset_parameters`` counts as a layer, in reverse
module order: Quantus's ``MPRT`` convention, so the two give the same numbers.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from vebi.errors import VebiError, require_int_in_range
from vebi.evaluation.data import EvaluationSet
from vebi.evaluation.methods import HeatmapMethod
from vebi.mining.features import is_feature_block
from vebi.mining.relevant import RelevantFeatures
from vebi.utils.log import get_logger
from vebi.utils.torch_api import dataset_size

log = get_logger(__name__)

SIMILARITIES = ("spearman", "spearman_abs", "ssim", "hog")
ORIGINAL_W = "/original_W"


# --------------------------------------------------------------------------- similarities
def _undefined(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if np.array_equal(a, b) else 0.0


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of the flattened arrays (ties get their average rank)."""
    from scipy.stats import spearmanr

    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return _undefined(a, b)
    return float(spearmanr(a, b).statistic)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two (H, W) maps, data range that of both (Quantus's choice)."""
    from skimage.metrics import structural_similarity

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    data_range = float(max(a.max(), b.max()) - min(a.min(), b.min()))
    if data_range == 0:
        return 1.0
    window = min(7, *(side if side % 2 else side - 1 for side in a.shape))
    if window < 3:
        raise VebiError(f"SSIM needs maps of at least 3 x 3 pixels, got {a.shape}")
    return float(structural_similarity(a, b, win_size=window, data_range=data_range))


def hog_descriptor(image: np.ndarray) -> np.ndarray:
    """Histogram of oriented gradients of an (H, W) map: 9 orientations, cells of
    max(2, min(H, W) // 8) pixels, blocks of 2 x 2 cells, L2-Hys block normalisation."""
    from skimage.feature import hog

    cell = max(2, min(image.shape) // 8)
    return hog(
        np.asarray(image, dtype=np.float64),
        orientations=9,
        pixels_per_cell=(cell, cell),
        cells_per_block=(2, 2),
        block_norm="L2-Hys",
        feature_vector=True,
    )


def hog_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation of the two maps' HOG descriptors (Adebayo et al.)."""
    da, db = hog_descriptor(a), hog_descriptor(b)
    if np.ptp(da) == 0 or np.ptp(db) == 0:
        return _undefined(da, db)
    return float(np.corrcoef(da, db)[0, 1])


def similarities(
    maps: torch.Tensor,
    signal: torch.Tensor | None,
    reference_maps: torch.Tensor,
    reference_signal: torch.Tensor | None,
) -> dict[str, np.ndarray]:
    """Per image, every similarity of :data:`SIMILARITIES` of (``maps``, ``signal``) to the
    reference ones; a method without signal is compared by its maps in both rank
    correlations."""
    maps_np, ref_np = maps.double().cpu().numpy(), reference_maps.double().cpu().numpy()
    signed = maps_np if signal is None else signal.double().cpu().numpy()
    ref_signed = ref_np if reference_signal is None else reference_signal.double().cpu().numpy()
    pairs = list(zip(signed, ref_signed, strict=True))
    map_pairs = list(zip(maps_np, ref_np, strict=True))
    return {
        "spearman": np.array([rank_correlation(s, r) for s, r in pairs]),
        "spearman_abs": np.array([rank_correlation(np.abs(s), np.abs(r)) for s, r in pairs]),
        "ssim": np.array([ssim(m, r) for m, r in map_pairs]),
        "hog": np.array([hog_similarity(m, r) for m, r in map_pairs]),
    }


# --------------------------------------------------------------------------- randomisation
@dataclass(frozen=True)
class RandomisationStep:
    """One step of the cascade: the layers re-initialised in it (top-down), under one name."""

    name: str
    layers: tuple[str, ...]


def randomisation_layers(model: nn.Module) -> list[str]:
    """Names of the modules re-initialised by the cascade, top-down: every module with a
    ``reset_parameters`` method, in reverse module order (Quantus's ``top_down``)."""
    return [
        name
        for name, module in reversed(list(model.named_modules()))
        if name and callable(getattr(module, "reset_parameters", None))
    ]


def randomisation_steps(
    model: nn.Module, granularity: str = "layer", max_steps: int | None = None
) -> list[RandomisationStep]:
    """The cascade's steps, from the logits down. ``granularity="layer"``: one layer per step
    (Quantus's MPRT); ``"block"``: the layers of one feature block (a residual, inverted
    residual, dense or inception block, as in mining: docs/method.md, section 1) in one step,
    as Adebayo et al. randomise Inception v3 block by block. With more steps than
    ``max_steps``, consecutive steps are merged into ``max_steps`` groups of near-equal size
    (the last always randomises the whole network)."""
    layers = randomisation_layers(model)
    if not layers:
        raise VebiError("the model has no layer with reset_parameters() to randomise")
    if granularity not in ("layer", "block"):
        raise VebiError(f"granularity must be 'layer' or 'block', got {granularity!r}")
    steps: list[RandomisationStep] = []
    if granularity == "layer":
        steps = [RandomisationStep(name, (name,)) for name in layers]
    else:
        blocks = [n for n, module in model.named_modules() if n and is_feature_block(module)]

        def block_of(layer: str) -> str:
            outer = [b for b in blocks if layer == b or layer.startswith(b + ".")]
            return min(outer, key=len) if outer else layer

        for layer in layers:
            block = block_of(layer)
            if steps and steps[-1].name == block:
                steps[-1] = RandomisationStep(block, (*steps[-1].layers, layer))
            else:
                steps.append(RandomisationStep(block, (layer,)))
    if max_steps is not None and len(steps) > max_steps:
        bounds = np.linspace(0, len(steps), max_steps + 1).round().astype(int)
        steps = [
            RandomisationStep(
                steps[hi - 1].name if hi - lo == 1 else f"{steps[lo].name} .. {steps[hi - 1].name}",
                tuple(layer for step in steps[lo:hi] for layer in step.layers),
            )
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
            if hi > lo
        ]
    return steps


def randomise(model: nn.Module, layers: Sequence[str], seed: int) -> None:
    """Re-initialise ``layers`` of ``model`` in place, each by its ``reset_parameters`` right
    after seeding torch's generator with ``seed + 1`` (Quantus's MPRT); the caller's random
    state is restored afterwards."""
    modules = dict(model.named_modules())
    with torch.random.fork_rng(devices=[]):
        for name in layers:
            torch.manual_seed(seed + 1)
            modules[name].reset_parameters()


# --------------------------------------------------------------------------- the evaluator
#: (network, relevant features) -> the heatmap methods to compare, by name
MethodFactory = Callable[[nn.Module, RelevantFeatures], Mapping[str, HeatmapMethod]]
#: randomised network -> its relevant features mined again
Remine = Callable[[nn.Module], RelevantFeatures]


def seeded_subset(dataset: Dataset, count: int | None, seed: int) -> tuple[Dataset, str | None]:
    """(``count`` seeded random items of ``dataset``, a note when ``count`` was clamped)."""
    size = dataset_size(dataset)
    if count is None or count >= size:
        note = None
        if count is not None and count > size:
            note = f"sanity: mining_images={count} clamped to the {size} training images"
        return dataset, note
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:count].sort().values.tolist()), None


class CascadingRandomisation:
    """The model-parameter randomisation test (module docstring), configured by
    ``evaluation.sanity``: ``images`` test images (a seeded, class-balanced subset),
    ``mining_images`` training images to mine W again on at every step, ``granularity``
    and ``max_steps`` of :func:`randomisation_steps`, ``seed`` of the re-initialisation,
    ``remine`` (False: only the W-kept variant of ours), ``data_randomised_checkpoint`` (a
    checkpoint of the network trained on permuted labels, loaded by the pipeline)."""

    def __init__(
        self,
        images: int = 32,
        mining_images: int | None = 1000,
        granularity: str = "layer",
        max_steps: int | None = 8,
        seed: int = 42,
        remine: bool = True,
        batch_size: int = 64,
        data_randomised_checkpoint: str | None = None,
    ) -> None:
        require_int_in_range("evaluation.sanity.images", images, 1)
        require_int_in_range("evaluation.sanity.mining_images", mining_images, 1, allow_none=True)
        require_int_in_range("evaluation.sanity.max_steps", max_steps, 1, allow_none=True)
        require_int_in_range("evaluation.sanity.batch_size", batch_size, 1)
        if granularity not in ("layer", "block"):
            raise VebiError(
                f"evaluation.sanity.granularity must be 'layer' or 'block', got {granularity!r}"
            )
        self.images = int(images)
        self.mining_images = None if mining_images is None else int(mining_images)
        self.granularity = granularity
        self.max_steps = None if max_steps is None else int(max_steps)
        self.seed = int(seed)
        self.remine = bool(remine)
        self.batch_size = int(batch_size)
        self.data_randomised_checkpoint = data_randomised_checkpoint

    def _maps(
        self, methods: Mapping[str, HeatmapMethod], data: EvaluationSet, classes: torch.Tensor
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor | None]], dict[str, str]]:
        """Per method (maps, signal or None) on ``data`` (CPU), and the methods that failed."""
        out: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        failed: dict[str, str] = {}
        start = 0
        for batch in data.batches(self.batch_size):
            device = _device_of(methods)
            images = batch.images.to(device)
            targets = classes[start : start + len(images)].to(device)
            start += len(images)
            for name, method in methods.items():
                if name in failed:
                    continue
                try:
                    maps, signal = method.maps_and_signal(images, targets)
                except (VebiError, RuntimeError, ValueError) as error:
                    failed[name] = f"{type(error).__name__}: {error}"
                    continue
                store = out.setdefault(name, ([], []))
                store[0].append(maps.detach().cpu())
                if signal is not None:
                    store[1].append(signal.detach().cpu())
        result = {
            name: (torch.cat(maps), torch.cat(signals) if signals else None)
            for name, (maps, signals) in out.items()
            if name not in failed
        }
        return result, failed

    def __call__(
        self,
        model: nn.Module,
        relevant: RelevantFeatures,
        data: EvaluationSet,
        classes: torch.Tensor,
        build_methods: MethodFactory,
        remine: Remine | None = None,
        progress: bool = True,
        data_randomised: tuple[nn.Module, RelevantFeatures] | None = None,
    ) -> dict[str, Any]:
        """Results of the cascade on ``data`` explaining ``classes`` (fixed over the steps):
        per method and similarity the mean and std over images after each step.
        ``build_methods(net, relevant)`` makes the methods for a network; ``remine(net)``
        mines W again on it (None, or ``remine=False``: W is only kept). ``data_randomised``:
        (the network trained on permuted labels, its W), compared under ``data_randomisation``."""
        model = model.eval()
        steps = randomisation_steps(model, self.granularity, self.max_steps)
        notes: list[str] = []
        began = time.perf_counter()
        methods = dict(build_methods(model, relevant))
        reference, failed = self._maps(methods, data, classes)
        for name, why in failed.items():
            notes.append(f"sanity: {name} skipped: it fails on the trained network ({why})")
        trained_seconds = time.perf_counter() - began
        uses_w = [name for name in reference if methods[name].uses_relevant_features]
        remining = self.remine and remine is not None and bool(uses_w)
        # the re-mined variants are compared with W mined the same way (same images) on the
        # trained network, so that only the weights differ
        remined_reference: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if remining:
            assert remine is not None
            trained_again = remine(model)
            again = {n: m for n, m in build_methods(model, trained_again).items() if n in uses_w}
            remined_reference, failed_again = self._maps(again, data, classes)
            for name, why in failed_again.items():
                notes.append(
                    f"sanity: {name} with W mined again fails on the trained network ({why})"
                )
        estimate = len(steps) * trained_seconds * (1 + (len(uses_w) > 0))
        log.info(
            "Sanity: %d randomisation steps (%s granularity) x %d methods on %d images%s; "
            "about %s (the trained network's maps took %.1f s)%s",
            len(steps),
            self.granularity,
            len(reference),
            len(data),
            f", W mined again at every step on {self.mining_images or 'all'} training images"
            if remining
            else "",
            _duration(estimate) + (" plus the re-mining" if remining else ""),
            trained_seconds,
            "" if len(steps) <= 8 else "; evaluation.sanity.max_steps=N makes it shorter",
        )
        names = [*reference, *(f"{n}{ORIGINAL_W}" for n in uses_w)]
        curves: dict[str, dict[str, list[float | None]]] = {
            name: {f"{s}_{stat}": [] for s in SIMILARITIES for stat in ("mean", "std")}
            for name in names
        }
        randomised = copy.deepcopy(model)
        seconds: list[float] = []
        bar = tqdm(total=len(steps), desc="sanity", disable=not progress)
        for step in steps:
            step_began = time.perf_counter()
            randomise(randomised, step.layers, self.seed)
            built = build_methods(randomised, relevant)
            chosen = {n: m for n, m in built.items() if n in reference}
            maps, failed_now = self._maps(chosen, data, classes)
            if uses_w:
                kept = {n: maps.pop(n) for n in uses_w if n in maps}
                maps |= {f"{n}{ORIGINAL_W}": v for n, v in kept.items()}
                if remining:
                    assert remine is not None
                    fresh_relevant = remine(randomised)
                    fresh = {
                        n: m
                        for n, m in build_methods(randomised, fresh_relevant).items()
                        if n in uses_w
                    }
                    fresh_maps, failed_fresh = self._maps(fresh, data, classes)
                    maps |= fresh_maps
                    failed_now |= failed_fresh
            for name in names:
                base = name.removesuffix(ORIGINAL_W)
                remined = name == base and base in uses_w
                if name not in maps or (remined and base not in remined_reference):
                    why = failed_now.get(base, "not re-mined (evaluation.sanity.remine=false)")
                    if base in failed_now:
                        notes.append(f"sanity: {name} failed after randomising {step.name}: {why}")
                    for key in curves[name]:
                        curves[name][key].append(None)
                    continue
                if remined:
                    values = similarities(*maps[name], *remined_reference[base])
                else:
                    values = similarities(*maps[name], *reference[base])
                for s, per_image in values.items():
                    curves[name][f"{s}_mean"].append(float(per_image.mean()))
                    curves[name][f"{s}_std"].append(float(per_image.std()))
            seconds.append(time.perf_counter() - step_began)
            if len(seconds) == 1 and len(steps) > 1:
                log.info(
                    "Sanity: the first step took %.1f s%s: about %s for the other %d",
                    seconds[0],
                    " (its re-mining included)" if remining else "",
                    _duration(seconds[0] * (len(steps) - 1)),
                    len(steps) - 1,
                )
            bar.update(1)
        bar.close()
        for name in [n for n in names if all(v is None for v in curves[n]["spearman_mean"])]:
            del curves[name]
        data_randomisation = None
        if data_randomised is not None:
            other = {n: m for n, m in build_methods(*data_randomised).items() if n in reference}
            other_maps, failed_other = self._maps(other, data, classes)
            for name, why in failed_other.items():
                notes.append(f"sanity: {name} failed on the label-permuted network: {why}")
            data_randomisation = {}
            for name, pair in other_maps.items():
                values = similarities(*pair, *reference[name])
                data_randomisation[name] = {
                    f"{s}_{stat}": float(getattr(v, stat)())
                    for s, v in values.items()
                    for stat in ("mean", "std")
                }
        return {
            "num_images": len(data),
            "remined": remining,
            "mining_images": self.mining_images if remining else None,
            "granularity": self.granularity,
            "seed": self.seed,
            "similarities": list(SIMILARITIES),
            "steps": [{"name": s.name, "layers": list(s.layers)} for s in steps],
            "seconds_per_step": seconds,
            "methods": curves,
            "data_randomisation": data_randomisation,
            "notes": notes,
        }


def _device_of(methods: Mapping[str, HeatmapMethod]) -> torch.device:
    for method in methods.values():
        parameter = next(method.model.parameters(), None)
        if parameter is not None:
            return parameter.device
    return torch.device("cpu")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{math.ceil(seconds)} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
