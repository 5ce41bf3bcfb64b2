"""Evaluation harness: the peers' benchmarks, metrics and a resumable runner.

- :mod:`~napari_diffcut.evaluation.metrics`: confusion histogram, Hungarian
  matching, TP/FP/FN, IoU, mIoU, pixel accuracy (method.md 9.2); foreground
  IoU and object F1 for instance masks.
- :mod:`~napari_diffcut.evaluation.datasets`: COCO-Stuff-27, Cityscapes and
  image/mask folders on disk; the DiffSeg and DiffCut crops and resolutions.
- :mod:`~napari_diffcut.evaluation.runner`: :func:`evaluate` any segmenter
  (a callable image -> labels), with per-image JSONL records for resuming.

The command line is ``napari-diffcut evaluate`` (:mod:`napari_diffcut.evaluation.command`).
"""

from __future__ import annotations

from napari_diffcut.evaluation.datasets import Dataset, cityscapes, coco_stuff_27, folder
from napari_diffcut.evaluation.metrics import (
    confusion_histogram,
    hungarian_counts,
    image_scores,
    instance_counts,
    scores,
)
from napari_diffcut.evaluation.protocols import PROTOCOLS, Protocol, make_protocol
from napari_diffcut.evaluation.runner import evaluate, iter_evaluate

__all__ = [
    "PROTOCOLS",
    "Dataset",
    "Protocol",
    "cityscapes",
    "coco_stuff_27",
    "confusion_histogram",
    "evaluate",
    "folder",
    "hungarian_counts",
    "image_scores",
    "instance_counts",
    "iter_evaluate",
    "make_protocol",
    "scores",
]
