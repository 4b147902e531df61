"""The suite must pass in a plain clone with nothing beside it: no test, bench or CI path leaves the repository."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = sorted(p for p in [*ROOT.joinpath("tests").rglob("*.py"), *ROOT.joinpath("bench").rglob("*.py")]
                 if p.name != "test_repo.py")


def _escapes(tree: ast.AST) -> list[str]:
    """Expressions that reach above the repository root: ``ROOT.parent``, ``shared/`` paths, absolute ``/work/``.

    (``../`` alone is allowed: path-traversal inputs such as ``../../etc/passwd`` are legitimate test data.)
    """
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "parent"
            and isinstance(node.value, ast.Name)
            and node.value.id == "ROOT"
        ):
            found.append(f"line {node.lineno}: ROOT.parent")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if "shared/" in text or text.startswith("/work/"):
                found.append(f"line {node.lineno}: {text!r}")
    return found


def test_no_test_or_bench_path_leaves_the_repository() -> None:
    offenders = {str(p.relative_to(ROOT)): _escapes(ast.parse(p.read_text(), str(p))) for p in SCANNED}
    assert SCANNED, "no test files found"
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_check_catches_an_escape() -> None:
    # The rule above must be able to fail: the old CRD schema path is caught.
    assert _escapes(ast.parse('SCHEMAS = ROOT.parent / "shared" / "schemas"'))
    assert _escapes(ast.parse('open("../shared/schemas/x.yaml")'))


def test_ci_script_stays_in_the_repository() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'cd "$(dirname "$0")/.."' in ci  # runs from the repository root
    assert "../" not in ci.replace('"$(dirname "$0")/.."', "")
    assert "make test" in ci  # the README's test command
