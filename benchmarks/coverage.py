"""The coverage matrix as a table: every torchvision CNN family, the timm CNN families and a
real network written outside both (lukemelas-style EfficientNet-Lite0), with random weights and
small inputs (tests/zoo.py), each mined (mu = 10), explained (k = 3, default rules) and given
the evaluation's heatmap methods; transformers are refused before any work.

Columns: model | m (mined features with the default layers) | mining s | explanation s |
the rule of every module type that does not go by its plain gradient | status.

Usage: python benchmarks/coverage.py [--only NAME ...]   (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.zoo from the repo root

from tests.zoo import TRANSFORMERS, ZOO, exercise  # noqa: E402
from vebi.errors import VebiError  # noqa: E402
from vebi.explain.rules import check_rule_coverage  # noqa: E402


def _rules(table: dict[str, str]) -> str:
    """The module types that take a rule (not their plain gradient), and the canonizers."""
    shown = [
        f"{kind}: {rule}"
        for kind, rule in table.items()
        if rule != "gradient" and kind not in ("functional", "canonizers")
    ]
    if "functional" in table:
        shown.append(f"functional: {table['functional']}")
    if "canonizers" in table:
        shown.append(f"canonizers: {table['canonizers']}")
    text = "; ".join(shown).replace("ActivationRule('guided')", "guided activation")
    return text.replace("StrideFixConv()", "stride_fix").replace("GuidedReLU()", "guided")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names of tests/zoo.py")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("vebi").setLevel(logging.ERROR)  # the random nets' empty classes
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    print("| model | m | mining s | explanation s | rules (types not by their gradient) | status |")
    print("|---|---:|---:|---:|---|---|")
    for name, (build, side) in ZOO.items():
        if args.only and name not in args.only:
            continue
        try:
            torch.manual_seed(0)
            c = exercise(build(), side)
            ours = c.maps["vebi"]
            fine = c.restored and bool(torch.isfinite(ours).all() and ours.amax() > 0)
            status = f"ok ({side} px)" if fine else "FAILED checks"
            print(
                f"| {name} | {c.features:,} | {c.mining_s:.2f} | {c.explanation_s:.2f} | "
                f"{_rules(c.rules)} | {status} |",
                flush=True,
            )
        except Exception as error:  # a row per model, whatever happens
            print(f"| {name} | | | | | FAILED: {type(error).__name__}: {error} |", flush=True)
    for name, build in TRANSFORMERS.items():
        if args.only and name not in args.only:
            continue
        try:
            check_rule_coverage(build())
            status = "NOT refused"
        except VebiError as error:
            status = f"refused before any work: {str(error).split(' (')[0]}"
        print(f"| {name} | | | | | {status} |", flush=True)


if __name__ == "__main__":
    main()
