"""Hostile ``*.diffcut.zarr`` stores: a clear error within a second, no hang, no blow-up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import napari_diffcut
from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.files import store
from napari_diffcut.pipeline.segmentation import Segmentation


@pytest.fixture(scope="module")
def saved(pixels_seg: Segmentation, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pixels_seg.save(tmp_path_factory.mktemp("hostile") / "good.diffcut.zarr")


@pytest.fixture
def copy(saved: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "hostile.diffcut.zarr"
    shutil.copytree(saved, dest)
    return dest


@pytest.fixture(autouse=True)
def _deadline() -> Iterator[None]:
    """A hang becomes a failure after 10 s instead of blocking the suite."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError("reading the store hung")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _refused_fast(path: Path, match: str) -> None:
    """load and the napari reader both refuse ``path`` within a second."""
    from napari_diffcut.plugin.reader import get_reader

    start = time.perf_counter()
    with pytest.raises(DiffCutError, match=match):
        napari_diffcut.load(path)
    assert time.perf_counter() - start < 1.0
    reader = get_reader(str(path))
    start = time.perf_counter()
    assert reader is None or reader(str(path)) == [(None,)]
    assert time.perf_counter() - start < 1.0


def _first_chunk(root: Path, name: str) -> Path:
    return next(p for p in sorted((root / name / "c").rglob("*")) if p.is_file())


def _edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def test_fifo_chunk_does_not_block(copy: Path) -> None:
    chunk = _first_chunk(copy, "labels")
    chunk.unlink()
    os.mkfifo(chunk)
    _refused_fast(copy, "not a regular file")


@pytest.mark.parametrize("device", ["/dev/urandom", "/dev/zero"])
def test_chunk_linked_to_a_device_is_not_read(copy: Path, device: str) -> None:
    chunk = _first_chunk(copy, "pixel_leaf")
    chunk.unlink()
    chunk.symlink_to(device)
    _refused_fast(copy, "not a regular file")


def test_linked_array_folder_is_not_followed(copy: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.move(copy / "tree" / "parent", elsewhere)
    (copy / "tree" / "parent").symlink_to(elsewhere, target_is_directory=True)
    _refused_fast(copy, "not a folder")


def _declare_shape(root: Path, shape: list[int], chunks: list[int] | None = None) -> None:
    """Forge the header and the label arrays' metadata to another image size."""

    def header(meta: dict[str, Any]) -> None:
        meta["attributes"][store.ATTR]["shape"] = shape

    _edit(root / "zarr.json", header)
    for name in ("labels", "pixel_leaf", "levels"):

        def forge(meta: dict[str, Any], name: str = name) -> None:
            lead = meta["shape"][:1] if name == "levels" else []
            meta["shape"] = lead + shape
            if chunks is not None:
                meta["chunk_grid"]["configuration"]["chunk_shape"] = [1] * len(lead) + chunks

        _edit(root / name / "zarr.json", forge)


def test_forged_huge_shape_is_refused_before_decoding(copy: Path) -> None:
    _declare_shape(copy, [20000, 20000])
    _refused_fast(copy, "20000 x 20000 labels")


def test_forged_tiny_chunks_are_refused_before_decoding(copy: Path) -> None:
    _declare_shape(copy, [2000, 2000], chunks=[1, 1])
    _refused_fast(copy, "chunks of")


def test_oversized_chunk_file_is_not_read(copy: Path) -> None:
    chunk = _first_chunk(copy, "tree/cost")
    chunk.write_bytes(os.urandom(1 << 20))
    _refused_fast(copy, "more than a chunk")


def test_deeply_nested_json_is_not_a_store_and_does_not_raise(copy: Path) -> None:
    (copy / "zarr.json").write_text("[" * 200_000 + "]" * 200_000)
    assert store.is_result_store(copy) is False
    _refused_fast(copy, "nested too deeply")


def test_fifo_metadata_does_not_block(copy: Path) -> None:
    meta = copy / "labels" / "zarr.json"
    meta.unlink()
    os.mkfifo(meta)
    _refused_fast(copy, "not a regular file")


def test_save_to_an_unwritable_path_is_a_diffcut_error(
    pixels_seg: Segmentation, tmp_path: Path
) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(DiffCutError, match="could not save the result"):
        pixels_seg.save(blocker / "r.diffcut.zarr")
