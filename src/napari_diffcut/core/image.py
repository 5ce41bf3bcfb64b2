"""Images in, images out: RGB conversion, normalisation, working size, resizing.

Pure numpy. The model sees an RGB float image in [0, 1] at a working size that
follows the checkpoint's native resolution and keeps the aspect ratio.

Intensity window (``normalize``, issue 11 part 4). 12/16-bit, float and *dim*
8-bit data get the ``normalize`` window per channel (default
:data:`DEFAULT_PERCENTILES`, the 1st-99.8th percentiles; None: min-max);
bright 8-bit data is divided by 255 (RGB photographs, stained slides,
well-exposed fluorescence are already in display range). A uint8 image is dim
when the high percentile of all its picked channels together is below
:data:`DIM_UINT8_LEVEL` (half of 255): a fluorescence image that uses a tenth
of the range is then stretched exactly like a 16-bit one.
:func:`intensity_rule` names the rule an image got, for the run record.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.walk import interpolation_matrix

Normalize = tuple[float, float] | None
#: Default ``normalize``: the (low, high) percentile window.
DEFAULT_PERCENTILES = (1.0, 99.8)
#: A uint8 image whose high percentile (all picked channels) is below this is
#: dim and gets the ``normalize`` window like 16-bit data. Half the range: bright
#: 8-bit images (photographs, H&E, well-exposed fluorescence) reach well
#: above it; the dim DSB 2018 fluorescence images reach 56-125 of 255.
DIM_UINT8_LEVEL = 128.0
#: Names of the rules :func:`intensity_rule` reports.
RULE_UINT8, RULE_PERCENTILES, RULE_MINMAX = "uint8", "percentiles", "minmax"
#: A last axis up to this size is read as channels when ``channel_axis`` is not
#: given: grey+alpha, RGB, RGBA or up to 4 fluorescence channels (napari reads
#: a last axis of 3 or 4 as RGB(A) the same way); nobody images planes that narrow.
MAX_IMPLICIT_CHANNELS = 4
#: A last axis between MAX_IMPLICIT_CHANNELS and this size could be channels or
#: a narrow image; such arrays must say which (``channel_axis`` or ``channels``).
AMBIGUOUS_LAST_AXIS = 16
#: ``channel_axis`` value meaning "this array has no channel axis".
NO_CHANNEL_AXIS = "none"


def _percentile_scale(
    image: NDArray[np.floating], normalize: tuple[float, float] | None
) -> NDArray[np.float32]:
    """Map [p_lo, p_hi] percentiles (min/max when ``normalize`` is None) to [0, 1]."""
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
    """Check ``normalize``: None or percentiles (low, high), 0 <= low < high <= 100."""
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


def is_dim_uint8(
    image: NDArray[np.generic], percentile: float = DEFAULT_PERCENTILES[1]
) -> bool:
    """Whether a uint8 image is dim: its ``percentile`` (all channels) < DIM_UINT8_LEVEL.

    ``image`` holds the picked channels only (alpha dropped). Any other dtype
    is not "dim uint8". Large images may pass a strided sample.

    Examples
    --------
    >>> dim = np.full((8, 8), 20, np.uint8); dim[2:4, 2:4] = 60
    >>> is_dim_uint8(dim), is_dim_uint8(dim * 4), is_dim_uint8(dim.astype(np.uint16))
    (True, False, False)
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.size == 0:
        return False
    return bool(np.percentile(arr, percentile) < DIM_UINT8_LEVEL)


def intensity_rule(
    image: NDArray[np.generic], normalize: Normalize = DEFAULT_PERCENTILES
) -> str:
    """The rule that maps ``image`` (picked channels) to [0, 1]: for the run record.

    ``"uint8"`` (bool or bright uint8, divided by 255), else ``"percentiles"``
    (``normalize`` a pair) or ``"minmax"`` (``normalize`` None); dim uint8
    gets the latter two like any 16-bit image (module docstring).

    Examples
    --------
    >>> bright = np.arange(256, dtype=np.uint8).reshape(16, 16)
    >>> intensity_rule(bright), intensity_rule(bright // 10), intensity_rule(bright // 10, None)
    ('uint8', 'percentiles', 'minmax')
    """
    normalize = check_normalize(normalize)
    arr = np.asarray(image)
    if arr.dtype == bool or (arr.dtype == np.uint8 and not is_dim_uint8(arr)):
        return RULE_UINT8
    return RULE_MINMAX if normalize is None else RULE_PERCENTILES


