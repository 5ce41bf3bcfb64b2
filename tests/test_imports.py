"""Heavy imports stay lazy: importing the package, the core or the CLI pulls in no torch, Qt
or napari. (The layer order itself is :mod:`test_layout`.)"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "napari_diffcut"
HEAVY = (
    "torch",
    "diffusers",
    "transformers",
    "napari",
    "qtpy",
    "magicgui",
    "PyQt5",
    "PyQt6",
    "PySide6",
)


@pytest.mark.parametrize(
    "module",
    [
        "napari_diffcut",
        "napari_diffcut.large.dispatch",
        "napari_diffcut.core.hierarchy",
        "napari_diffcut.core.upsample",
        "napari_diffcut.core.pixels",
        "napari_diffcut.cli.main",
        "napari_diffcut.files.io",
    ],
)
def test_import_is_light(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_never_imports_gui_or_torch() -> None:
    for path in (SRC / "core").glob("*.py"):
        bad = {m for m in _imported_modules(path) if m.split(".")[0] in HEAVY}
        assert not bad, f"{path.name} imports {bad}"
        assert not any(m.startswith("napari_diffcut.attention") for m in _imported_modules(path))


def test_attention_never_imports_gui() -> None:
    for path in (SRC / "attention").glob("*.py"):
        bad = {
            m for m in _imported_modules(path) if m.split(".")[0] in ("napari", "qtpy", "magicgui")
        }
        assert not bad, f"{path.name} imports {bad}"


def test_public_names_resolve() -> None:
    import napari_diffcut

    for name in (
        "segment",
        "iter_segment",
        "Segmentation",
        "ncut_hierarchy",
        "Hierarchy",
        "DiffCutEngine",
        "DiffCutError",
        "Settings",
        "Progress",
    ):
        assert getattr(napari_diffcut, name) is not None
    with pytest.raises(AttributeError):
        napari_diffcut.does_not_exist  # noqa: B018
