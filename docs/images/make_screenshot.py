"""Regenerate docs/images/napari-diffcut-widget.png: the widget docked next to a real result.

Run under a virtual display, from the repository root::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/images/make_screenshot.py

It opens the synthetic blood smear sample, docks the widget through the
plugin manager, runs it with the weight-free ``pixels`` backbone (no model
download; the diffusion backbone needs Stable Diffusion weights) and saves a
screenshot of the whole window, downscaled to stay small.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).with_name("napari-diffcut-widget.png")
WIDTH = 1280
MAX_BYTES = 300_000


def main() -> int:
    import napari

    # The PyQt5 deprecation notice would show as a toast over the canvas.
    import napari._qt.qt_main_window as qt_main_window
    from qtpy.QtWidgets import QApplication

    qt_main_window.SHOW_QT_WARNING = False
    viewer = napari.Viewer(show=True, title="napari-diffcut")
    viewer.window.resize(1600, 1000)
    _, widget = viewer.window.add_plugin_dock_widget("napari-diffcut", "DiffCut")
    viewer.open_sample("napari-diffcut", "blood_smear")
    widget.backbone_combo.value = "pixels"
    widget.run_button.clicked()
    app = QApplication.instance()
    start = time.monotonic()
    while widget.running and time.monotonic() - start < 300:
        app.processEvents()
        time.sleep(0.02)
    if widget.running:
        print("the run did not finish", file=sys.stderr)
        return 1
    main_layer = viewer.layers["synthetic blood smear diffcut"]
    main_layer.opacity = 0.55
    viewer.layers.selection.active = main_layer
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    shot = viewer.screenshot(canvas_only=False, flash=False)[..., :3]
    shot = _downscale(shot, shot.shape[1] / min(WIDTH, shot.shape[1]))
    # A 256-colour palette keeps the flat UI sharp and the file small.
    Image.fromarray(shot).quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
        OUT, optimize=True
    )
    print(f"{OUT}: {shot.shape[1]}x{shot.shape[0]}, {OUT.stat().st_size} bytes")
    viewer.close()
    return 0 if OUT.stat().st_size < MAX_BYTES else 2


def _downscale(image: np.ndarray, factor: float) -> np.ndarray:
    """Area-average downscale by ``factor`` (>= 1) for a readable, small PNG."""
    if factor <= 1.0:
        return image
    from napari_diffcut.core.image import resize

    h, w = image.shape[:2]
    size = (round(h / factor), round(w / factor))
    out = resize(image.astype(np.float32), size)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


if __name__ == "__main__":
    sys.exit(main())
