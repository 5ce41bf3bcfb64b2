"""Atomic writes: nothing half-written under the final name, usual permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from napari_diffcut.files.io import atomic_path, atomic_write_bytes


def test_atomic_write_gives_usual_permissions(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    atomic_write_bytes(target, b"{}")
    assert target.read_bytes() == b"{}"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failed_write_leaves_target_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "labels.tif"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["labels.tif"]
