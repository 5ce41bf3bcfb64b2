"""Synthetic sample images shipped with the package (made in code, seeded, no download).

Two images exercise the two input kinds the plugin and the CLI meet most:

* a **blood smear** (RGB uint8): pale background, red cells with a lighter
  central pallor, and one white cell whose cytoplasm holds a dark, lobed
  nucleus - a two-level hierarchy (cell, then nucleus) the tree should find;
* **fluorescence nuclei** (grey uint16): dim, noisy background and bright
  textured ellipses, to exercise the 16-bit path.

``make_blood_smear`` and ``make_nuclei`` return the image *and* its
ground-truth classes, so tests can check what the images contain.
:data:`SAMPLES` names them for the command line (``segment --sample NAME``);
napari's File > Open Sample wraps the same generators
(:mod:`napari_diffcut.plugin.sample_data`). numpy and scipy only: no napari,
no torch, so the CLI can use them without a display.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

#: Ground-truth classes of :func:`make_blood_smear`.
SMEAR_CLASSES = {
    0: "background",
    1: "red cell",
    2: "white cell cytoplasm",
    3: "nucleus",
}

_BACKGROUND_RGB = (236, 222, 214)
_RED_CELL_RGB = (206, 92, 98)
_PALLOR_RGB = (228, 150, 150)
_CYTOPLASM_RGB = (206, 190, 224)
_NUCLEUS_RGB = (104, 44, 136)


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 64:
        raise ValueError(f"size must be an integer >= 64 (pixels per side), got {size!r}")
    return int(size)


def _disc(
    shape: tuple[int, int],
    cy: float,
    cx: float,
    ry: float,
    rx: float,
    angle: float = 0.0,
) -> NDArray[np.bool_]:
    """Boolean mask of a rotated ellipse."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _place_cells(
    rng: np.random.Generator,
    size: int,
    n: int,
    radius: float,
    keep_out: list[tuple[float, float, float]],
) -> list[tuple[float, float]]:
    """Centres of up to ``n`` non-overlapping discs (rejection sampling, seeded)."""
    centres: list[tuple[float, float]] = []
    for _ in range(n * 60):
        if len(centres) == n:
            break
        cy, cx = rng.uniform(radius, size - radius, 2)
        taken = [(y, x, radius) for y, x in centres] + keep_out
        if all(np.hypot(cy - y, cx - x) > radius + r + 2 for y, x, r in taken):
            centres.append((float(cy), float(cx)))
    return centres


