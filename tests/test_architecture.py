"""Imports point down only (issue 13 item 2, DESIGN.md "The picture"), checked by parsing every source file.

Every ``import``/``from ... import`` counts, including those inside functions and ``if TYPE_CHECKING`` blocks, so a
lazy import cannot hide a dependency. Relative imports are resolved against the file's package.

Rules:
- ``handlers/`` imports no ``service`` (it builds on ``neuroexplain`` only, plus ts, torch, stdlib, third party);
- ``service/`` never imports ``handlers``, ``torch`` or ``captum``;
- the library (``neuroexplain/`` except ``cli/``, ``client.py``, ``_proto/``, ``pacs/``) never imports ``grpc``,
  ``google.protobuf``/``protobuf`` or ``service``;
- nothing outside ``neuroexplain/lab/``, the CLI, ``tests/`` and ``bench/`` (benchmarks build synthetic scans)
  imports ``neuroexplain.lab``: serving code never does;
- ``neuroexplain/pacs/`` imports neither ``torch`` nor ``numpy``.

Every rule holds since the serving refactor (neuroexplain/serving, service/grpc) landed; a violation fails.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_PARTS = {".venv", "build", "dist", "node_modules", "__pycache__", ".git"}


def _modules_imported(path: Path, source: str | None = None) -> Iterator[str]:
    """Yield every module name a file imports (absolute, dotted), wherever in the file the import sits."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1])
    text = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(text, filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            if node.module is None or node.level:
                for alias in node.names:  # "from . import x" may import a submodule x
                    yield f"{prefix}.{alias.name}" if prefix else alias.name
            yield prefix


def _files(under: str, exclude: Callable[[Path], bool] = lambda p: False) -> list[Path]:
    base = ROOT / under
    paths = [base] if base.is_file() else sorted(base.rglob("*.py"))
    return [p for p in paths if not SKIP_PARTS & set(p.relative_to(ROOT).parts) and not exclude(p)]


def _hits(module: str, banned: tuple[str, ...]) -> bool:
    return any(module == b or module.startswith(b + ".") for b in banned)


def _violations(files: list[Path], banned: tuple[str, ...]) -> list[str]:
    return sorted({f"{p.relative_to(ROOT)}: {m}" for p in files for m in _modules_imported(p) if _hits(m, banned)})


def _library(p: Path) -> bool:
    """True for files outside the library proper (the CLI, the client, generated stubs, the PACS bridge, lab)."""
    rel = p.relative_to(ROOT / "neuroexplain").as_posix()
    return rel.startswith(("cli/", "_proto/", "pacs/")) or rel == "client.py"


def _lab_allowed(p: Path) -> bool:
    rel = p.relative_to(ROOT).as_posix()
    return rel.startswith(("neuroexplain/lab/", "neuroexplain/cli/", "tests/", "bench/"))


def _handlers_service() -> list[str]:
    return _violations(_files("handlers"), ("service",))


def _service_down() -> list[str]:
    return _violations(_files("service"), ("handlers", "torch", "captum"))


def test_handlers_do_not_import_the_gateway() -> None:
    assert _handlers_service() == []


def test_gateway_imports_neither_handlers_nor_torch_nor_captum() -> None:
    assert _service_down() == []


def test_library_imports_no_grpc_protobuf_or_gateway() -> None:
    files = _files("neuroexplain", exclude=_library)
    assert _violations(files, ("grpc", "google.protobuf", "protobuf", "service")) == []


def test_only_lab_cli_and_tests_import_the_research_tooling() -> None:
    files = [p for top in ("neuroexplain", "service", "handlers") for p in _files(top)]
    files = [p for p in files if not _lab_allowed(p)]
    assert _violations(files, ("neuroexplain.lab",)) == []


def test_pacs_bridge_imports_neither_torch_nor_numpy() -> None:
    assert _violations(_files("neuroexplain/pacs"), ("torch", "numpy")) == []


def test_the_checker_sees_imports_inside_functions_and_relative_imports() -> None:
    """The parser must catch what a lazy or relative import would hide (so the rules above can fail)."""
    source = "def f():\n    import grpc\n    from .client import Client\n    from . import predict\n"
    found = set(_modules_imported(ROOT / "neuroexplain" / "probe.py", source))
    assert {"grpc", "neuroexplain.client", "neuroexplain.predict"} <= found
    assert _violations([ROOT / "neuroexplain" / "client.py"], ("grpc",)) == ["neuroexplain/client.py: grpc"]
