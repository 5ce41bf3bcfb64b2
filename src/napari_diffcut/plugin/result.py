"""The result part of the DiffCut dock widget: the threshold and what the result is.

The threshold ("auto", or a slider over log10 of it) re-cuts the selected
image's result at once from its stored tree (no model, no eigen solve);
a line below says how many segments and levels the result has. A tiled
result has no common tree: the controls are off and their tooltip says why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from magicgui.widgets import CheckBox, Container, FloatSlider, Label
from napari.utils.notifications import show_error

from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.plugin.features import recut_refusal, result_kind
from napari_diffcut.plugin.form import tight_row, wrap_label
from napari_diffcut.plugin.layers import diffcut_meta
from napari_diffcut.plugin.scripting import find_result, recut_layer

#: Slider range of the NCut threshold; costs live in (0, 1] and real boundaries
#: cost orders of magnitude less than splits through flat regions (method.md 6),
#: hence a slider over log10(threshold), with the threshold itself shown next to it.
THRESHOLD_RANGE = (1e-3, 1.0)
LOG_RANGE = (float(np.log10(THRESHOLD_RANGE[0])), float(np.log10(THRESHOLD_RANGE[1])))
THRESHOLD_TOOLTIP = (
    "NCut threshold (log scale): a split is kept when its cost is below it; lower = fewer, "
    "stronger boundaries"
)
AUTO_TOOLTIP = "automatic threshold (Otsu on log NCut costs)"


def result_summary(seg: Any, main: Any, threshold: float) -> str:
    """One line about a result: segments, levels or planes or tiles, threshold."""
    kind = result_kind(seg)
    if kind == "tiled":
        return (
            f"{seg.n_labels} segments stitched from {len(seg.tiles)} tiles; each tile cut at "
            f"its own threshold (median {seg.threshold:.3g}); no levels"
        )
    if kind == "stack":
        planes = int(np.prod(seg.stack_shape))
        labels = (
            f"{len(main.features)} labels through the stack"
            if seg.consistent
            else "labels per plane (own tree each)"
        )
        where = f"threshold {threshold:.3g} (median)" if np.isfinite(threshold) else "auto"
        return f"{planes} planes, {labels}; {where}"
    return (
        f"{len(main.features)} segments, {seg.hierarchy.n_levels()} level(s); "
        f"threshold {seg.threshold:.3g} (auto {seg.hierarchy.auto_threshold:.3g})"
    )


class ResultPanel(Container):
    """Threshold controls and a summary line for the result of the chosen image.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        Holds the result layers.
    image : callable
        Returns the chosen image layer (or None).
    """

    def __init__(self, viewer: Any, image: Callable[[], Any]) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self._image = image
        self._syncing = False
        self._disposed = False
        self.auto_check = CheckBox(text="auto", value=True, tooltip=AUTO_TOOLTIP)
        self.threshold_slider = FloatSlider(
            min=LOG_RANGE[0],
            max=LOG_RANGE[1],
            step=0.01,
            value=float(np.log10(0.5)),
            readout=False,
            enabled=False,
            tooltip=THRESHOLD_TOOLTIP,
        )
        self.threshold_slider.native.setMinimumWidth(60)
        self.threshold_readout = Label(value="0.5")
        self.result_label = wrap_label(Label(value=""))
        self.extend(
            [
                tight_row(
                    [self.auto_check, self.threshold_slider, self.threshold_readout], "threshold"
                ),
                self.result_label,
            ]
        )
        self.auto_check.changed.connect(self._on_threshold_changed)
        self.threshold_slider.changed.connect(self._on_threshold_changed)

    def dispose(self) -> None:
        """Stop re-cutting (the widget was closed)."""
        self._disposed = True

    def threshold_setting(self) -> float | str:
        """The threshold chosen: "auto" or the slider value."""
        return "auto" if self.auto_check.value else self.threshold_value

    @property
    def threshold_value(self) -> float:
        """The slider's threshold (the slider itself moves over log10 of it)."""
        return float(10.0**self.threshold_slider.value)

    @threshold_value.setter
    def threshold_value(self, value: float) -> None:
        tau = float(np.clip(value, *THRESHOLD_RANGE))
        self.threshold_slider.value = float(np.log10(tau))

    def current(self) -> tuple[Any, Any] | None:
        """(segmentation, main layer) of the chosen image, or None."""
        layer = self._image()
        return None if layer is None else find_result(self._viewer, layer.name)

    def _on_threshold_changed(self, _value: Any = None) -> None:
        self.threshold_readout.value = f"{self.threshold_value:.3g}"
        if self._syncing or self._disposed:
            return
        found = self.current()
        if found is not None and recut_refusal(found[0]):
            self.sync()  # a tiled result: nothing to re-cut
            return
        self.threshold_slider.enabled = not self.auto_check.value
        layer = self._image()
        if layer is None or found is None:
            return
        # A lookup on the built tree(s) (no model, no eigen solve): instant.
        try:
            recut_layer(self._viewer, layer.name, self.threshold_setting())
        except (ValueError, DiffCutError) as exc:
            show_error(f"DiffCut: {exc}")
        self.sync()

    def _set_enabled(self, refusal: str) -> None:
        """Threshold controls on, or off with the reason in their tooltip."""
        self.auto_check.enabled = not refusal
        self.threshold_slider.enabled = not refusal and not self.auto_check.value
        tip = f"threshold fixed: {refusal}" if refusal else THRESHOLD_TOOLTIP
        self.threshold_slider.tooltip = tip
        self.auto_check.tooltip = tip if refusal else AUTO_TOOLTIP

    def sync(self, _value: Any = None) -> None:
        """Show the threshold and size of the chosen image's result."""
        if self._disposed:
            return
        found = self.current()
        if found is None:
            self.result_label.value = ""
            self._set_enabled("")
            return
        seg, main = found
        meta = diffcut_meta(main.metadata) or {}
        setting = (meta.get("settings") or {}).get("threshold", "auto")
        value = float(meta.get("threshold", float("nan")))
        self._syncing = True
        try:
            self.auto_check.value = setting == "auto"
            if np.isfinite(value):
                self.threshold_value = value
                self.threshold_readout.value = f"{value:.3g}"
            self._set_enabled(recut_refusal(seg))
        finally:
            self._syncing = False
        self.result_label.value = result_summary(seg, main, value)


__all__ = ["THRESHOLD_RANGE", "ResultPanel", "result_summary"]
