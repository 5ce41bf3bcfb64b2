"""Random-weight Stable Diffusion folders for tests, benchmarks and offline demos.

``make_random_model(path, "tiny")`` writes a complete diffusers folder (unet,
vae, text_encoder, tokenizer, scheduler; safetensors weights) that loads
through exactly the same loader as a real checkpoint. ``"sd15"`` uses the full
SD 1.5 architecture (random weights: the real compute cost, meaningless
attention). ``"tiny-sd2-v"`` is ``"tiny-sd2"`` with a v-prediction scheduler
(SD 2.x 768 px checkpoints). ``"tiny-sdxl"`` and ``"tiny-ssd1b"`` are
SDXL-class folders: two text encoders, a ``text_time`` added embedding, no
self-attention at the latent grid. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

CONFIGS = ("tiny", "tiny-sd2", "tiny-sd2-v", "tiny-sdxl", "tiny-ssd1b", "sd15")

#: SDXL-class configurations (two text encoders, pooled embedding and time ids).
SDXL_CONFIGS = ("tiny-sdxl", "tiny-ssd1b")

#: Width of each tiny text encoder; SDXL-class UNets attend to both, concatenated.
_TINY_TEXT_WIDTH = 32

#: Width of one SDXL time-id embedding in the tiny UNets (SDXL base: 256).
_TINY_TIME_DIM = 8


def _sdxl_unet_kwargs(config: str) -> dict[str, Any]:
    """SDXL's block layout in miniature (diffusers stabilityai/stable-diffusion-xl-base-1.0).

    SDXL: ``DownBlock2D`` then two ``CrossAttnDownBlock2D`` (no self-attention
    at the latent grid), 64-dim heads ``[5, 10, 20]``, transformer depths
    ``[1, 2, 10]``, linear projections, ``addition_embed_type="text_time"``
    whose input is 6 time ids x 256 + the 1280-wide pooled embedding (2816).
    ``tiny-ssd1b`` adds what the distilled SSD-1B / Segmind Vega UNets change
    structurally (Gupta et al. 2024, arXiv 2401.02677: transformer blocks and
    mid-block attention removed): per-layer transformer depths in the up blocks
    (``reverse_transformer_layers_per_block``) and a mid block without attention.
    """
    kw: dict[str, Any] = {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "transformer_layers_per_block": (1, 1, 2),
        "attention_head_dim": (2, 4, 4),
        "use_linear_projection": True,
        "cross_attention_dim": 2 * _TINY_TEXT_WIDTH,
        "norm_num_groups": 16,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 4,
        "addition_time_embed_dim": _TINY_TIME_DIM,
        "projection_class_embeddings_input_dim": 6 * _TINY_TIME_DIM + _TINY_TEXT_WIDTH,
    }
    if config == "tiny-ssd1b":
        kw.update(
            reverse_transformer_layers_per_block=((2, 1), (1, 1), (1, 1)),
            mid_block_type="UNetMidBlock2D",
        )
    return kw


def _unet_kwargs(config: str) -> dict[str, Any]:
    if config in SDXL_CONFIGS:
        return _sdxl_unet_kwargs(config)
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
    if config in ("tiny-sd2", "tiny-sd2-v"):
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
    if config in SDXL_CONFIGS:
        # SDXL's VAE: same layout as SD's, scaling factor 0.13025, fp16-unsafe.
        extra: dict[str, Any] = {"scaling_factor": 0.13025, "force_upcast": True}
    else:
        extra = {}
    return extra | {
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
    config : {"tiny", "tiny-sd2", "tiny-sd2-v", "tiny-sdxl", "tiny-ssd1b", "sd15"}
        Architecture. The tiny ones work at 256 px (32x32 latent) and save in a
        second; ``sd15`` is the full SD 1.5 architecture (about 4 GB on disk).
    seed : int
        torch seed of the random weights.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if config not in CONFIGS:
        raise ValueError(f"config must be one of {CONFIGS}, got {config!r}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    UNet2DConditionModel(**_unet_kwargs(config)).save_pretrained(
        out / "unet", safe_serialization=True
    )
    AutoencoderKL(**_vae_kwargs(config)).save_pretrained(out / "vae", safe_serialization=True)
    text_cfg = _text_config(config, CLIPTextConfig)
    CLIPTextModel(text_cfg).save_pretrained(out / "text_encoder", safe_serialization=True)
    _write_tokenizer(out / "tokenizer", 77)
    schedule: dict[str, Any] = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
    }
    pipeline = "StableDiffusionPipeline"
    if config in SDXL_CONFIGS:
        # SDXL folders ship a second, projecting text encoder and an Euler scheduler
        # with the same betas (stabilityai/stable-diffusion-xl-base-1.0 model_index.json).
        CLIPTextModelWithProjection(text_cfg).save_pretrained(
            out / "text_encoder_2", safe_serialization=True
        )
        _write_tokenizer(out / "tokenizer_2", 77)
        EulerDiscreteScheduler(**schedule, timestep_spacing="leading").save_pretrained(
            out / "scheduler"
        )
        pipeline = "StableDiffusionXLPipeline"
    else:
        prediction = "v_prediction" if config == "tiny-sd2-v" else "epsilon"
        DDIMScheduler(
            **schedule, clip_sample=False, set_alpha_to_one=False, prediction_type=prediction
        ).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": pipeline,
                "_diffusers_version": "0.42.1",
                "note": f"napari-diffcut random-weight test model ({config})",
            }
        )
    )
    return out


def _text_config(config: str, cls: Any) -> Any:
    """CLIP text config: SD 1.5's for ``sd15``, a 2-layer, 32-wide one otherwise."""
    big = config == "sd15"
    return cls(
        hidden_size=768 if big else _TINY_TEXT_WIDTH,
        intermediate_size=3072 if big else 64,
        num_hidden_layers=12 if big else 2,
        num_attention_heads=12 if big else 4,
        vocab_size=49408 if big else 64,
        max_position_embeddings=77,
        projection_dim=768 if big else _TINY_TEXT_WIDTH,
        bos_token_id=0 if not big else 49406,
        eos_token_id=1 if not big else 49407,
        pad_token_id=1,
    )


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
