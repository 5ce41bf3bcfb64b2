"""Encoding and DDIM inversion on tiny random-weight models, against diffusers' own scheduler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_diffcut.attention.diffuse import (  # noqa: E402
    _ddim_invert_step,
    encode,
    inversion_timesteps,
    iter_attention,
    split_prediction,
)
from napari_diffcut.attention.model import load_model  # noqa: E402


def _drain(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_split_prediction_recovers_x0_and_eps(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    abar = torch.tensor(0.7, dtype=torch.float64)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    out = {
        "epsilon": eps,
        "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0,
        "sample": x0,
    }[kind]
    got_x0, got_eps = split_prediction(kind, x_t, out, abar)
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)
    with pytest.raises(ValueError, match="prediction_type"):
        split_prediction("flow", x_t, out, abar)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_sd2_v_model"])
def test_inversion_step_equals_diffusers(fixture: str, request: pytest.FixtureRequest) -> None:
    """One inversion step on a real UNet output equals DDIMInverseScheduler.step."""
    from diffusers import DDIMInverseScheduler

    folder: Path = request.getfixturevalue(fixture)
    m = load_model(str(folder), device="cpu", dtype="float32")
    assert m.prediction_type == ("v_prediction" if "sd2_v" in fixture else "epsilon")
    sched = DDIMInverseScheduler.from_pretrained(folder, subfolder="scheduler")
    sched.set_timesteps(50)
    x = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(1))
    ts = inversion_timesteps(m, 3)
    with torch.no_grad():
        out = m.unet(x, torch.tensor([ts[1]]), **m.unet_kwargs((32, 32))).sample
    ours = _ddim_invert_step(m, x.double(), out.double(), ts[1], ts[2])
    ref = sched.step(out, ts[2], x).prev_sample
    torch.testing.assert_close(ours.float(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_sd2_v_model", "tiny_sdxl_model"])
def test_inversion_mode_captures_every_grid(fixture: str, request: pytest.FixtureRequest) -> None:
    m = load_model(str(request.getfixturevalue(fixture)), device="cpu", dtype="float32")
    rgb = np.random.default_rng(0).random((192, 320, 3), dtype=np.float32)
    latents = encode(m, rgb)
    assert latents.shape == (1, 4, 24, 40)
    steps = list(iter_attention(m, latents, mode="inversion", steps=3))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    per_res = _drain(iter_attention(m, latents, mode="inversion", steps=3))
    assert set(per_res) == {(24 // f, 40 // f) for f in m.attention_factors}
    for (h, w), a in per_res.items():
        assert a.shape == (h * w, h * w) and np.all(np.isfinite(a))
        np.testing.assert_allclose(a.sum(1), 1, atol=1e-4)


def test_bf16_encode_and_attention_close_to_fp32(tiny_model: Path) -> None:
    """bf16 (VAE and UNet) attention maps stay within a few percent of fp32's on random weights."""
    rgb = np.random.default_rng(0).random((256, 256, 3), dtype=np.float32)
    maps = {}
    for dtype in ("float32", "bfloat16"):
        m = load_model(str(tiny_model), device="cpu", dtype=dtype)
        latents = encode(m, rgb)
        assert latents.dtype == m.dtype
        maps[dtype] = _drain(iter_attention(m, latents))
    for grid, ref in maps["float32"].items():
        rel = np.abs(maps["bfloat16"][grid] - ref).sum(1) / ref.sum(1)  # L1 per attention row
        assert float(np.median(rel)) < 0.05, grid


def test_bf16_segments_like_fp32(tiny_model: Path) -> None:
    """Issue 14.4: bf16 on the CPU (channels-last) segments as fp32 does.

    Random weights give structureless attention: the automatic cut is the whole
    image in both, and the splits below it are near-ties (costs about 0.99)
    whose partitions any rounding reorders; so the automatic labels are
    compared (ARI) and the tree's split costs, which bf16 keeps to 1e-3.
    """
    from sklearn.metrics import adjusted_rand_score

    import napari_diffcut

    yy, xx = np.mgrid[:256, :256] / 256
    image = np.stack([0.2 + 0.3 * xx, 0.3 + 0.2 * yy, 0.4 + 0 * xx], -1)
    image[(yy - 0.35) ** 2 + (xx - 0.3) ** 2 < 0.04] = (0.9, 0.2, 0.2)
    image[(yy - 0.7) ** 2 + (xx - 0.7) ** 2 < 0.03] = (0.2, 0.8, 0.3)
    segs = {
        dtype: napari_diffcut.segment(
            image.astype(np.float32), model=str(tiny_model), device="cpu", dtype=dtype,
            min_size=2,
        )
        for dtype in ("float32", "bfloat16")
    }
    ref, low = segs["float32"], segs["bfloat16"]
    assert low.settings["dtype"] == "bfloat16"
    assert adjusted_rand_score(ref.labels.ravel(), low.labels.ravel()) >= 0.98
    costs = [[n.cost for n in seg.tree[:7]] for seg in (ref, low)]
    np.testing.assert_allclose(costs[1], costs[0], atol=1e-3)
