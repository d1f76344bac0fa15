"""The house rules of the package layout, checked by parsing the source (no imports run).

- Data flows one way: model/ (and kernels/, memory/) import nothing from the layers built on them
  (infer/, train/, eval/, the application modules), infer/ nothing from train/, eval/ or the application
  modules, and train/ and eval/ nothing from the application modules.
- docs/architecture.md names every source file under src/dsv4, so a reader can find each room.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dsv4"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
APP = {"cli", "app", "ablate"}  # the application layer: dsv4/app/, dsv4/ablate/ and the argument parser
BANNED = {
    "model": {"infer", "train", "eval", "parallel", *APP},
    "infer": {"train", "eval", *APP},
    "train": {*APP},
    "eval": {*APP},
    "memory": {"infer", "train", "eval", *APP},
    "kernels": {"infer", "train", "eval", *APP},
    "parallel": {"infer", "train", "eval", *APP},
}
ENTRY_POINTS = "__main__.py"  # `python -m dsv4.X`: the application layer's doors into a package


def _type_only(tree: ast.Module) -> set[int]:
    """Ids of the import nodes inside `if TYPE_CHECKING:` blocks: names for annotations, never executed."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def dsv4_imports(path: Path, pkg: tuple[str, ...] | None = None) -> list[tuple[int, str]]:
    """(line, second component) of every `dsv4.X...` import a file executes, relative imports resolved.
    Imports under `if TYPE_CHECKING:` are left out: model/ names the cache types it is handed in its
    annotations, but never imports infer/ when it runs."""
    out = []
    pkg = path.relative_to(SRC).parts[:-1] if pkg is None else pkg
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from ..x import y
                base = list(pkg[: len(pkg) - node.level + 1])
                names = [".".join(["dsv4", *base, *([node.module] if node.module else [])])]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "dsv4" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
    return out


@pytest.mark.parametrize("layer", sorted(BANNED))
def test_no_upward_import(layer):
    bad = [
        f"{f.relative_to(SRC)}:{line} imports dsv4.{mod}"
        for f in sorted((SRC / layer).rglob("*.py"))
        if f.name != ENTRY_POINTS
        for line, mod in dsv4_imports(f)
        if mod in BANNED[layer]
    ]
    assert not bad, "\n".join(bad)


def test_the_import_check_sees_an_upward_import(tmp_path):
    """The checker itself: a relative and an absolute upward import are both found (as if the file sat in
    model/); a type-only import is not."""
    f = tmp_path / "probe.py"
    f.write_text(
        "from typing import TYPE_CHECKING\nfrom ..infer import cache\nimport dsv4.train.trainer\n"
        "from dsv4.model import mhc\nif TYPE_CHECKING:\n    from dsv4.infer.cache import LayerCache\n"
    )
    assert [m for _, m in dsv4_imports(f, pkg=("model",))] == ["infer", "train", "model"]


def test_architecture_doc_names_every_source_file():
    text = DOCS.read_text()
    missing = []
    for f in sorted(SRC.rglob("*")):
        if f.suffix not in (".py", ".cpp", ".json") or "__pycache__" in f.parts or f.name == "__init__.py":
            continue
        rel = f.relative_to(SRC).as_posix()
        if rel not in text and f"`{f.name}`" not in text:
            missing.append(rel)
    assert not missing, f"docs/architecture.md does not name: {', '.join(missing)}"
