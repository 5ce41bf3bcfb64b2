"""The installed napari manifest is the top-level napari.yaml, and it validates."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import metadata, resources
from pathlib import Path

import pytest
import yaml
from npe2 import PluginManager, PluginManifest

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ROOT / "napari.yaml"


def test_installed_manifest_is_the_top_level_file() -> None:
    shipped = resources.files("napari_diffcut") / "napari.yaml"
    assert shipped.is_file()
    assert shipped.read_bytes() == TOP_LEVEL.read_bytes()


def test_the_wheel_ships_the_top_level_manifest(tmp_path: Path) -> None:
    """Build a wheel from the working tree: it holds napari.yaml and the entry point."""
    import zipfile

    pytest.importorskip("setuptools")
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "napari.yaml"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(
        ROOT / "src", tree / "src", symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path / "wheel"
    cmd = [sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "--no-build-isolation"]
    built = subprocess.run(
        [*cmd, "-w", str(out), "-q"], capture_output=True, text=True, timeout=300, check=False
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = out.glob("napari_diffcut-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("napari_diffcut/napari.yaml") == TOP_LEVEL.read_bytes()
        [eps] = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = zf.read(eps).decode()
    assert "[napari.manifest]" in text and "napari-diffcut = napari_diffcut:napari.yaml" in text


def test_entry_point_points_at_the_package_manifest() -> None:
    eps = metadata.entry_points(group="napari.manifest")
    [ep] = [ep for ep in eps if ep.name == "napari-diffcut"]
    assert ep.value == "napari_diffcut:napari.yaml"


def test_plugin_manager_reads_the_same_manifest() -> None:
    pm = PluginManager.instance()
    pm.discover()
    installed = pm.get_manifest("napari-diffcut")
    top = PluginManifest.from_file(TOP_LEVEL)
    assert installed.model_dump(exclude={"package_metadata"}) == top.model_dump(
        exclude={"package_metadata"}
    )


def test_contributions() -> None:
    data = yaml.safe_load(TOP_LEVEL.read_text())
    assert data["name"] == "napari-diffcut"
    contrib = data["contributions"]
    commands = {c["id"]: c["python_name"] for c in contrib["commands"]}
    assert all(cid.startswith("napari-diffcut.") for cid in commands)
    [widget] = contrib["widgets"]
    assert widget["display_name"] == "DiffCut"
    assert commands[widget["command"]] == "napari_diffcut.plugin.widget:DiffCutWidget"
    assert {s["key"] for s in contrib["sample_data"]} == {"blood_smear", "nuclei"}
    [reader] = contrib["readers"]
    assert commands[reader["command"]] == "napari_diffcut.plugin.reader:get_reader"
    assert reader["command"] == "napari-diffcut.read"
    assert reader["filename_patterns"] == ["*.diffcut.zarr"]
    assert reader["accepts_directories"] is True
    writer, table = contrib["writers"]
    assert writer["command"] == "napari-diffcut.write"
    assert commands[writer["command"]] == "napari_diffcut.plugin.writer:write_labels_layer"
    assert writer["layer_types"] == ["labels"]
    assert writer["filename_extensions"] == [".diffcut.zarr"]
    assert commands[table["command"]] == "napari_diffcut.plugin.writer:write_table_csv"
    assert table["layer_types"] == ["labels"] and table["filename_extensions"] == [".csv"]


def _npe2(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("npe2")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "npe2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_npe2_validate() -> None:
    result = _npe2("validate", "napari-diffcut")
    assert result.returncode == 0, result.stdout + result.stderr


def test_npe2_validate_imports() -> None:
    result = _npe2("validate", "--imports", "napari-diffcut")
    assert result.returncode == 0, result.stdout + result.stderr
