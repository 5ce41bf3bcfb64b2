"""Devices and dtypes: where and in which precision the UNet and the VAE run.

``device="auto"`` picks CUDA, then MPS, then the CPU. ``dtype="auto"`` picks
fp16 on CUDA, bf16 on CPUs with native bf16 instructions and fp32 elsewhere;
the VAE stays in fp32 where fp16 would overflow (:func:`vae_dtype_for`).
"""

from __future__ import annotations

import platform

import torch

from napari_diffcut.core.errors import DiffCutError


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks cuda, then mps, then cpu; other strings are checked."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffCutError(
            f"device={device!r} was asked for but CUDA is not available here; "
            "use device='auto' or 'cpu'"
        )
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise DiffCutError(f"device={device!r} was asked for but MPS is not available here")
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX; Arm BF16).

    Without those instructions oneDNN emulates bf16 and it is slower than fp32,
    so ``dtype="auto"`` keeps fp32 there (README "Supported checkpoints").
    """
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:  # pragma: no cover - probe unavailable on this build
            pass
    if platform.machine().lower() in ("arm64", "aarch64"):
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # pragma: no cover
            return False
    return False


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """UNet dtype: ``"auto"`` or "float16"/"bfloat16"/"float32" (and fp16/bf16/fp32).

    ``"auto"``: float16 on CUDA; bfloat16 on a CPU with native bf16
    (:func:`cpu_has_native_bf16`: about 1.7x faster UNet and 1.9x faster VAE
    than fp32, attention within 0.3%; benchmarks/bench_cpu_dtype.py); float32
    elsewhere.
    """
    table = {
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
    if dtype == "auto":
        if device.type == "cuda":
            return torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in table:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def vae_dtype_for(dtype: torch.dtype, force_upcast: bool) -> torch.dtype:
    """dtype of the VAE for a UNet running in ``dtype``.

    fp16 overflows in the SD and SDXL VAEs (their configs set
    ``force_upcast=True``), so they run in fp32 then; a VAE whose config says
    ``force_upcast=False`` (the fp16-fixed SDXL VAE, madebyollin/sdxl-vae-fp16-fix,
    swapped into a folder's ``vae/``) runs in fp16. bfloat16 has fp32's exponent
    range and does not overflow, so a bf16 run keeps its VAE in bf16.
    """
    if dtype == torch.bfloat16:
        return torch.bfloat16
    if dtype == torch.float16 and not force_upcast:
        return torch.float16
    return torch.float32
