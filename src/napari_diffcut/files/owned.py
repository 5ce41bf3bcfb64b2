"""What napari-diffcut wrote: recognising its outputs, and the inputs they must spare.

``--overwrite`` replaces only files this tool recognisably wrote: a record
JSON (it holds ``napari_diffcut_version``), a label TIFF tagged with
:data:`~napari_diffcut.files.io.TIFF_SOFTWARE` or named by the record beside
it, or a Zarr folder that holds nothing but array metadata and chunks. Links
are never followed into a replacement, and nothing that is, links to, holds
or lies inside an input is ever an output.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from napari_diffcut.files.io import TIFF_SOFTWARE

#: Largest record JSON read to recognise it.
MAX_RECORD_BYTES = 16 * 2**20


def absolute(path: Path) -> Path:
    return Path(os.path.abspath(os.fspath(path.expanduser())))


def exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False


def aliases_input(path: Path, inputs: Sequence[Path]) -> bool:
    """``path`` is an input, a link to one, or a folder holding one (or inside one)."""
    real = Path(os.path.realpath(path))
    for inp in inputs:
        real_in = Path(os.path.realpath(inp))
        if real == real_in or real_in.is_relative_to(real) or real.is_relative_to(real_in):
            return True
        try:
            if path.exists() and inp.exists() and os.path.samefile(path, inp):
                return True  # a hard link
        except OSError:
            continue
    return False


def is_ours(path: Path, record: Path, owned: bool = False) -> bool:
    """Whether ``path`` is recognisably a napari-diffcut output (any file when ``owned``)."""
    if path.is_symlink():
        return False
    if owned and path.is_file():
        return True
    if path == record or path.suffix.lower() == ".json":
        return is_our_record(path)
    if path.suffix.lower() == ".zarr":
        return is_label_zarr(path)
    if not path.is_file():
        return False
    return is_our_tiff(path) or named_by_record(path, record)


def load_record(path: Path) -> dict[str, Any] | None:
    try:
        if not stat.S_ISREG(path.lstat().st_mode) or path.stat().st_size > MAX_RECORD_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def is_our_record(path: Path) -> bool:
    data = load_record(path)
    return data is not None and "napari_diffcut_version" in data


def named_by_record(path: Path, record: Path) -> bool:
    """A label file named as its output by the record beside it (outputs of older versions)."""
    data = load_record(record) if is_our_record(record) else None
    if not data:
        return False
    keys = ("output", "levels_output", "instances_output", "instances_table")
    named = {Path(str(data[k])).name for k in keys if data.get(k)}
    return path.name in named


def is_our_tiff(path: Path) -> bool:
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return tif.pages[0].software == TIFF_SOFTWARE  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def is_label_zarr(path: Path) -> bool:
    """A Zarr folder holding only array metadata and chunks (a label store or result)."""
    from napari_diffcut.files.store import is_result_store

    if not is_real_dir(path):
        return False
    if is_result_store(path):
        return True
    try:
        meta = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(meta, dict) or meta.get("node_type") != "array":
        return False
    for root, dirs, files in os.walk(path):
        rel = Path(root).relative_to(path).parts
        if rel and (rel[0] != "c" or not all(p.isdigit() for p in rel[1:])):
            return False
        if any(f != "zarr.json" and not (rel and f.isdigit()) for f in files):
            return False
        if not rel and any(d != "c" for d in dirs):
            return False
    return True
