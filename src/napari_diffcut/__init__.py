"""napari-diffcut: zero-shot segmentation by diffusing, walking and cutting.

Ivanova et al., "Unsupervised Segmentation by Diffusing, Walking and Cutting"
(arXiv 2412.04678, WACV 2026). Public names are imported lazily, so that
``import napari_diffcut`` stays fast and pulls in neither torch nor napari.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from napari_diffcut.core.version import __version__

_LAZY = {
    "segment": "napari_diffcut.large.dispatch",
    "iter_segment": "napari_diffcut.large.dispatch",
    "Segmentation": "napari_diffcut.pipeline.segmentation",
    "Settings": "napari_diffcut.pipeline.settings",
    "Progress": "napari_diffcut.pipeline.settings",
    "DiffCutEngine": "napari_diffcut.large.dispatch",
    "ncut_hierarchy": "napari_diffcut.core.hierarchy",
    "Hierarchy": "napari_diffcut.core.hierarchy",
    "Node": "napari_diffcut.core.hierarchy",
    "DiffCutError": "napari_diffcut.core.errors",
    "load": "napari_diffcut.results.store",
    "StackSegmentation": "napari_diffcut.large.stacks",
    "TiledSegmentation": "napari_diffcut.large.tiling",
    "run_batch": "napari_diffcut.batch.runner",
    "segment_layer": "napari_diffcut.plugin.scripting",
    "count_instances": "napari_diffcut.core.instances",
    "Instances": "napari_diffcut.core.instances",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    # ruff: noqa: F401 - re-exported lazily through __getattr__
    from napari_diffcut.core.errors import DiffCutError
    from napari_diffcut.core.hierarchy import Hierarchy, Node, ncut_hierarchy
    from napari_diffcut.core.instances import Instances, count_instances
    from napari_diffcut.large.dispatch import DiffCutEngine, iter_segment, segment
    from napari_diffcut.pipeline.segmentation import Segmentation
    from napari_diffcut.pipeline.settings import Progress, Settings


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'napari_diffcut' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
