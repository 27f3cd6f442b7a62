"""The package rooms: kernels/ never imports engine/ or server/, engine/ never imports grpc or
server/, and in server/ only engines.py imports the engine runtime (the rest sees plain types)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Modules imported at run time (imports under `if TYPE_CHECKING:` are for annotations)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


def modules_of(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package).glob("*.py"))


@pytest.mark.parametrize("path", modules_of("kernels"), ids=lambda p: p.name)
def test_kernels_never_import_engine_or_server(path: Path) -> None:
    assert not {m for m in imported_modules(path) if m.split(".")[0] in ("engine", "server")}


@pytest.mark.parametrize("path", modules_of("engine"), ids=lambda p: p.name)
def test_engine_never_imports_grpc_or_server(path: Path) -> None:
    assert not {m for m in imported_modules(path) if m.split(".")[0] in ("grpc", "server")}


@pytest.mark.parametrize(
    "path", [p for p in modules_of("server") if p.name != "engines.py"], ids=lambda p: p.name
)
def test_server_sees_only_the_engines_plain_types(path: Path) -> None:
    engine_modules = {m for m in imported_modules(path) if m.split(".")[0] == "engine"}
    assert engine_modules <= {"engine.types"}, engine_modules
