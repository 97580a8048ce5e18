"""The codebase's own rules: one-way layering, self-contained docs, one logging path."""

from __future__ import annotations

import ast
import logging
import re
import subprocess
from pathlib import Path

import pytest
from lightning.pytorch.utilities import rank_zero_only

from tests.conftest import REPO_ROOT
from vebi.utils.log import ConsoleFormatter, get_logger

PACKAGE = REPO_ROOT / "src" / "vebi"
#: data/models -> mining -> explain -> evaluation -> pipelines -> testing (the tests' oracles,
#: out of the public API); a module may import its own layer and the layers before it, never
#: one after it.
LAYERS = {
    "errors": 0,
    "utils": 0,
    "data": 1,
    "models": 1,
    "modules": 1,
    "checkpoint": 1,
    "mining": 2,
    "explain": 3,
    "evaluation": 4,
    "pipelines": 5,
    "testing": 6,
}


def _layer(module_path: Path) -> str:
    parts = module_path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _vebi_imports(path: Path) -> set[str]:
    """Top-level vebi subpackages imported anywhere in the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "vebi" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_imports_go_one_way() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue  # the package's public surface re-exports from any layer
        own = _layer(path)
        assert own in LAYERS, f"{path} is in no layer: add it to LAYERS"
        for imported in _vebi_imports(path):
            if LAYERS[imported] > LAYERS[own]:
                wrong.append(f"{path.relative_to(REPO_ROOT)} ({own}) imports vebi.{imported}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_layering_check_sees_a_lazy_upward_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from vebi.explain.interpretation import interpret_and_log\n")
    assert _vebi_imports(probe) == {"explain"}


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    suffixes = {".py", ".md", ".yaml", ".toml", ".txt", ".cfg"}
    files = [REPO_ROOT / name for name in listed if Path(name).suffix in suffixes]
    return [*files, REPO_ROOT / "Makefile", REPO_ROOT / ".ci" / "run"]


def test_nothing_refers_to_files_outside_the_repository() -> None:
    this_file = Path(__file__).resolve()
    outside = ("METHOD.md", "DATASETS.md", "../shared", "shared/", "closing note")
    hits = [
        f"{path.relative_to(REPO_ROOT)}: {needle}"
        for path in _tracked_text_files()
        if path.is_file() and path.resolve() != this_file
        for needle in outside
        if needle in path.read_text(errors="replace")
    ]
    assert not hits, hits
    assert (REPO_ROOT / "docs" / "method.md").is_file()


#: A citation of docs/method.md in the package: "docs/method.md, section 5", "sections 1-2",
#: "sections 2 and 4", "section 4.2" (whitespace and line breaks between the words allowed).
CITATION = re.compile(
    r"docs/method\.md,?\s+sections?\s+(\d+(?:\.\d+)?(?:\s*(?:-|,|and)\s*\d+(?:\.\d+)?)*)"
)


def cited_sections(text: str) -> set[str]:
    """The section numbers cited in ``text`` (a range "1-2" cites 1 and 2)."""
    cited = set()
    for match in CITATION.finditer(text):
        for part in re.split(r"\s*(?:,|and)\s*", match.group(1)):
            if "-" in part:
                low, high = (int(v) for v in part.split("-"))
                cited |= {str(n) for n in range(low, high + 1)}
            else:
                cited.add(part.strip())
    return cited


def test_docs_sections_cited_by_the_code_exist() -> None:
    """Every section the package's docstrings and comments cite is a heading of the doc."""
    method = (REPO_ROOT / "docs" / "method.md").read_text()
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", method, flags=re.MULTILINE))
    cited: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for section in cited_sections(path.read_text()):
            cited.setdefault(section, []).append(str(path.relative_to(REPO_ROOT)))
    assert len(cited) >= 5  # the parser finds the citations
    missing = {section: files for section, files in cited.items() if section not in headings}
    assert missing == {}, f"docs/method.md has no section(s) cited by: {missing}"


def test_the_citation_parser_reads_ranges_lists_and_subsections() -> None:
    text = (
        "docs/method.md, section 5; docs/method.md, sections 1-3 and "
        "docs/method.md sections\n2 and 4.2"
    )
    assert cited_sections(text) == {"5", "1", "2", "3", "4.2"}


def test_the_package_never_chooses_a_matplotlib_backend() -> None:
    """Figures come from ``matplotlib.figure.Figure`` (no pyplot), so importing vebi leaves the
    user's backend alone: no ``matplotlib.use`` and no pyplot anywhere in the package."""
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            calls_use = (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "use"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "matplotlib"
            )
            if calls_use or any(name.startswith("matplotlib.pyplot") for name in names):
                offending.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not offending, offending


def test_logger_is_quiet_on_other_ranks(caplog: pytest.LogCaptureFixture) -> None:
    log = get_logger("vebi.test_rank")
    saved = rank_zero_only.rank
    try:
        with caplog.at_level(logging.INFO, logger="vebi.test_rank"):
            rank_zero_only.rank = 1
            log.info("summary from rank 1")
            log.warning("warning from rank 1")
            log.error("error from rank 1")
            rank_zero_only.rank = 0
            log.info("summary from rank 0")
    finally:
        rank_zero_only.rank = saved
    assert [r.getMessage() for r in caplog.records] == ["error from rank 1", "summary from rank 0"]


def test_console_format_is_plain_with_level_prefixes() -> None:
    formatter = ConsoleFormatter()

    def record(level: int) -> logging.LogRecord:
        return logging.LogRecord("vebi", level, __file__, 1, "cache at %s", ("/x",), None)

    assert formatter.format(record(logging.INFO)) == "cache at /x"
    assert formatter.format(record(logging.WARNING)) == "warning: cache at /x"
    assert formatter.format(record(logging.ERROR)) == "error: cache at /x"
