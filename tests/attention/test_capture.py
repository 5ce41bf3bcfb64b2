"""Attention capture on real (tiny, random-weight) diffusers UNets loaded through the loader."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_diffcut.attention.capture import (  # noqa: E402
    AttentionSink,
    attention_factors,
    capture_self_attention,
    self_attention_factors,
    self_attention_names,
)
from napari_diffcut.attention.model import load_model  # noqa: E402

#: Fixture of each tiny family, and the downsampling factors its UNet has self-attention at.
FAMILIES = {
    "tiny": ("tiny_model", (1, 2, 4)),
    "tiny-sd2": ("tiny_sd2_model", (1, 2, 4)),
    "tiny-sdxl": ("tiny_sdxl_model", (2, 4)),
    "tiny-ssd1b": ("tiny_ssd1b_model", (2, 4)),
}


def _unet_inputs(model, latent_hw: tuple[int, int], seed: int = 0):
    """Latent, timestep and the conditioning keywords (SDXL: pooled embedding, time ids)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, *latent_hw), generator=gen)
    return x, torch.tensor([300]), model.unet_kwargs(latent_hw)


@pytest.fixture(scope="module", params=list(FAMILIES))
def loaded(request: pytest.FixtureRequest):
    path = request.getfixturevalue(FAMILIES[request.param][0])
    model = load_model(str(path), device="cpu", dtype="float32")  # exact fp32 comparisons
    model.fixture_name = request.param
    return model


def _finest(loaded) -> int:
    return FAMILIES[loaded.fixture_name][1][0]


def test_attention_factors_from_the_module_tree(loaded) -> None:
    expected = FAMILIES[loaded.fixture_name][1]
    assert attention_factors(loaded.unet) == expected == loaded.attention_factors
    per_layer = self_attention_factors(loaded.unet)
    assert set(per_layer) == set(self_attention_names(loaded.unet))
    mid = [n for n in per_layer if n.startswith("mid_block.")]
    if loaded.fixture_name == "tiny-ssd1b":
        assert not mid  # the distilled layout: no attention in the mid block
    else:
        assert mid and {per_layer[n] for n in mid} == {expected[-1]}
    assert loaded.patch_factor == expected[0]
    assert loaded.patch_size == 8 * expected[0]


