"""The engine: segment / iter_segment with the tiny diffusion model and the pixels backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import napari_diffcut
from napari_diffcut import DiffCutEngine, Progress, Segmentation, iter_segment, segment


def assert_nested(levels: list[np.ndarray]) -> None:
    for coarse, fine in zip(levels[:-1], levels[1:], strict=True):
        pairs = np.unique(np.stack([fine.ravel(), coarse.ravel()]), axis=1)
        assert len(np.unique(pairs[0])) == pairs.shape[1]  # each fine label has one coarse parent


@pytest.fixture(scope="module")
def tiny_seg(tiny_model: Path) -> Segmentation:
    rng = np.random.default_rng(1)
    img = (rng.random((90, 150, 3)) * 255).astype(np.uint8)
    img[:, :60] //= 4
    return segment(img, model=str(tiny_model), min_size=2, seed=0)


def test_diffusion_result_contract(tiny_seg: Segmentation) -> None:
    labels = tiny_seg.labels
    assert labels.shape == (90, 150) and labels.dtype == np.uint32
    assert labels.min() >= 1
    levels = tiny_seg.levels
    assert levels and all(lv.shape == (90, 150) and lv.dtype == np.uint32 for lv in levels)
    np.testing.assert_array_equal(levels[-1], labels)
    assert_nested(levels)
    ids = {n.id for n in tiny_seg.tree}
    assert all(int(v) - 1 in ids for v in np.unique(labels))


def test_settings_are_json_and_complete(tiny_seg: Segmentation, tiny_model: Path) -> None:
    s = json.loads(json.dumps(tiny_seg.settings))
    for key in (
        "model",
        "backbone",
        "mode",
        "timestep",
        "power",
        "graph",
        "threshold",
        "min_size",
        "max_depth",
        "seed",
        "napari_diffcut_version",
        "torch",
        "diffusers",
        "device_used",
        "working_size",
        "grid",
        "auto_threshold",
        "image_shape",
    ):
        assert key in s, key
    assert s["model"] == str(tiny_model)
    # Working size follows the checkpoint (256 px native), keeps the aspect, latent multiple of 8.
    gh, gw = s["grid"]
    assert gh % 8 == 0 and gw % 8 == 0 and gw > gh
    assert s["working_size"] == [gh * 8, gw * 8]


def test_cut_is_instant_and_changes_labels(tiny_seg: Segmentation) -> None:
    low, high = tiny_seg.cut(1e-6), tiny_seg.cut(1.0)
    assert len(np.unique(low)) == 1
    assert len(np.unique(high)) >= len(np.unique(tiny_seg.labels))
    assert_nested([low, tiny_seg.labels, high])


def test_reproducible(tiny_model: Path, two_tone_image: np.ndarray) -> None:
    a = segment(two_tone_image, model=str(tiny_model), min_size=2, seed=3)
    b = segment(two_tone_image, model=str(tiny_model), min_size=2, seed=3)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_inversion_mode_and_engine_reuse(tiny_model: Path, two_tone_image: np.ndarray) -> None:
    engine = DiffCutEngine()
    events: list[Progress] = []
    seg = segment(
        two_tone_image,
        model=str(tiny_model),
        mode="inversion",
        steps=3,
        engine=engine,
        progress=events.append,
        min_size=2,
    )
    assert seg.labels.shape == two_tone_image.shape[:2]
    unet_calls = [e for e in events if e.stage == "diffuse" and e.message.startswith("UNet call")]
    assert [e.message for e in unet_calls] == [f"UNet call {i} of 3" for i in (1, 2, 3)]
    model = engine._model
    segment(two_tone_image, model=str(tiny_model), engine=engine, min_size=2)
    assert engine._model is model  # loaded once, reused
    engine.unload()
    assert not engine.loaded


def test_progress_stages_in_order(tiny_model: Path, two_tone_image: np.ndarray) -> None:
    gen = iter_segment(two_tone_image, model=str(tiny_model), min_size=2)
    stages = []
    while True:
        try:
            stages.append(next(gen).stage)
        except StopIteration as stop:
            assert isinstance(stop.value, Segmentation)
            break
    order = ["load", "encode", "diffuse", "walk", "cut", "upsample"]
    firsts = [stages.index(s) for s in order]
    assert firsts == sorted(firsts)
    assert stages.count("diffuse") >= 5  # one event per captured layer


def test_closing_generator_mid_unet_stops(tiny_model: Path, two_tone_image: np.ndarray) -> None:
    import threading

    gen = iter_segment(two_tone_image, model=str(tiny_model), mode="inversion", steps=5)
    for event in gen:
        if event.stage == "diffuse":
            break
    gen.close()  # joins the UNet thread: it must stop within one attention layer
    assert not any(t.name == "napari-diffcut-unet" and t.is_alive() for t in threading.enumerate())


def test_pixels_backbone(two_tone_image: np.ndarray) -> None:
    seg = segment(two_tone_image, backbone="pixels", min_size=4)
    assert seg.labels.shape == (96, 144)
    yy, xx = np.mgrid[:96, :144]
    disc = (yy - 48) ** 2 + (xx - 100) ** 2 < 26**2
    background = (yy - 48) ** 2 + (xx - 100) ** 2 > 34**2
    inside = np.bincount(seg.labels[disc]).argmax()
    outside = np.bincount(seg.labels[background]).argmax()
    assert inside != outside
    assert (seg.labels[disc] == inside).mean() > 0.9
    assert "torch" not in seg.settings  # no model involved


def test_non_square_keeps_aspect(tiny_model: Path) -> None:
    img = np.zeros((60, 200), np.uint16)
    img[:, 100:] = 4000
    seg = segment(img, model=str(tiny_model), min_size=2)
    gh, gw = seg.settings["grid"]
    assert seg.labels.shape == (60, 200)
    assert 2.0 < gw / gh < 4.5  # aspect 3.33, latent sides rounded to multiples of 8


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "slow"}, ValueError, "mode must be one of"),
        ({"backbone": "vit"}, ValueError, "backbone must be one of"),
        ({"threshold": 0}, ValueError, "threshold must be"),
        ({"power": 1.5}, ValueError, "power must be an integer"),
        ({"min_size": -1}, ValueError, "min_size must be"),
        ({"normalize": (99, 1)}, ValueError, "normalize must be"),
        ({"resolution_weights": {3: 1.0}}, ValueError, "resolution_weights"),
        ({"colour": "red"}, TypeError, "unknown setting"),
    ],
)
def test_bad_settings(two_tone_image: np.ndarray, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        segment(two_tone_image, **{"backbone": "pixels", **kwargs})


def test_bad_images() -> None:
    with pytest.raises(ValueError, match="image"):
        segment(np.zeros((1, 5)), backbone="pixels")
    with pytest.raises(ValueError, match="real numeric"):
        segment(np.array([["a", "b"], ["c", "d"]]), backbone="pixels")


def test_missing_model_is_diffcut_error(tmp_path: Path, two_tone_image: np.ndarray) -> None:
    with pytest.raises(napari_diffcut.DiffCutError, match="Could not load model"):
        segment(two_tone_image, model=str(tmp_path / "nothing"))


def test_resolution_weights_select_layers(tiny_model: Path, two_tone_image: np.ndarray) -> None:
    seg = segment(two_tone_image, model=str(tiny_model), resolution_weights={1: 1.0}, min_size=2)
    assert seg.settings["attention_grids"] == [seg.settings["grid"]]


def test_refine_is_on_by_default_and_keeps_levels_nested(three_regions) -> None:
    """Refinement runs by default, once on the leaves: a re-cut stays a lookup, levels nest."""
    import napari_diffcut

    refined = napari_diffcut.segment(three_regions, backbone="pixels", min_size=4)
    plain = napari_diffcut.segment(three_regions, backbone="pixels", min_size=4, refine=False)
    assert refined.settings["refined"] is True and plain.settings["refined"] is False
    assert refined.settings["refine"] is True
    assert len(refined.tree) == len(plain.tree)  # the same tree: only the pixels move
    levels = refined.levels
    for coarse, fine in zip(levels, levels[1:], strict=False):
        # every fine segment lies inside one coarse segment
        pairs = np.unique(np.stack([fine.ravel(), coarse.ravel()]), axis=1)
        assert len(np.unique(pairs[0])) == pairs.shape[1]
    lut = refined.hierarchy.node_lut(0.9)
    assert np.array_equal(refined.cut(0.9), lut[refined.pixel_leaf])  # a re-cut is a lookup


def test_a_record_from_before_refinement_reproduces_unrefined() -> None:
    from napari_diffcut.pipeline.settings import Settings

    old = Settings(backbone="pixels").as_dict()
    del old["refine"]
    assert Settings.from_dict(old).refine is True  # a plain dict: today's default
    assert Settings.from_dict(dict(old, napari_diffcut_version="0.1.0")).refine is False


def test_refine_is_a_cli_option(tmp_path, three_regions) -> None:
    import tifffile

    from napari_diffcut.cli.main import main

    src = tmp_path / "img.tif"
    tifffile.imwrite(src, three_regions)
    import json

    for flag, expected in (([], True), (["--no-refine"], False), (["--refine"], True)):
        out = tmp_path / f"out{len(flag)}{expected}"
        assert main(["segment", str(src), "--backbone", "pixels", "--min-size", "4", *flag,
                     "--out", str(out), "--quiet"]) == 0
        record = json.loads(next(out.glob("*.json")).read_text())
        assert record["refine"] is expected and record["refined"] is expected
