"""The in-place ResNet forward is bitwise the stock one, on UNets and VAEs loaded for real."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

from napari_diffcut.attention.diffuse import encode  # noqa: E402
from napari_diffcut.attention.inplace import (  # noqa: E402
    InplaceResnetBlock2D,
    use_inplace_resnets,
)
from napari_diffcut.attention.model import load_model  # noqa: E402


def _stock(module: torch.nn.Module) -> int:
    """Put the stock class back on every switched block (the reference run)."""
    n = 0
    for block in module.modules():
        if type(block) is InplaceResnetBlock2D:
            block.__class__ = ResnetBlock2D
            n += 1
    return n


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_sdxl_model"])
def test_loaded_cpu_models_run_the_inplace_forward_bitwise(
    fixture: str, dtype: str, request: pytest.FixtureRequest
) -> None:
    m = load_model(str(request.getfixturevalue(fixture)), device="cpu", dtype=dtype)
    counts = [
        sum(type(b) is InplaceResnetBlock2D for b in part.modules()) for part in (m.unet, m.vae)
    ]
    assert min(counts) > 0
    assert not any(type(b) is ResnetBlock2D for b in m.unet.modules())
    rgb = np.random.default_rng(0).random((128, 96, 3), dtype=np.float32)
    cond = m.unet_kwargs((16, 12))
    t = torch.tensor([300])
    with torch.no_grad():
        latents = encode(m, rgb)
        fast = m.unet(latents, t, **cond).sample
        assert _stock(m.unet) == counts[0] and _stock(m.vae) == counts[1]
        ref_latents = encode(m, rgb)
        ref = m.unet(ref_latents, t, **cond).sample
    assert torch.equal(latents, ref_latents)
    assert torch.equal(fast, ref)


def test_input_is_left_alone_and_autograd_gets_the_stock_forward(tiny_model: Path) -> None:
    m = load_model(str(tiny_model), device="cpu", dtype="float32")
    block = next(b for b in m.vae.modules() if isinstance(b, InplaceResnetBlock2D))
    x = torch.randn(1, block.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    kept = x.clone()
    with torch.no_grad():
        fast = block(x, None)
    assert torch.equal(x, kept)  # the in-place steps only touch the block's own buffers
    # With gradients on (training, or a caller differentiating), the stock forward runs:
    # in-place ops on saved activations would break autograd.
    y = x.clone().requires_grad_(True)
    out = block(y, None)
    out.sum().backward()
    assert y.grad is not None
    torch.testing.assert_close(out.detach(), fast, rtol=0, atol=0)


def test_only_stock_blocks_are_switched() -> None:
    class Custom(ResnetBlock2D):
        pass

    model = torch.nn.Sequential(
        ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=None),
        Custom(in_channels=32, out_channels=32, temb_channels=None),
        ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=None, down=True),
    ).eval()
    assert use_inplace_resnets(model) == 2  # a subclass keeps its own forward
    assert [type(b).__name__ for b in model] == [
        "InplaceResnetBlock2D", "Custom", "InplaceResnetBlock2D",
    ]
    x = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        down = model[2](x, None)  # a down-sampling block runs the stock forward
        model[2].__class__ = ResnetBlock2D
        assert torch.equal(down, model[2](x, None))


def test_a_raw_time_embedding_gets_the_stock_forward() -> None:
    """Without time_emb_proj the stock forward adds temb as it is; so does the switched block."""
    block = ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=None).eval()
    temb = torch.randn(1, 32, 1, 1, generator=torch.Generator().manual_seed(2))
    x = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = block(x, temb)
        use_inplace_resnets(block)
        assert type(block) is InplaceResnetBlock2D
        assert torch.equal(block(x, temb), ref)
        assert not torch.equal(block(x, None), ref)  # temb did count
