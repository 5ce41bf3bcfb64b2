"""napari samples (File > Open Sample): the package's synthetic images as layer data.

The images are made in code, seeded, with no download, by
:mod:`napari_diffcut.files.samples` (napari-free, shared with the command
line's ``segment --sample NAME``); this module only wraps them for napari and
re-exports the generators for existing callers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_diffcut.files.samples import SMEAR_CLASSES, make_blood_smear, make_nuclei

__all__ = ["SMEAR_CLASSES", "blood_smear", "fluorescence_nuclei", "make_blood_smear", "make_nuclei"]


def blood_smear() -> list[tuple[Any, dict[str, Any], str]]:
    """napari sample: synthetic blood smear (RGB) as a layer-data list.

    Examples
    --------
    >>> [(image, kwargs, kind)] = blood_smear()
    >>> image.shape, kwargs["rgb"], kind
    ((256, 256, 3), True, 'image')
    """
    image, _ = make_blood_smear()
    return [(image, {"name": "synthetic blood smear", "rgb": True}, "image")]


def fluorescence_nuclei() -> list[tuple[Any, dict[str, Any], str]]:
    """napari sample: synthetic 16-bit fluorescence nuclei as a layer-data list.

    Examples
    --------
    >>> [(image, kwargs, kind)] = fluorescence_nuclei()
    >>> image.dtype.name, kwargs["colormap"], kind
    ('uint16', 'gray', 'image')
    """
    image, _ = make_nuclei()
    low, high = np.percentile(image, (1.0, 99.8))
    return [
        (
            image,
            {
                "name": "synthetic nuclei",
                "colormap": "gray",
                "contrast_limits": (float(low), float(high)),
            },
            "image",
        )
    ]
