"""Diffuse, part 2: encode an image and run the UNet with attention capture.

Two modes (method.md 2.2):

- ``fast`` (default): one UNet call on the clean VAE latent with the timestep
  embedding of ``timestep`` (default 300) and the empty prompt, no added noise:
  DiffSeg's setting, deterministic. ``noise=True`` adds DDPM noise at that
  timestep from a generator seeded with ``seed`` (DiffCut's setting).
- ``inversion``: ``steps`` deterministic DDIM-inversion steps on a 50-step grid
  (spacing ``num_train_timesteps / 50``), attention averaged over the calls
  with equal weights: the "10 of 50 steps" reading of the paper [S].
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator

import numpy as np
import torch
from numpy.typing import NDArray

from napari_diffcut.attention.capture import (
    AttentionSink,
    CaptureComplete,
    capture_self_attention,
    captured_layer_count,
)
from napari_diffcut.attention.model import LoadedModel

INVERSION_GRID = 50

#: Captured attention per (h, w) grid: numpy on the host, or tensors left on the device.
PerGrid = dict[tuple[int, int], NDArray[np.float32]] | dict[tuple[int, int], torch.Tensor]


@torch.no_grad()
def encode(model: LoadedModel, rgb: NDArray[np.float32]) -> torch.Tensor:
    """VAE posterior mean times the scaling factor; ``rgb`` in [0, 1], (Y, X, 3).

    The VAE runs in :attr:`LoadedModel.vae_dtype` (fp32 unless bf16 or a
    fp16-safe VAE), the latent is returned in the UNet's dtype.
    """
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    x = (x * 2.0 - 1.0).to(model.device, model.vae_dtype)
    dist = model.vae.encode(x).latent_dist
    return (dist.mean * model.scaling_factor).to(model.dtype)


def inversion_timesteps(model: LoadedModel, steps: int) -> list[int]:
    """First ``steps`` timesteps of the 50-step DDIM grid, increasing."""
    spacing = model.num_train_timesteps // INVERSION_GRID
    return [model.steps_offset + i * spacing for i in range(steps)]


@torch.no_grad()
def iter_attention(
    model: LoadedModel,
    latents: torch.Tensor,
    *,
    mode: str = "fast",
    timestep: int = 300,
    steps: int = 10,
    noise: bool = False,
    seed: int = 0,
    factors: set[int] | None = None,
    on_layer: Callable[[], None] | None = None,
    keep_on_device: bool = False,
) -> Generator[tuple[int, int], None, PerGrid]:
    """Run the UNet and capture self-attention; yield after each UNet call.

    ``keep_on_device`` returns float32 tensors on the model's device instead
    of numpy arrays: the torch post-model path (:mod:`napari_diffcut.accel`)
    goes on there, and the N x N matrices never cross to the host.

    Yields
    ------
    (step, total) : tuple of int

    Returns
    -------
    dict of (h, w) -> ndarray or torch.Tensor (h*w, h*w), float32
        Head-, layer- and step-averaged attention per grid.
    """
    unet = model.unet
    # Fast mode never reads the UNet's output: the forward stops at the last
    # captured layer (AttentionSink.stop_after; the tail after it, up_blocks.3's
    # last feed-forward and the output convolutions for SD 1.5, is skipped).
    wanted = captured_layer_count(unet, factors)
    sink = AttentionSink(
        tuple(latents.shape[-2:]), factors=factors, on_layer=on_layer,
        stop_after=wanted if mode == "fast" else None,
    )
    cond = model.unet_kwargs(tuple(latents.shape[-2:]))
    if mode == "fast":
        x = latents
        if noise:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            eps = torch.randn(latents.shape, generator=gen).to(latents)
            abar = model.alphas_cumprod[timestep]
            x = (abar.sqrt() * latents.double() + (1 - abar).sqrt() * eps.double()).to(latents)
        t = torch.tensor([timestep], device=model.device)
        with capture_self_attention(unet, sink), contextlib.suppress(CaptureComplete):
            unet(x, t, **cond)
        if sink.captured != wanted:  # a miscount would stop early with maps missing
            raise RuntimeError(f"captured {sink.captured} of {wanted} self-attention layers")
        _settle(latents.device, keep_on_device)
        yield 1, 1
    elif mode == "inversion":
        ts = inversion_timesteps(model, steps)
        x = latents.double()
        with capture_self_attention(unet, sink):
            for i, t in enumerate(ts):
                out = unet(
                    x.to(model.dtype), torch.tensor([t], device=model.device), **cond
                ).sample.double()
                if i + 1 < len(ts):
                    x = _ddim_invert_step(model, x, out, t, ts[i + 1])
                _settle(latents.device, keep_on_device)
                yield i + 1, len(ts)
    else:
        raise ValueError(f"mode must be 'fast' or 'inversion', got {mode!r}")
    if keep_on_device:
        return {g: a.float() for g, a in sink.means().items()}
    return {g: a.float().cpu().numpy() for g, a in sink.means().items()}


def _settle(device: torch.device, keep_on_device: bool) -> None:
    """Wait for the queued CUDA kernels of a UNet call before reporting it done.

    Only for the torch post path: its attention never goes through ``.cpu()``
    (which waits), so without this the UNet's tail would be timed as the
    aggregation after it (benchmarks/run.py times stages by their events).
    """
    if keep_on_device and device.type == "cuda":
        torch.cuda.synchronize(device)


def split_prediction(
    prediction_type: str, x: torch.Tensor, out: torch.Tensor, abar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, eps)`` from a UNet output of ``prediction_type`` at ``x_t``.

    With ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``: "epsilon" predicts eps;
    "v_prediction" (SD 2.x 768 px checkpoints) predicts
    ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (Salimans & Ho 2022), so
    ``x0 = sqrt(abar) x_t - sqrt(1 - abar) v`` and ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``;
    "sample" predicts x0 (diffusers DDIMScheduler.step uses the same formulas).
    """
    a, b = abar.sqrt(), (1 - abar).sqrt()
    if prediction_type == "epsilon":
        return (x - b * out) / a, out
    if prediction_type == "v_prediction":
        return a * x - b * out, a * out + b * x
    if prediction_type == "sample":
        return out, (x - a * out) / b
    raise ValueError(
        "prediction_type must be 'epsilon', 'v_prediction' or 'sample', "
        f"got {prediction_type!r}"
    )


def _ddim_invert_step(
    model: LoadedModel, x: torch.Tensor, out: torch.Tensor, t: int, t_next: int
) -> torch.Tensor:
    """x_{t'} = sqrt(abar_t') x0_hat + sqrt(1 - abar_t') eps (method.md 2.2)."""
    a_t = model.alphas_cumprod[t].to(x.device)
    a_n = model.alphas_cumprod[t_next].to(x.device)
    x0, eps = split_prediction(model.prediction_type, x, out, a_t)
    return a_n.sqrt() * x0 + (1 - a_n).sqrt() * eps
