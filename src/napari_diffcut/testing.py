"""Random-weight Stable Diffusion folders for tests, benchmarks and offline demos.

``make_random_model(path, "tiny")`` writes a complete diffusers folder (unet,
vae, text_encoder, tokenizer, scheduler; safetensors weights) that loads
through exactly the same loader as a real checkpoint. ``"sd15"`` uses the full
SD 1.5 architecture (random weights: the real compute cost, meaningless
attention). Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

CONFIGS = ("tiny", "tiny-sd2", "sd15")


def _unet_kwargs(config: str) -> dict[str, Any]:
    if config == "sd15":
        return {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": (
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            "up_block_types": (
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ),
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        }
    # Tiny: attention at the latent grid, 1/2 and the mid block (1/4), like SD's
    # 64/32/16/8 pyramid in miniature. "tiny-sd2" uses SD 2.x-style head
    # layout (fixed head *dimension*, linear projections, upcast attention).
    kw: dict[str, Any] = {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "norm_num_groups": 16,
        "attention_head_dim": 2,
    }
    if config == "tiny-sd2":
        kw.update(attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True)
    return kw


def _vae_kwargs(config: str) -> dict[str, Any]:
    if config == "sd15":
        return {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2,
            "latent_channels": 4,
            "sample_size": 512,
        }
    # Four blocks give the real 8x VAE downsampling at a tiny width.
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 8, 16, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 128,
    }


def _write_tokenizer(folder: Path, max_length: int) -> None:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    src = folder / "_src"
    src.mkdir(exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(
        str(src / "vocab.json"),
        str(src / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=max_length,
    )
    tok.save_pretrained(str(folder))
    for f in src.iterdir():
        f.unlink()
    src.rmdir()


def make_random_model(path: str | Path, config: str = "tiny", *, seed: int = 0) -> Path:
    """Write a random-weight SD folder in diffusers layout and return its path.

    Parameters
    ----------
    path : str or Path
        Output folder (created).
    config : {"tiny", "tiny-sd2", "sd15"}
        Architecture. ``tiny`` works at 256 px (32x32 latent) and saves in a
        second; ``sd15`` is the full SD 1.5 architecture (about 4 GB on disk).
    seed : int
        torch seed of the random weights.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if config not in CONFIGS:
        raise ValueError(f"config must be one of {CONFIGS}, got {config!r}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    UNet2DConditionModel(**_unet_kwargs(config)).save_pretrained(
        out / "unet", safe_serialization=True
    )
    AutoencoderKL(**_vae_kwargs(config)).save_pretrained(out / "vae", safe_serialization=True)
    big = config == "sd15"
    text_cfg = CLIPTextConfig(
        hidden_size=768 if big else 32,
        intermediate_size=3072 if big else 64,
        num_hidden_layers=12 if big else 2,
        num_attention_heads=12 if big else 4,
        vocab_size=49408 if big else 64,
        max_position_embeddings=77,
        projection_dim=768 if big else 32,
        bos_token_id=0 if not big else 49406,
        eos_token_id=1 if not big else 49407,
        pad_token_id=1,
    )
    CLIPTextModel(text_cfg).save_pretrained(out / "text_encoder", safe_serialization=True)
    _write_tokenizer(out / "tokenizer", 77)
    DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    ).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "note": f"napari-diffcut random-weight test model ({config})",
            }
        )
    )
    return out


def planted_transition(
    grid: tuple[int, int],
    regions: np.ndarray,
    *,
    locality: float = 50.0,
    strength: float = 3.0,
    noise: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Attention-like row-stochastic matrix for tests and benchmarks.

    Softmax rows of ``-d^2 / locality + strength * [same region] + noise``: spatially
    local attention plus planted regions plus Gaussian noise (not an easy block matrix).
    """
    h, w = grid
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    pos = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float32)
    sq = (pos * pos).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * pos @ pos.T, 0)
    same = regions.ravel()[:, None] == regions.ravel()[None]
    logits = -d2 / locality + strength * same + rng.normal(0, noise, d2.shape).astype(np.float32)
    logits -= logits.max(1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(1, keepdims=True)
    return logits.astype(np.float32)
