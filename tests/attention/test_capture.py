"""Attention capture on real (tiny, random-weight) diffusers UNets loaded through the loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_diffcut.attention.capture import (  # noqa: E402
    AttentionSink,
    capture_self_attention,
    self_attention_names,
)
from napari_diffcut.attention.model import load_model  # noqa: E402


def _unet_inputs(model, latent_hw: tuple[int, int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, *latent_hw), generator=gen)
    return x, torch.tensor([300]), model.empty_embedding


@pytest.fixture(scope="module", params=["tiny", "tiny-sd2"])
def loaded(request: pytest.FixtureRequest, tiny_model: Path, tiny_sd2_model: Path):
    path = tiny_model if request.param == "tiny" else tiny_sd2_model
    return load_model(str(path), device="cpu")


@pytest.mark.parametrize("latent_hw", [(32, 32), (24, 40)])
def test_output_equals_default_processor(loaded, latent_hw: tuple[int, int]) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = loaded.unet
    unet.set_attn_processor(AttnProcessor2_0())
    x, t, emb = _unet_inputs(loaded, latent_hw)
    with torch.no_grad():
        reference = unet(x, t, encoder_hidden_states=emb).sample
        sink = AttentionSink(latent_hw)
        with capture_self_attention(unet, sink):
            captured = unet(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(captured, reference, atol=1e-5, rtol=1e-5)
    h, w = latent_hw
    assert set(sink.sums) == {(h, w), (h // 2, w // 2), (h // 4, w // 4)}
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
            loaded.unet(x, t, encoder_hidden_states=emb)
        sinks.append(sink.means())
    for grid in sinks[0]:
        torch.testing.assert_close(sinks[0][grid], sinks[1][grid], atol=1e-6, rtol=1e-5)


def test_probabilities_match_explicit_softmax(loaded) -> None:
    """With one layer captured, the sink holds softmax(q k^T / sqrt(d)) averaged over heads."""
    unet = loaded.unet
    names = self_attention_names(unet)
    name = names[0]
    module = unet.get_submodule(name.rsplit(".processor", 1)[0])
    seen = {}

    def hook(mod, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    x, t, emb = _unet_inputs(loaded, (32, 32))
    sink = AttentionSink((32, 32), factors={1})
    original = dict(unet.attn_processors)
    try:
        with torch.no_grad(), capture_self_attention(unet, sink):
            capturing = dict(unet.attn_processors)
            unet.set_attn_processor(
                {n: (capturing[n] if n == name else original[n]) for n in capturing}
            )
            unet(x, t, encoder_hidden_states=emb)
    finally:
        handle.remove()
    assert len(names) > 1 and sink.counts == {(32, 32): 1}
    hs = seen["hidden"]
    heads, dim = module.heads, hs.shape[-1] // module.heads
    with torch.no_grad():
        q = module.to_q(hs).view(1, -1, heads, dim).transpose(1, 2)
        k = module.to_k(hs).view(1, -1, heads, dim).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / dim**0.5, -1).mean(1)[0]
    torch.testing.assert_close(sink.means()[(32, 32)], probs, atol=1e-5, rtol=1e-4)


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
        unet(x, t, encoder_hidden_states=emb)
    after = unet.attn_processors
    assert all(after[n] is before[n] for n in before)


def test_factor_selection_skips_layers(loaded) -> None:
    x, t, emb = _unet_inputs(loaded, (32, 32))
    sink = AttentionSink((32, 32), factors={2})
    with torch.no_grad(), capture_self_attention(loaded.unet, sink):
        loaded.unet(x, t, encoder_hidden_states=emb)
    assert set(sink.sums) == {(16, 16)}


def test_grid_for_rejects_impossible_token_counts() -> None:
    sink = AttentionSink((32, 32))
    assert sink.grid_for(256) == ((16, 16), 2)
    with pytest.raises(RuntimeError, match="cannot place"):
        sink.grid_for(300)
