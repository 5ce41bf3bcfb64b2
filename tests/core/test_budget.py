"""Absurd sizes are refused with one line before anything large is allocated."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import napari_diffcut
from napari_diffcut.core import budget
from napari_diffcut.core.errors import DiffCutError


def test_graph_estimate_counts_dense_matrices() -> None:
    assert budget.graph_bytes((64, 64)) == budget.DENSE_COPIES * 4096**2 * 4
    assert budget.format_bytes(3 * 2**30) == "3.0 GB"


@pytest.fixture
def eight_gb(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with 8 GB available (the estimate, not this host's RAM, is tested)."""
    monkeypatch.setattr(budget, "available_bytes", lambda: 8 * 2**30)


def test_long_thin_image_is_refused_before_the_graph_is_built(eight_gb: None) -> None:
    # The latent grid needs at least 8 rows: 8 x 4528 patches, 36224^2 dense matrices.
    img = np.random.default_rng(0).random((4, 20000)).astype(np.float32)
    start = time.perf_counter()
    with pytest.raises(DiffCutError, match=r"would take .* GB.*--tile-size.*--working-size"):
        napari_diffcut.segment(img, backbone="pixels")
    assert time.perf_counter() - start < 5


def test_huge_working_size_is_one_line_in_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import tifffile

    from napari_diffcut.cli.main import main

    src = tmp_path / "a.tif"
    tifffile.imwrite(src, np.zeros((32, 32), np.uint16))
    rc = main(["segment", str(src), "--backbone", "pixels", "--working-size", "100000", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "would take" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif"]


def test_model_with_a_huge_sample_size_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "huge"
    shutil.copytree(tiny_model, model)
    config = model / "unet" / "config.json"
    data = json.loads(config.read_text())
    data["sample_size"] = 100000
    config.write_text(json.dumps(data))
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(DiffCutError, match="would take"):
        napari_diffcut.segment(img, model=str(model), device="cpu")
