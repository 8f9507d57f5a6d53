"""The one-way arrows between liverfat's rooms, checked on the source (``docs/architecture.md``).

core (liverfat.errors, .volume, .result, .files) <- dicom_io <- inference <- liverfat.analysis <- service.
A module may import from its own layer or from the layers to its left, never to its right.
Imports under ``if TYPE_CHECKING:`` count too: a type that points the wrong way is a design smell as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"liverfat": "liverfat", "dicom_io": "liverfat.dicom_io", "inference": "liverfat.inference",
           "service": "liverfat.service"}  # fmt: skip
CORE = ("liverfat.errors", "liverfat.volume", "liverfat.result", "liverfat.files", "liverfat")
LAYERS = (CORE, ("liverfat.dicom_io",), ("liverfat.inference",), ("liverfat.analysis",), ("liverfat.service",))


def module_name(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    parts = [FOLDERS[folder], *path.relative_to(ROOT / folder).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    """The index in ``LAYERS`` of the longest prefix that names ``module``'s layer."""
    best, best_length = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def liverfat_imports(path: Path) -> set[str]:
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    return {name for name in imported if name == "liverfat" or name.startswith("liverfat.")}


SOURCES = sorted(path for folder in FOLDERS for path in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_imports_point_one_way(path: Path) -> None:
    own_layer = layer_of(module_name(path))
    wrong_way = sorted(name for name in liverfat_imports(path) if layer_of(name) > own_layer)

    assert not wrong_way, f"{module_name(path)} (layer {own_layer}) imports from a layer above it: {wrong_way}"


def test_the_layers_cover_every_module() -> None:
    assert all(layer_of(module_name(path)) >= 0 for path in SOURCES)
