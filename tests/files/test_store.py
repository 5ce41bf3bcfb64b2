"""Saving and reopening *.diffcut.zarr results: identical round trip, no pickles, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import napari_diffcut
from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.files import store
from napari_diffcut.pipeline.segmentation import Segmentation
from napari_diffcut.results.store import read_result


@pytest.fixture(scope="module")
def seg(pixels_seg: Segmentation) -> Segmentation:
    """The shared three-level result of the weight-free backbone (conftest)."""
    return pixels_seg


@pytest.fixture(scope="module")
def saved(seg: Segmentation, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return seg.save(tmp_path_factory.mktemp("store") / "cells.diffcut.zarr")


def tree_dicts(s: Segmentation) -> list[dict[str, object]]:
    return [n.as_dict() for n in s.tree]


def assert_same(a: Segmentation, b: Segmentation) -> None:
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.labels.dtype == b.labels.dtype == np.uint32
    assert len(a.levels) == len(b.levels)
    for la, lb in zip(a.levels, b.levels, strict=True):
        np.testing.assert_array_equal(la, lb)
    assert tree_dicts(a) == tree_dicts(b)
    for name in ("parent", "size", "depth", "leaf_of_patch"):
        np.testing.assert_array_equal(
            getattr(a.hierarchy.arrays, name), getattr(b.hierarchy.arrays, name)
        )
    np.testing.assert_array_equal(a.hierarchy.arrays.cost, b.hierarchy.arrays.cost)
    np.testing.assert_array_equal(a.pixel_leaf, b.pixel_leaf)
    assert a.settings == b.settings
    assert a.hierarchy.threshold_setting == b.hierarchy.threshold_setting
    assert a.threshold == b.threshold
    assert a.hierarchy.grid_shape == b.hierarchy.grid_shape
    for tau in (0.05, 0.5, "auto"):
        np.testing.assert_array_equal(a.cut(tau), b.cut(tau))


def test_round_trip_is_identical(seg: Segmentation, saved: Path) -> None:
    assert saved.name == "cells.diffcut.zarr" and saved.is_dir()
    back = napari_diffcut.load(saved)
    assert isinstance(back, Segmentation)
    assert_same(seg, back)
    assert len(seg.levels) == 3  # a real hierarchy, not a single level


def test_round_trip_of_a_diffusion_result(
    tiny_model: Path, tmp_path: Path, three_regions: np.ndarray
) -> None:
    seg = napari_diffcut.segment(three_regions, model=str(tiny_model), min_size=2, device="cpu")
    assert seg.settings["backbone"] == "diffusion"
    back = napari_diffcut.load(seg.save(tmp_path / "sd"))
    assert_same(seg, back)


def test_saved_file_holds_levels_edits_and_version(seg: Segmentation, tmp_path: Path) -> None:
    edited = seg.labels.copy()
    edited[:5, :5] = 999  # a paint stroke with a new label
    path = store.save(
        seg, tmp_path / "x", labels=edited, layer={"source": "cells", "scale": [2.0, 0.5]}
    )
    result = read_result(path)
    np.testing.assert_array_equal(result.labels, edited)
    assert result.version == napari_diffcut.__version__
    assert result.layer == {"source": "cells", "scale": [2.0, 0.5]}
    # Levels are stored for other tools too (plain zarr).
    import zarr

    group = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(group["levels"][...], np.stack(seg.levels))
    assert group.attrs["napari_diffcut"]["n_levels"] == len(seg.levels)
    # The segmentation itself is unchanged by the edit.
    np.testing.assert_array_equal(result.segmentation.labels, seg.labels)


def test_threshold_setting_is_kept(seg: Segmentation, tmp_path: Path) -> None:
    back = napari_diffcut.load(store.save(seg, tmp_path / "t", threshold="auto"))
    assert back.hierarchy.threshold_setting == "auto"
    np.testing.assert_array_equal(back.labels, seg.cut("auto"))
    with pytest.raises(ValueError, match="threshold"):
        store.save(seg, tmp_path / "u", threshold=3.0)


def test_only_numeric_arrays_and_safe_codecs(saved: Path) -> None:
    metas = [json.loads(p.read_text()) for p in saved.rglob("zarr.json")]
    arrays = [m for m in metas if m["node_type"] == "array"]
    assert len(arrays) == 8
    for meta in arrays:
        assert meta["data_type"] in ("uint32", "int32", "int64", "float64")
        assert {c["name"] for c in meta["codecs"]} <= store.SAFE_CODECS
    header = json.loads((saved / "zarr.json").read_text())["attributes"]["napari_diffcut"]
    assert header["format"] == store.FORMAT and header["format_version"] == store.FORMAT_VERSION
    assert not list(saved.rglob("*.pkl")) and not list(saved.rglob("*.npy"))


def test_result_path_suffix(tmp_path: Path) -> None:
    assert store.result_path(tmp_path / "a").name == "a.diffcut.zarr"
    assert store.result_path(tmp_path / "a.zarr").name == "a.diffcut.zarr"
    assert store.result_path(tmp_path / "a.diffcut.zarr").name == "a.diffcut.zarr"


def test_resave_replaces_only_our_store(seg: Segmentation, tmp_path: Path) -> None:
    path = seg.save(tmp_path / "r.diffcut.zarr")
    edited = seg.labels.copy()
    edited[0, 0] = 5
    assert store.save(seg, path, labels=edited) == path
    assert read_result(path).labels[0, 0] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
    with pytest.raises(DiffCutError, match="overwrite=True"):
        store.save(seg, path, overwrite=False)
    foreign = tmp_path / "mine.diffcut.zarr"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DiffCutError, match="never replaced"):
        seg.save(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_bad_labels_are_refused(seg: Segmentation, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        store.save(seg, tmp_path / "b", labels=seg.labels[:-1])
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32 - 1\]"):
        store.save(seg, tmp_path / "b", labels=seg.labels.astype(np.int64) - 1000)
    assert not (tmp_path / "b.diffcut.zarr").exists()


def test_non_json_settings_are_refused(seg: Segmentation, tmp_path: Path) -> None:
    odd = Segmentation(seg.hierarchy, seg.pixel_leaf, {"x": object()})
    with pytest.raises(ValueError, match="JSON"):
        odd.save(tmp_path / "odd")


# -- foreign and damaged stores -------------------------------------------------------


def copy_of(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / saved.name
    shutil.copytree(saved, dst)
    return dst


def edit_json(path: Path, change: object) -> None:
    meta = json.loads(path.read_text())
    change(meta)  # type: ignore[operator]
    path.write_text(json.dumps(meta))


def test_missing_and_foreign_paths(tmp_path: Path) -> None:
    with pytest.raises(DiffCutError, match="no such folder"):
        napari_diffcut.load(tmp_path / "nothing.diffcut.zarr")
    (tmp_path / "file.diffcut.zarr").write_text("hello")
    with pytest.raises(DiffCutError, match="not a folder"):
        napari_diffcut.load(tmp_path / "file.diffcut.zarr")
    import zarr

    group = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    group.create_array("labels", data=np.zeros((4, 4), np.uint8))
    with pytest.raises(DiffCutError, match="another tool"):
        napari_diffcut.load(tmp_path / "other.zarr")
    assert not store.is_result_store(tmp_path / "other.zarr")
    v2 = zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
    v2.attrs["napari_diffcut"] = {"format": store.FORMAT}
    with pytest.raises(DiffCutError, match="cannot open"):
        napari_diffcut.load(tmp_path / "v2.zarr")


def test_damaged_group_header(saved: Path, tmp_path: Path) -> None:
    path = copy_of(saved, tmp_path)
    (path / "zarr.json").write_text("{not json")
    with pytest.raises(DiffCutError, match="cannot open"):
        napari_diffcut.load(path)


def test_newer_format_is_refused_with_advice(saved: Path, tmp_path: Path) -> None:
    path = copy_of(saved, tmp_path)
    edit_json(
        path / "zarr.json", lambda m: m["attributes"]["napari_diffcut"].update(format_version=99)
    )
    with pytest.raises(DiffCutError, match="newer napari-diffcut.*upgrade"):
        napari_diffcut.load(path)


def test_missing_array(saved: Path, tmp_path: Path) -> None:
    path = copy_of(saved, tmp_path)
    shutil.rmtree(path / "tree" / "parent")
    with pytest.raises(DiffCutError, match="array 'tree/parent' is missing"):
        napari_diffcut.load(path)


def test_pickle_codec_is_refused_before_decoding(saved: Path, tmp_path: Path) -> None:
    path = copy_of(saved, tmp_path)
    edit_json(
        path / "labels" / "zarr.json",
        lambda m: m["codecs"].append({"name": "numcodecs.pickle", "configuration": {}}),
    )
    with pytest.raises(DiffCutError, match="no pickles"):
        napari_diffcut.load(path)


def test_object_dtype_is_refused(saved: Path, tmp_path: Path) -> None:
    path = copy_of(saved, tmp_path)
    edit_json(path / "pixel_leaf" / "zarr.json", lambda m: m.update(data_type="string"))
    with pytest.raises(DiffCutError, match="numeric"):
        napari_diffcut.load(path)


def test_corrupt_chunk(saved: Path, tmp_path: Path) -> None:
    path = copy_of(saved, tmp_path)
    chunks = [p for p in (path / "pixel_leaf").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert chunks
    chunks[0].write_bytes(b"garbage")
    with pytest.raises(DiffCutError, match="damaged"):
        napari_diffcut.load(path)


def test_inconsistent_tree(saved: Path, tmp_path: Path) -> None:
    import zarr

    path = copy_of(saved, tmp_path)
    group = zarr.open_group(str(path), mode="r+")
    parent = group["tree/parent"][...]
    parent[1] = 5  # a child before its parent: not a breadth-first tree
    group["tree/parent"][...] = parent
    with pytest.raises(DiffCutError, match="breadth-first"):
        napari_diffcut.load(path)


def test_pixel_map_out_of_range(saved: Path, tmp_path: Path) -> None:
    import zarr

    path = copy_of(saved, tmp_path)
    group = zarr.open_group(str(path), mode="r+")
    leaf = group["pixel_leaf"][...]
    leaf[0, 0] = 10_000
    group["pixel_leaf"][...] = leaf
    with pytest.raises(DiffCutError, match="pixel_leaf refers to nodes"):
        napari_diffcut.load(path)


@pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")
def test_consolidated_metadata_cannot_bypass_the_checks(
    seg: Segmentation, saved: Path, tmp_path: Path
) -> None:
    """zarr would take array metadata from a consolidated copy in the group's zarr.json."""
    import zarr

    path = copy_of(saved, tmp_path)
    zarr.consolidate_metadata(str(path))
    edit_json(
        path / "zarr.json",
        lambda m: m["consolidated_metadata"]["metadata"]["labels"].update(data_type="float32"),
    )
    # The checked metadata (labels/zarr.json) is what the data is decoded with.
    np.testing.assert_array_equal(read_result(path).labels, seg.labels)


def test_forged_shape_is_refused_before_decoding(saved: Path, tmp_path: Path) -> None:
    path = copy_of(saved, tmp_path)
    edit_json(path / "labels" / "zarr.json", lambda m: m.update(shape=[200_000, 200_000]))
    with pytest.raises(DiffCutError, match="labels is \\(200000, 200000\\)"):
        napari_diffcut.load(path)


def test_levels_are_recomputed_not_decoded(seg: Segmentation, saved: Path, tmp_path: Path) -> None:
    path = copy_of(saved, tmp_path)
    chunks = [p for p in (path / "levels").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(b"garbage")
    assert_same(seg, napari_diffcut.load(path))