def resolve_channel_axis(
    shape: Sequence[int],
    channel_axis: int | str | None = None,
    channels: Sequence[int] | None = None,
) -> int | None:
    """Which axis of an array of ``shape`` holds channels (None: no channel axis).

    Rules, in order:

    1. ``channel_axis`` given: an int names the axis (negative counts from the
       end); ``"none"`` says there is no channel axis.
    2. A 2-D array has no channel axis.
    3. A last axis of at most 4 is channels (grey+alpha, RGB, RGBA, 4 channels).
    4. ``channels`` given: the last axis is channels (the 2-D (Y, X, C) convention).
    5. A last axis of 5 to 16 is ambiguous (channels, or a very narrow image):
       ``ValueError`` asking for ``channel_axis`` or ``channels``.
    6. Otherwise there is no channel axis: every axis before (Y, X) is a stack axis.

    A channels-first array such as (3, Y, X) is therefore a stack of 3 planes
    unless ``channel_axis=0`` is passed, as napari shows it.

    Examples
    --------
    >>> resolve_channel_axis((512, 512, 3)), resolve_channel_axis((5, 512, 512))
    (2, None)
    >>> resolve_channel_axis((2, 5, 64, 64), channel_axis=1)
    1
    """
    ndim = len(shape)
    if channel_axis is not None:
        if isinstance(channel_axis, str):
            if channel_axis.lower() != NO_CHANNEL_AXIS:
                raise ValueError(
                    "channel_axis must be an int, None (infer) or 'none', "
                    f"got {channel_axis!r}"
                )
            return None
        integer = isinstance(channel_axis, int | np.integer)
        integer = integer and not isinstance(channel_axis, bool)
        if not integer or ndim < 3 or not -ndim <= int(channel_axis) < ndim:
            raise ValueError(
                "channel_axis must be an axis of an image with >= 3 dimensions "
                f"(-{ndim} to {ndim - 1}), got {channel_axis!r} "
                f"for shape {tuple(shape)}"
            )
        return int(channel_axis) % ndim
    if ndim < 3:
        return None
    last = int(shape[-1])
    if last <= MAX_IMPLICIT_CHANNELS or channels is not None:
        return ndim - 1
    if last <= AMBIGUOUS_LAST_AXIS:
        raise ValueError(
            f"image of shape {tuple(shape)} has a last axis of {last}: pass "
            f"channels=[i, j, k] (or channel_axis={ndim - 1}) to read it as channels, "
            "or channel_axis='none' to read every axis before (Y, X) as a stack"
        )
    return None


def pick_channels(n_channels: int, channels: Sequence[int] | None = None) -> list[int]:
    """Indices of the channels mapped to R, G, B (1 to 3 of them).

    Default: all channels when there are at most 3, else the first 3 (RGBA
    drops alpha; more channels: the first three).
    """
    if channels is None:
        return list(range(min(n_channels, 3)))
    chans = [int(c) for c in channels]
    n = n_channels
    if not 1 <= len(chans) <= 3 or any(not -n <= c < n for c in chans):
        raise ValueError(
            f"channels must list 1 to 3 indices in [0, {n_channels - 1}], "
            f"got {list(channels)}"
        )
    return [c % n_channels for c in chans]


