"""Configs that mean what they say: every top-level key an entry point's config composes is
read by that job (its pipeline module and the helpers of vebi.pipelines.common and
vebi.utils.task it calls), or referenced by another value (``${task_name}``); a key nothing
reads fails here instead of silently doing nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO_ROOT

PIPELINES = REPO_ROOT / "src" / "vebi" / "pipelines"
#: Modules whose functions a job may call with the whole config.
SHARED = [PIPELINES / "common.py", PIPELINES / "report.py", REPO_ROOT / "src/vebi/utils/task.py"]
#: Keys Hydra itself reads.
HYDRA_KEYS = {"hydra"}


def _functions(path: Path) -> dict[str, ast.AST]:
    tree = ast.parse(path.read_text())
    return {
        node.name: node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    }


def _keys(node: ast.AST) -> set[str]:
    """Top-level keys read from a variable named ``cfg``: ``cfg.x``, ``cfg.get("x")``,
    ``cfg["x"]``."""
    keys = set()
    for n in ast.walk(node):
        if (
            isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name)
            and n.value.id == "cfg"
            and n.attr != "get"
        ):
            keys.add(n.attr)
        if (
            isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr == "get"
            and isinstance(n.func.value, ast.Name)
            and n.func.value.id == "cfg"
            and n.args
            and isinstance(n.args[0], ast.Constant)
        ):
            keys.add(str(n.args[0].value))
        if (
            isinstance(n, ast.Subscript)
            and isinstance(n.value, ast.Name)
            and n.value.id == "cfg"
            and isinstance(n.slice, ast.Constant)
        ):
            keys.add(str(n.slice.value))
    return keys


def keys_read_by(job: str) -> set[str]:
    """The top-level config keys the job's module reads, and those read by every shared
    helper it reaches (followed through the helpers' own calls)."""
    module = ast.parse((PIPELINES / f"{job}.py").read_text())
    shared: dict[str, ast.AST] = {}
    for path in SHARED:
        shared.update(_functions(path))
    keys = _keys(module)
    seen: set[str] = set()
    frontier = _names(module) & set(shared)
    while frontier:
        name = frontier.pop()
        seen.add(name)
        keys |= _keys(shared[name])
        frontier |= (_names(shared[name]) & set(shared)) - seen
    return keys


def interpolated_keys(cfg) -> set[str]:
    text = OmegaConf.to_yaml(cfg, resolve=False)
    return set(re.findall(r"\$\{(\w+)", text))


@pytest.mark.parametrize("job", ["train", "mine", "explain", "evaluate"])
def test_every_composed_key_is_read(compose_cfg, job: str) -> None:
    cfg = compose_cfg(job, [])
    keys = set(cfg) - HYDRA_KEYS
    read = keys_read_by(job) | interpolated_keys(cfg)
    unread = sorted(keys - read)
    assert unread == [], f"configs/{job}.yaml composes keys {job}.py never reads: {unread}"


def test_the_scan_sees_what_a_job_reads_and_what_it_does_not() -> None:
    """The check can fail: explain reads k and rules but not evaluation."""
    explain = keys_read_by("explain")
    assert {"k", "rules", "input", "model_source", "logger", "paths"} <= explain
    assert "evaluation" not in explain and "callbacks" not in explain
