"""Images in, images out: RGB conversion, normalisation, working size, resizing.

Pure numpy. The model sees an RGB float image in [0, 1] at a working size that
follows the checkpoint's native resolution and keeps the aspect ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.walk import interpolation_matrix

Normalize = tuple[float, float] | None


def _percentile_scale(
    image: NDArray[np.floating], normalize: Normalize
) -> NDArray[np.float32]:
    """Map [p_lo, p_hi] percentiles (or min/max when ``normalize`` is None) to [0, 1]."""
    data = image.astype(np.float32, copy=False)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros(data.shape, np.float32)
    if normalize is None:
        lo, hi = float(finite.min()), float(finite.max())
    else:
        lo, hi = (float(v) for v in np.percentile(finite, normalize))
    if hi <= lo:
        hi = lo + 1.0
    out = (data - lo) / (hi - lo)
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0).astype(np.float32)


def check_normalize(normalize: object) -> Normalize:
    """Validate ``normalize``: None or a (low, high) percentile pair with 0 <= low < high <= 100."""
    if normalize is None:
        return None
    try:
        lo, hi = (float(v) for v in normalize)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(
            f"normalize must be None or (low, high) percentiles with 0 <= low < high "
            f"<= 100, got {normalize!r}"
        )
    return (lo, hi)


def to_rgb(
    image: NDArray[np.generic],
    *,
    channels: Sequence[int] | None = None,
    normalize: Normalize = (1.0, 99.8),
    contrast_limits: tuple[float, float] | None = None,
) -> NDArray[np.float32]:
    """Turn a 2-D grey, RGB(A) or multichannel (Y, X[, C]) image into RGB in [0, 1].

    Parameters
    ----------
    image : ndarray, shape (Y, X) or (Y, X, C)
        Channels last. RGBA drops alpha. More than 3 channels: ``channels``
        picks up to 3 (default: the first 3). One channel becomes grey RGB;
        two channels fill red and green.
    channels : sequence of int, optional
        Channel indices mapped to R, G, B.
    normalize : (low, high) percentiles or None
        Applied per channel to non-uint8 data (8/12/16-bit, float). uint8 data
        is already in display range and is divided by 255. None: min-max.
    contrast_limits : (low, high), optional
        When given (napari's layer contrast limits), used instead of the
        percentiles: what the user sees is what the model sees.

    Returns
    -------
    ndarray of float32, shape (Y, X, 3)
    """
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.number)) or np.iscomplexobj(arr):
        raise ValueError(f"image must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(
            f"image must be 2-D (Y, X) or (Y, X, C) with channels last, got shape {arr.shape}"
        )
    n_ch = arr.shape[-1]
    if channels is not None:
        chans = [int(c) for c in channels]
        if not 1 <= len(chans) <= 3 or any(not -n_ch <= c < n_ch for c in chans):
            raise ValueError(
                f"channels must list 1 to 3 indices in [0, {n_ch - 1}], got {list(channels)}"
            )
        arr = arr[..., chans]
    elif n_ch == 4:
        arr = arr[..., :3]  # RGBA: drop alpha
    elif n_ch > 3:
        arr = arr[..., :3]
    normalize = check_normalize(normalize)
    if contrast_limits is not None:
        lo, hi = float(contrast_limits[0]), float(contrast_limits[1])
        if hi <= lo:
            hi = lo + 1.0
        out = np.clip((arr.astype(np.float32) - lo) / (hi - lo), 0, 1)
    elif arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    else:
        out = np.stack(
            [_percentile_scale(arr[..., c], normalize) for c in range(arr.shape[-1])], -1
        )
    out = out.astype(np.float32, copy=False)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    elif out.shape[-1] == 2:
        out = np.concatenate([out, np.zeros_like(out[..., :1])], axis=-1)
    return out


def latent_grid(
    image_shape: tuple[int, int], native_latent: int, multiple: int = 8
) -> tuple[int, int]:
    """Latent grid (h, w) for an image: same area as ``native_latent**2``, same aspect.

    Each side is rounded to a multiple of ``multiple`` (at least ``multiple``),
    so the UNet's downsamplings divide it exactly.

    Examples
    --------
    >>> latent_grid((512, 512), 64)
    (64, 64)
    >>> latent_grid((480, 640), 64)
    (56, 72)
    """
    h, w = image_shape
    if h < 1 or w < 1:
        raise ValueError(f"image must have a positive size, got {image_shape}")
    scale = math.sqrt(native_latent * native_latent / (h * w))

    def rnd(v: float) -> int:
        return max(multiple, int(round(v / multiple)) * multiple)

    return rnd(h * scale), rnd(w * scale)


def resize(image: NDArray[np.floating], shape: tuple[int, int]) -> NDArray[np.float32]:
    """Resize (Y, X[, C]) float images by area averaging (down) or bilinear (up).

    Downscaling first averages integer blocks (anti-aliasing), then finishes
    with the separable bilinear operator of :func:`interpolation_matrix`.
    """
    img = np.asarray(image, np.float32)
    squeeze = img.ndim == 2
    if squeeze:
        img = img[..., None]
    fy = max(1, img.shape[0] // shape[0])
    fx = max(1, img.shape[1] // shape[1])
    if fy > 1 or fx > 1:
        hh, ww = (img.shape[0] // fy) * fy, (img.shape[1] // fx) * fx
        img = img[:hh, :ww].reshape(hh // fy, fy, ww // fx, fx, -1).mean(axis=(1, 3))
    ry = interpolation_matrix(shape[0], img.shape[0])
    rx = interpolation_matrix(shape[1], img.shape[1])
    out = np.einsum("Yy,yxc->Yxc", ry, img, optimize=True)
    out = np.einsum("Yxc,Xx->YXc", out, rx, optimize=True)
    return out[..., 0] if squeeze else out
