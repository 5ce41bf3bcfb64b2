"""An SDXL-class tiny model run from the DiffCut dock widget (headless, like tests/plugin)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("torch")


def test_sdxl_class_segments_through_the_widget(
    make_napari_viewer_proxy: Any, qtbot: Any, tiny_sdxl_model: Path, two_tone_image: np.ndarray
) -> None:
    from napari_diffcut.plugin.layers import LAYER_KEY

    viewer = make_napari_viewer_proxy()
    _, widget = viewer.window.add_plugin_dock_widget("napari-diffcut", "DiffCut")
    viewer.add_image(two_tone_image, name="two tone", rgb=True)
    widget.model_edit.value = str(tiny_sdxl_model)
    widget.min_size_spin.value = 2
    widget.run_button.clicked()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    main = viewer.layers["two tone diffcut"]
    seg = main.metadata[LAYER_KEY]["segmentation"]
    assert main.data.shape == two_tone_image.shape[:2]
    assert len(seg.settings["attention_grids"]) == 2
