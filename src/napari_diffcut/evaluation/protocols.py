"""The peers' evaluation protocols: crops, resolutions and how labels are scored.

DiffSeg and DiffCut evaluate at fixed sizes with fixed crops (method.md 9.1);
a :class:`Protocol` names one such setting and :func:`prepare` applies it to an
image and its ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.errors import DiffCutError


@dataclass(frozen=True)
class Protocol:
    """Crop and resolutions of an evaluation.

    Attributes
    ----------
    name : str
        "diffseg", "diffcut" or "native".
    crop : {"diffseg", "diffcut", "none"}
        Centre crop to a square: DiffSeg keeps ``min(H, W)`` pixels with the
        offset rounded down; DiffCut (torchvision ``CenterCrop``) keeps
        ``min(H, W) - 1`` with the offset rounded half to even. "none": no crop.
    input_size : int or None
        Side of the square image given to the segmenter (bilinear, no
        antialiasing, like ``tf.image.resize`` and torchvision on tensors); None
        keeps the (cropped) image size.
    score_size : int or None
        Side at which predictions and labels are compared. None: input size.
    """

    name: str
    crop: str = "none"
    input_size: int | None = None
    score_size: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "name": self.name,
            "crop": self.crop,
            "input_size": self.input_size,
            "score_size": self.score_size,
        }


#: DiffSeg: 512 input, scored at 512. DiffCut: 1024 input, scored at 128 (method.md 9.1).
PROTOCOLS = {
    "diffseg": Protocol("diffseg", "diffseg", 512, 512),
    "diffcut": Protocol("diffcut", "diffcut", 1024, 128),
    "native": Protocol("native", "none", None, None),
}


def make_protocol(
    name: str, input_size: int | None = None, score_size: int | None = None
) -> Protocol:
    """A preset from :data:`PROTOCOLS`, optionally with other sizes.

    Without ``score_size`` the preset's rule stays: DiffSeg scores at its input
    size, DiffCut always at 128 (its masks are 128 x 128 whatever ``--img_size``).

    Examples
    --------
    >>> make_protocol("diffseg", input_size=256).score_size
    256
    >>> make_protocol("diffcut", input_size=512).score_size
    128
    """
    if name not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, got {name!r}")
    base = PROTOCOLS[name]
    for label, value in (("input_size", input_size), ("score_size", score_size)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 8
        ):
            raise ValueError(f"{label} must be an integer >= 8, got {value!r}")
    if input_size is None and score_size is None:
        return base
    if base.crop == "none" and (input_size or score_size):
        raise ValueError(
            "input_size/score_size need a square crop; use protocol 'diffseg' or 'diffcut' "
            f"(got protocol {name!r})"
        )
    new_input = input_size or base.input_size
    tied = base.score_size == base.input_size
    return Protocol(
        name, base.crop, new_input, score_size or (new_input if tied else base.score_size)
    )


def crop_box(shape: tuple[int, int], crop: str) -> tuple[int, int, int]:
    """(top, left, side) of the peers' centre crop for an image of ``shape``.

    Examples
    --------
    >>> crop_box((480, 640), "diffseg")
    (0, 80, 480)
    >>> crop_box((480, 640), "diffcut")
    (0, 80, 479)
    """
    h, w = int(shape[0]), int(shape[1])
    if crop == "diffseg":
        c = min(h, w)
        return (h - c) // 2, (w - c) // 2, c
    if crop == "diffcut":
        # torchvision CenterCrop: int(round((H - c) / 2)), Python rounds half to even.
        c = min(h, w) - 1
        return int(round((h - c) / 2.0)), int(round((w - c) / 2.0)), c
    raise ValueError(f"crop must be 'diffseg' or 'diffcut', got {crop!r}")


def resize_nearest(labels: NDArray[Any], size: int, mode: str = "exact") -> NDArray[Any]:
    """Nearest-neighbour resize of a square (or any) label map to ``size x size``.

    ``mode="exact"``: source index ``floor((i + 0.5) * in / out)`` (torchvision
    NEAREST_EXACT, ``tf.image.resize`` NEAREST_NEIGHBOR). ``mode="floor"``:
    ``floor(i * in / out)`` (``torch.nn.functional.interpolate`` "nearest",
    DiffCut's 1024 -> 128 step).
    """
    arr = np.asarray(labels)

    def index(n_in: int) -> NDArray[np.intp]:
        i = np.arange(size, dtype=np.float64)
        offset = 0.5 if mode == "exact" else 0.0
        return np.minimum(np.floor((i + offset) * (n_in / size)).astype(np.intp), n_in - 1)

    if mode not in ("exact", "floor"):
        raise ValueError(f"mode must be 'exact' or 'floor', got {mode!r}")
    return arr[index(arr.shape[0])][:, index(arr.shape[1])]


def resize_bilinear(image: NDArray[Any], size: int) -> NDArray[Any]:
    """Bilinear resize to ``size x size`` with half-pixel centres and no antialiasing.

    Integer images come back in their dtype (rounded, clipped), so a uint8
    image stays uint8 and the segmenter sees it as it would the original.
    """
    arr = np.asarray(image)
    src = arr.astype(np.float32)

    def taps(
        n_in: int,
    ) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.float32]]:
        x = (np.arange(size, dtype=np.float64) + 0.5) * (n_in / size) - 0.5
        x = np.clip(x, 0, n_in - 1)
        lo = np.floor(x).astype(np.intp)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (x - lo).astype(np.float32)

    y0, y1, wy = taps(arr.shape[0])
    x0, x1, wx = taps(arr.shape[1])
    wy = wy.reshape((-1, 1) + (1,) * (arr.ndim - 2))
    wx = wx.reshape((1, -1) + (1,) * (arr.ndim - 2))
    rows = src[y0] * (1 - wy) + src[y1] * wy
    out = rows[:, x0] * (1 - wx) + rows[:, x1] * wx
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(arr.dtype)
    return out.astype(arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float32)


def prepare(
    image: NDArray[Any], truth: NDArray[Any], protocol: Protocol
) -> tuple[NDArray[Any], NDArray[Any]]:
    """Image for the segmenter and labels at score size, as the peers prepare them.

    Labels are resized like DiffCut's: nearest-exact to the input size, then
    (when the score size differs) nearest-floor to the score size.
    """
    if np.shape(image)[:2] != np.shape(truth)[:2]:
        raise DiffCutError(
            f"image and mask sizes differ: {np.shape(image)[:2]} vs {np.shape(truth)[:2]}"
        )
    if protocol.crop == "none":
        return image, truth
    top, left, c = crop_box(np.shape(image)[:2], protocol.crop)
    image = np.asarray(image)[top : top + c, left : left + c]
    truth = np.asarray(truth)[top : top + c, left : left + c]
    size = protocol.input_size or c
    if size != c:
        image = resize_bilinear(image, size)
        truth = resize_nearest(truth, size, "exact")
    return image, score_labels(truth, protocol)


def score_labels(labels: NDArray[Any], protocol: Protocol) -> NDArray[Any]:
    """Labels (prediction or truth) at input size -> score size (nearest, floor)."""
    arr = np.asarray(labels)
    if protocol.score_size is None or arr.shape[0] == protocol.score_size == arr.shape[1]:
        return arr
    return resize_nearest(arr, protocol.score_size, "floor")


def protocol_summary(p: Protocol) -> str:
    """One line for the printed table."""
    if p.crop == "none":
        return f"{p.name} (no crop, native size)"
    return (
        f"{p.name} (centre crop, input {p.input_size or 'crop'} px, "
        f"scored at {p.score_size or p.input_size or 'crop'} px)"
    )
