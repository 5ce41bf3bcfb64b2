"""Checkpoint families end to end: API and command line on tiny random-weight folders.

The resolution-weights crash of issue 14 (weights without factor 1 failed after the
whole run) and the SDXL-class path (no self-attention at the latent grid).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import napari_diffcut  # noqa: E402
from napari_diffcut.core.image import latent_grid  # noqa: E402


@pytest.mark.parametrize("weights", [{1: 0.0, 2: 1.0}, {2: 1.0, 4: 1.0}, {4: 1.0}])
def test_weights_without_the_latent_factor(
    tiny_model: Path, two_tone_image: np.ndarray, weights: dict[int, float]
) -> None:
    """Issue 14 part 1: attention is lifted to the engine's grid, not the finest captured one."""
    seg = napari_diffcut.segment(
        two_tone_image, model=str(tiny_model), device="cpu", resolution_weights=weights,
        min_size=2,
    )
    grid = latent_grid(two_tone_image.shape[:2], 32)
    assert tuple(seg.settings["grid"]) == grid == seg.hierarchy.grid_shape
    captured = {tuple(g) for g in seg.settings["attention_grids"]}
    assert captured == {(grid[0] // f, grid[1] // f) for f, w in weights.items() if w > 0}
    assert seg.labels.shape == two_tone_image.shape[:2]


def test_weights_checked_before_the_unet(
    tiny_sdxl_model: Path, two_tone_image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A weight on a grid the model lacks fails before the VAE and the UNet run."""
    import napari_diffcut.attention.diffuse as diffuse_mod

    calls: list[str] = []
    real_encode = diffuse_mod.encode

    def counting_encode(*args: Any, **kwargs: Any) -> Any:
        calls.append("encode")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(diffuse_mod, "encode", counting_encode)
    message = r"factor\(s\) \[1\].*only at downsampling factor\(s\) \[2, 4\]"
    with pytest.raises(ValueError, match=message):
        napari_diffcut.segment(
            two_tone_image, model=str(tiny_sdxl_model), device="cpu", resolution_weights={1: 1.0}
        )
    assert calls == []


@pytest.mark.parametrize("fixture", ["tiny_sdxl_model", "tiny_ssd1b_model"])
def test_sdxl_class_segments_through_the_api(
    fixture: str, request: pytest.FixtureRequest, two_tone_image: np.ndarray
) -> None:
    folder = request.getfixturevalue(fixture)
    seg = napari_diffcut.segment(two_tone_image, model=str(folder), device="cpu", min_size=2)
    s = seg.settings
    node = latent_grid(two_tone_image.shape[:2], 16, 4)  # the 1/2 grid of a 32-side latent
    assert tuple(s["grid"]) == node
    assert s["working_size"] == [node[0] * 16, node[1] * 16]
    assert {tuple(g) for g in s["attention_grids"]} == {node, (node[0] // 2, node[1] // 2)}
    assert seg.labels.shape == two_tone_image.shape[:2] and seg.labels.max() >= 1
    only_half = napari_diffcut.segment(
        two_tone_image, model=str(folder), device="cpu", min_size=2,
        resolution_weights={1: 0.0, 2: 1.0},
    )
    assert only_half.settings["attention_grids"] == [list(node)]


def test_v_prediction_model_in_inversion_mode(
    tiny_sd2_v_model: Path, two_tone_image: np.ndarray
) -> None:
    seg = napari_diffcut.segment(
        two_tone_image, model=str(tiny_sd2_v_model), device="cpu", mode="inversion", steps=3,
        min_size=2,
    )
    assert len(seg.settings["attention_grids"]) == 3 and seg.labels.max() >= 1


def test_sdxl_class_segments_through_the_cli(
    tiny_sdxl_model: Path, two_tone_image: np.ndarray, tmp_path: Path
) -> None:
    import imageio.v3 as iio
    import tifffile

    from napari_diffcut.cli.main import main

    image = tmp_path / "img.png"
    iio.imwrite(image, two_tone_image)
    out = tmp_path / "out" / "labels.tif"
    rc = main(
        ["segment", str(image), "--model", str(tiny_sdxl_model), "--device", "cpu",
         "--min-size", "2", "-o", str(out), "-q"]
    )
    assert rc == 0
    assert tifffile.imread(out).shape == two_tone_image.shape[:2]
    settings = json.loads((tmp_path / "out" / "labels.diffcut.json").read_text())
    assert settings["model"] == str(tiny_sdxl_model)
    assert len(settings["attention_grids"]) == 2
