"""Saved results: reopen a ``*.diffcut.zarr`` store as a :class:`Segmentation`.

The format itself (layout, writing, validation of foreign stores) is
:mod:`napari_diffcut.files.store`; this module turns what it reads back into
the pipeline's result type.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.files.store import SUFFIX, is_result_store, read_parts, result_path, save
from napari_diffcut.pipeline.segmentation import Segmentation

__all__ = ["SUFFIX", "SavedResult", "is_result_store", "load", "read_result", "result_path", "save"]


@dataclass
class SavedResult:
    """Everything :func:`read_result` found in a store.

    Attributes
    ----------
    segmentation : Segmentation
        The rebuilt result (tree, pixel map, settings, threshold setting).
    labels : ndarray of uint32, shape (H, W)
        The saved labels, user edits (paint, split, merge) included: those of
        the main layer, or of the level named in ``layer``. Equals
        ``segmentation.labels`` when the main labels were saved unedited.
    version : str
        napari-diffcut version that wrote the store.
    layer : dict
        napari placement: "source", "scale", "translate", "units",
        "axis_labels", "plane", "role" ("main" or "level") and "level" of the
        layer saved (each optional).
    """

    segmentation: Segmentation
    labels: NDArray[np.uint32]
    version: str
    layer: dict[str, Any] = field(default_factory=dict)


def read_result(path: str | os.PathLike[str]) -> SavedResult:
    """Reopen a saved result: the segmentation plus the saved (edited) labels.

    Raises
    ------
    DiffCutError
        ``path`` is missing, foreign, damaged or from a newer format.
    """
    parts = read_parts(path)
    seg = Segmentation(parts.hierarchy, parts.pixel_leaf, parts.settings)
    return SavedResult(seg, parts.labels, parts.version, parts.layer)


def load(path: str | os.PathLike[str]) -> Segmentation:
    """Reopen a segmentation saved with :meth:`Segmentation.save` / :func:`save`.

    The tree, pixel map, settings and threshold setting are restored exactly,
    so ``labels``, ``levels``, ``tree`` and ``cut()`` equal the saved result's.
    User edits to the labels are in :func:`read_result` (``.labels``).

    Raises
    ------
    DiffCutError
        ``path`` is missing, foreign, damaged or from a newer format.

    Examples
    --------
    >>> import numpy as np, napari_diffcut  # doctest: +SKIP
    >>> seg = napari_diffcut.segment(img, backbone="pixels")  # doctest: +SKIP
    >>> seg.save("img.diffcut.zarr")  # doctest: +SKIP
    >>> napari_diffcut.load("img.diffcut.zarr").labels  # doctest: +SKIP
    """
    return read_result(path).segmentation