def channel_limits(
    sample: NDArray[np.generic], normalize: Normalize = DEFAULT_PERCENTILES
) -> NDArray[np.float64]:
    """Per-channel (low, high) display limits from a (sub)sample of an image.

    ``sample`` is (y, x) or (y, x, C) with the channels already picked. The
    rule is :func:`intensity_rule`'s: bright uint8 data keeps (0, 255); other
    data, dim uint8 included, uses the ``normalize`` percentiles of each
    channel's finite values (None: min and max). The limits of one sample are
    then applied to every tile of a large image, so that tiles share one
    intensity mapping.

    Returns
    -------
    ndarray of float64, shape (C, 2)
    """
    arr = np.asarray(sample)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = arr[..., None]
    normalize = check_normalize(normalize)
    window = intensity_rule(arr, normalize)
    out = np.empty((arr.shape[-1], 2), np.float64)
    for c in range(arr.shape[-1]):
        if window == RULE_UINT8:
            out[c] = (0.0, 255.0)
            continue
        data = arr[..., c].astype(np.float32, copy=False)
        finite = data[np.isfinite(data)]
        if finite.size == 0:
            out[c] = (0.0, 1.0)
        elif normalize is None:
            out[c] = (float(finite.min()), float(finite.max()))
        else:
            out[c] = [float(v) for v in np.percentile(finite, normalize)]
    return out


def _as_limits(contrast_limits: object, n_channels: int) -> NDArray[np.float64]:
    """One (low, high) pair for all channels, or one pair per channel -> (C, 2)."""
    lim = np.asarray(contrast_limits, np.float64)
    if lim.shape == (2,):
        lim = np.repeat(lim[None], n_channels, axis=0)
    if lim.shape != (n_channels, 2) or not np.isfinite(lim).all():
        raise ValueError(
            "contrast_limits must be (low, high) or one (low, high) pair per picked "
            f"channel ({n_channels}), got {contrast_limits!r}"
        )
    return lim


def to_rgb(
    image: NDArray[np.generic],
    *,
    channels: Sequence[int] | None = None,
    normalize: Normalize = DEFAULT_PERCENTILES,
    contrast_limits: object = None,
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
        Applied per channel to non-uint8 data (8/12/16-bit, float) and to dim
        uint8 data (module docstring); bright uint8 data is already in display
        range and is divided by 255. None: min-max.
    contrast_limits : (low, high) or sequence of (low, high), optional
        When given (napari's layer contrast limits, or limits shared by all
        tiles of a large image, see :func:`channel_limits`), used instead of
        the percentiles: one pair for all channels or one per picked channel.

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
            "image must be 2-D (Y, X) or (Y, X, C) with channels last, "
            f"got shape {arr.shape}"
        )
    picked = pick_channels(arr.shape[-1], channels)
    if picked != list(range(arr.shape[-1])):
        arr = arr[..., picked]
    normalize = check_normalize(normalize)
    if contrast_limits is not None:
        out = apply_limits(arr, _as_limits(contrast_limits, arr.shape[-1]))
    else:
        if intensity_rule(arr, normalize) == RULE_UINT8:
            out = arr.astype(np.float32) / 255.0
        else:  # 16-bit, float, and dim uint8 (module docstring)
            n = arr.shape[-1]
            out = np.stack([_percentile_scale(arr[..., c], normalize) for c in range(n)], 2)
    return grey_or_rgb(out.astype(np.float32, copy=False))


def apply_limits(
    image: NDArray[np.generic], limits: NDArray[np.float64]
) -> NDArray[np.float32]:
    """Map each channel's (low, high) to [0, 1], clipped; NaN becomes 0.

    ``image`` is (Y, X, C) and ``limits`` (C, 2).
    """
    out = np.empty(image.shape, np.float32)
    for c in range(image.shape[-1]):
        lo, hi = float(limits[c, 0]), float(limits[c, 1])
        if hi <= lo:
            hi = lo + 1.0
        band = (image[..., c].astype(np.float32) - lo) / (hi - lo)
        out[..., c] = np.clip(np.nan_to_num(band, nan=0.0), 0.0, 1.0)
    return out


def grey_or_rgb(image: NDArray[np.float32]) -> NDArray[np.float32]:
    """(Y, X, 1..3) float -> (Y, X, 3): one channel is grey, two fill red and green."""
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 2:
        return np.concatenate([image, np.zeros_like(image[..., :1])], axis=-1)
    return image


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
