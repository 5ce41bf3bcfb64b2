"""The per-plane result (pipeline/segmentation.py): instances, and lazy labels."""

from __future__ import annotations

import numpy as np
import pytest

import napari_diffcut
from napari_diffcut.files.samples import make_nuclei


def test_instances_of_the_nuclei_sample_count_its_nuclei() -> None:
    image, truth = make_nuclei()
    seg = napari_diffcut.segment(image, backbone="pixels")
    found = seg.instances()
    n_true = int(truth.max())
    assert abs(found.count - n_true) <= 0.2 * n_true
    assert found.labels.shape == seg.shape and found.background is not None
    # The background segment is never an instance; every instance is of another segment.
    assert (found.labels[seg.labels == found.background] == 0).all()
    assert all(row["segment"] != found.background for row in found.table)
    # Another cut, another count: a lookup of the tree, then connected components.
    coarse = seg.instances(threshold=1e-6)
    assert coarse.count <= found.count
    assert seg.instances(min_size=10**6).count == 0


def test_lazy_labels_refuse_instances_and_say_what_works() -> None:
    from napari_diffcut.pipeline.segmentation import LazySegmentation

    image = np.zeros((600, 600), np.uint8)
    image[100:300, 100:300] = 200
    seg = napari_diffcut.segment(
        image, backbone="pixels", working_size=128, min_size=4, max_depth=3, memory_budget=1
    )
    assert isinstance(seg, LazySegmentation)
    assert seg.settings["refined"] is False  # lazy labels keep the soft-upsampled edges
    with pytest.raises(ValueError, match="raise memory_budget"):
        seg.instances()