@pytest.mark.parametrize("latent_hw", [(32, 32), (24, 40)])
def test_output_equals_default_processor(loaded, latent_hw: tuple[int, int]) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = loaded.unet
    unet.set_attn_processor(AttnProcessor2_0())
    x, t, emb = _unet_inputs(loaded, latent_hw)
    with torch.no_grad():
        reference = unet(x, t, **emb).sample
        sink = AttentionSink(latent_hw)
        with capture_self_attention(unet, sink):
            captured = unet(x, t, **emb).sample
    torch.testing.assert_close(captured, reference, atol=1e-5, rtol=1e-5)
    h, w = latent_hw
    assert set(sink.sums) == {(h // f, w // f) for f in FAMILIES[loaded.fixture_name][1]}
    for (gh, gw), mean in sink.means().items():
        assert mean.shape == (gh * gw, gh * gw)
        np.testing.assert_allclose(mean.sum(-1).numpy(), 1.0, atol=1e-5)
        assert float(mean.min()) >= 0


def test_head_chunking_gives_same_probabilities(loaded) -> None:
    x, t, emb = _unet_inputs(loaded, (32, 32))
    sinks = []
    for chunk in (1 << 30, 1):  # all heads at once vs one head at a time
        sink = AttentionSink((32, 32), chunk_bytes=chunk)
        with torch.no_grad(), capture_self_attention(loaded.unet, sink):
            loaded.unet(x, t, **emb)
        sinks.append(sink.means())
    for grid in sinks[0]:
        torch.testing.assert_close(sinks[0][grid], sinks[1][grid], atol=1e-6, rtol=1e-5)


def test_probabilities_match_explicit_softmax(loaded) -> None:
    """With one layer captured, the sink holds softmax(q k^T / sqrt(d)) averaged over heads."""
    unet = loaded.unet
    names = self_attention_names(unet)
    f = _finest(loaded)  # the first layer at the finest grid the family has
    name = next(n for n in names if self_attention_factors(unet)[n] == f)
    module = unet.get_submodule(name.rsplit(".processor", 1)[0])
    seen = {}

    def hook(mod, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    x, t, emb = _unet_inputs(loaded, (32, 32))
    sink = AttentionSink((32, 32), factors={f})
    original = dict(unet.attn_processors)
    try:
        with torch.no_grad(), capture_self_attention(unet, sink):
            capturing = dict(unet.attn_processors)
            unet.set_attn_processor(
                {n: (capturing[n] if n == name else original[n]) for n in capturing}
            )
            unet(x, t, **emb)
    finally:
        handle.remove()
    grid = (32 // f, 32 // f)
    assert len(names) > 1 and sink.counts == {grid: 1}
    hs = seen["hidden"]
    heads, dim = module.heads, hs.shape[-1] // module.heads
    with torch.no_grad():
        q = module.to_q(hs).view(1, -1, heads, dim).transpose(1, 2)
        k = module.to_k(hs).view(1, -1, heads, dim).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / dim**0.5, -1).mean(1)[0]
    torch.testing.assert_close(sink.means()[grid], probs, atol=1e-5, rtol=1e-4)


def test_only_attn1_swapped_and_restored(loaded) -> None:
    unet = loaded.unet
    before = dict(unet.attn_processors)
    sink = AttentionSink((32, 32))
    with capture_self_attention(unet, sink):
        during = unet.attn_processors
        for name, proc in during.items():
            if ".attn1." in f".{name}":
                assert type(proc).__name__ == "CaptureAttnProcessor"
            else:
                assert proc is before[name]
    after = unet.attn_processors
    assert all(after[n] is before[n] for n in before)


def test_processors_restored_after_error(loaded) -> None:
    unet = loaded.unet
    before = dict(unet.attn_processors)
    sink = AttentionSink((32, 32))
    x, t, emb = _unet_inputs(loaded, (32, 32))

    def boom() -> None:
        raise KeyboardInterrupt  # e.g. a cancel in the middle of the forward pass

    sink.on_layer = boom
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), capture_self_attention(unet, sink):
        unet(x, t, **emb)
    after = unet.attn_processors
    assert all(after[n] is before[n] for n in before)


def test_factor_selection_skips_layers(loaded) -> None:
    x, t, emb = _unet_inputs(loaded, (32, 32))
    sink = AttentionSink((32, 32), factors={4})
    with torch.no_grad(), capture_self_attention(loaded.unet, sink):
        loaded.unet(x, t, **emb)
    assert set(sink.sums) == {(8, 8)}


def test_grid_for_rejects_impossible_token_counts() -> None:
    sink = AttentionSink((32, 32))
    assert sink.grid_for(256) == ((16, 16), 2)
    with pytest.raises(RuntimeError, match="cannot place"):
        sink.grid_for(300)


@pytest.mark.parametrize("factors", [None, {2, 4}])
def test_stop_after_the_last_layer_gives_the_full_forwards_attention(loaded, factors) -> None:
    """Fast mode stops the UNet at its last captured layer, with bitwise the same maps."""
    import contextlib

    from napari_diffcut.attention.capture import CaptureComplete

    x, t, emb = _unet_inputs(loaded, (32, 32))
    layer_factors = self_attention_factors(loaded.unet).values()
    wanted = [f for f in layer_factors if not factors or f in factors]
    seen: list[int] = []
    full = AttentionSink((32, 32), factors=factors)
    early = AttentionSink((32, 32), factors=factors, stop_after=len(wanted),
                          on_layer=lambda: seen.append(early.captured))
    before = dict(loaded.unet.attn_processors)
    with torch.no_grad():
        with capture_self_attention(loaded.unet, full):
            loaded.unet(x, t, **emb)
        with pytest.raises(CaptureComplete), capture_self_attention(loaded.unet, early):
            loaded.unet(x, t, **emb)
        # The processors are back after the early stop, and a sink with no
        # stop_after (the inversion mode) never raises.
        assert all(loaded.unet.attn_processors[n] is p for n, p in before.items())
        with contextlib.suppress(CaptureComplete), capture_self_attention(loaded.unet, full):
            loaded.unet(x, t, **emb)
    assert full.captured == 2 * len(wanted) and early.captured == len(wanted)
    assert seen == list(range(1, len(wanted) + 1))  # progress for every layer, the last too
    assert set(early.sums) == set(full.sums)
    for grid, mean in early.means().items():
        assert early.counts[grid] * 2 == full.counts[grid]
        torch.testing.assert_close(mean, full.sums[grid] / full.counts[grid], rtol=0, atol=1e-7)


def test_fast_mode_stops_early_and_matches_a_full_forward(loaded) -> None:
    """iter_attention in fast mode: the same attention as a sink that lets the UNet finish."""
    from napari_diffcut.attention.diffuse import iter_attention

    x, t, emb = _unet_inputs(loaded, (32, 32))
    tail: list[str] = []  # the UNet's output convolution runs only in a full forward
    hook = loaded.unet.conv_out.register_forward_hook(lambda *_: tail.append("conv_out"))
    try:
        gen = iter_attention(loaded, x, timestep=300)
        assert next(gen) == (1, 1)
        with pytest.raises(StopIteration) as stop:
            next(gen)
        assert tail == []
        per_grid = stop.value.value
        full = AttentionSink((32, 32))
        with torch.no_grad(), capture_self_attention(loaded.unet, full):
            loaded.unet(x, t, **emb)
        assert tail == ["conv_out"]
    finally:
        hook.remove()
    for grid, mean in full.means().items():
        assert np.array_equal(per_grid[grid], mean.numpy())
