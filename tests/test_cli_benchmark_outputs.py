"""The benchmark scripts write into the current directory (or the --out/--json/--plot paths given), never
into the tracked docs/ unless a command asks: docs/ names its paths explicitly."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def _code_strings(path: Path) -> list[str]:
    """String constants of a script's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


def test_no_benchmark_writes_into_docs_by_default():
    assert SCRIPTS
    for path in SCRIPTS:
        into_docs = [s for s in _code_strings(path) if re.match(r"(\./)?docs/", s)]
        assert not into_docs, f"{path.name} has docs/ paths in its code: {into_docs}"


def test_documented_benchmark_commands_name_their_docs_outputs():
    """A documented command whose --json goes to docs/ also sends its plot there (when the script plots)."""
    plotting = {p.stem for p in SCRIPTS if '"--plot"' in p.read_text()}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *SCRIPTS]:
        text = doc.read_text().replace("\\\n", " ")
        for m in re.finditer(r"benchmarks/(\w+)\.py([^\n]*)", text):
            script, args = m.groups()
            if script in plotting and "--json docs/" in args:
                assert "--plot docs/img/" in args, f"{doc.name}: {m.group(0)}"