def make_blood_smear(size: int = 256, seed: int = 0) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """A synthetic stained blood smear and its ground-truth classes.

    Parameters
    ----------
    size : int
        Side of the square image in pixels (>= 64).
    seed : int
        Seed of cell positions, shapes and noise.

    Returns
    -------
    image : ndarray of uint8, shape (size, size, 3)
        RGB image.
    classes : ndarray of uint8, shape (size, size)
        0 background, 1 red cell, 2 white-cell cytoplasm, 3 nucleus
        (see :data:`SMEAR_CLASSES`).

    Examples
    --------
    >>> image, classes = make_blood_smear(128, seed=1)
    >>> image.shape, image.dtype.name, sorted(np.unique(classes).tolist())
    ((128, 128, 3), 'uint8', [0, 1, 2, 3])
    """
    size = _check_size(size)
    rng = np.random.default_rng(seed)
    shape = (size, size)
    classes = np.zeros(shape, np.uint8)
    rgb = np.empty((*shape, 3), np.float32)
    rgb[:] = _BACKGROUND_RGB
    # One white cell, larger than the red cells, away from the border.
    wr = 0.11 * size
    wy, wx = rng.uniform(0.3 * size, 0.7 * size, 2)
    white = _disc(shape, wy, wx, wr, wr)
    # Lobed nucleus: three overlapping ellipses around the white cell's centre.
    nucleus = np.zeros(shape, bool)
    for k in range(3):
        a = 2 * np.pi * k / 3 + rng.uniform(0, 0.5)
        nucleus |= _disc(
            shape,
            wy + 0.3 * wr * np.sin(a),
            wx + 0.3 * wr * np.cos(a),
            0.38 * wr,
            0.3 * wr,
            a,
        )
    nucleus &= white
    # Red cells: discs with a lighter central pallor (biconcave shape).
    rr = 0.055 * size
    n_red = max(6, size * size // 2600)
    for cy, cx in _place_cells(rng, size, n_red, rr, [(wy, wx, wr)]):
        ry, rx = rr * rng.uniform(0.9, 1.1, 2)
        cell = _disc(shape, cy, cx, ry, rx, rng.uniform(0, np.pi))
        pallor = _disc(shape, cy, cx, 0.45 * ry, 0.45 * rx)
        rgb[cell] = _RED_CELL_RGB
        rgb[pallor & cell] = _PALLOR_RGB
        classes[cell] = 1
    rgb[white] = _CYTOPLASM_RGB
    rgb[nucleus] = _NUCLEUS_RGB
    classes[white] = 2
    classes[nucleus] = 3
    # Optics (blur) and sensor noise.
    rgb = ndimage.gaussian_filter(rgb, sigma=(1.2, 1.2, 0))
    rgb += rng.normal(0, 4.0, rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), classes


def make_nuclei(size: int = 256, seed: int = 0) -> tuple[NDArray[np.uint16], NDArray[np.uint16]]:
    """A synthetic 16-bit fluorescence image of nuclei and its ground-truth instances.

    Parameters
    ----------
    size : int
        Side of the square image in pixels (>= 64).
    seed : int
        Seed of nucleus positions, shapes, brightness and noise.

    Returns
    -------
    image : ndarray of uint16, shape (size, size)
        Dim background (~300 counts) with bright nuclei (1500-4000 counts),
        blurred, with Poisson and read noise.
    instances : ndarray of uint16, shape (size, size)
        0 background, 1..n one id per nucleus.

    Examples
    --------
    >>> image, instances = make_nuclei(128, seed=1)
    >>> image.dtype.name, int(instances.max()) >= 3
    ('uint16', True)
    """
    size = _check_size(size)
    rng = np.random.default_rng(seed)
    shape = (size, size)
    instances = np.zeros(shape, np.uint16)
    signal = np.full(shape, 300.0, np.float32)
    radius = 0.06 * size
    n = max(5, size * size // 2200)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), 2.0)
    texture /= float(np.abs(texture).max()) or 1.0
    for i, (cy, cx) in enumerate(_place_cells(rng, size, n, radius, []), start=1):
        ry, rx = radius * rng.uniform(0.7, 1.1, 2)
        mask = _disc(shape, cy, cx, ry, rx, rng.uniform(0, np.pi))
        brightness = rng.uniform(1500, 4000)
        signal[mask] = brightness * (1.0 + 0.25 * texture[mask])
        instances[mask] = i
    signal = ndimage.gaussian_filter(signal, 1.5)
    noisy = rng.poisson(signal).astype(np.float32) + rng.normal(0, 20, shape)
    return np.clip(np.rint(noisy), 0, 65535).astype(np.uint16), instances


#: Sample names of the command line (``segment --sample NAME``): the napari sample keys
#: (napari.yaml: blood_smear, nuclei) spelled with a hyphen, as options are.
SAMPLES: dict[str, Callable[..., tuple[NDArray[Any], NDArray[Any]]]] = {
    "blood-smear": make_blood_smear,
    "nuclei": make_nuclei,
}


def sample_image(name: str, size: int = 256, seed: int = 0) -> NDArray[Any]:
    """The sample image ``name`` (a key of :data:`SAMPLES`) at its default size and seed.

    Parameters
    ----------
    name : str
        "blood-smear" (RGB uint8) or "nuclei" (grey uint16).
    size, seed : int
        Passed to the generator (the napari samples use the defaults).

    Returns
    -------
    ndarray
        The image; the ground truth is dropped.

    Raises
    ------
    ValueError
        ``name`` is not a sample.

    Examples
    --------
    >>> sample_image("nuclei", 64).dtype.name
    'uint16'
    """
    if name not in SAMPLES:
        raise ValueError(f"sample must be one of {sorted(SAMPLES)}, got {name!r}")
    return SAMPLES[name](size, seed)[0]
