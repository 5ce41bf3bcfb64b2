"""``seg.save("x.tif")`` refuses, naming the store suffix, instead of writing x.tif.diffcut.zarr."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_diffcut.files.store import result_path


@pytest.mark.parametrize("name", ["x.tif", "x.TIFF", "labels.png", "x.npy"])
def test_a_file_suffix_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=r"named like 'cells\.diffcut\.zarr'") as info:
        result_path(tmp_path / name)
    assert "write_labels_tiff" in str(info.value)
    assert not list(tmp_path.iterdir())


def test_save_refuses_before_writing(pixels_seg, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="not a .tif file"):
        pixels_seg.save(tmp_path / "x.tif")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("name", "store"), [("a", "a"), ("a.zarr", "a"), ("run.v2", "run.v2")])
def test_store_names_still_work(tmp_path: Path, name: str, store: str) -> None:
    assert result_path(tmp_path / name).name == f"{store}.diffcut.zarr"
