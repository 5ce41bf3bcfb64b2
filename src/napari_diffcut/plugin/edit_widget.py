"""Hierarchy editor: split, merge, undo and export on a DiffCut result layer.

``HierarchyEditor(viewer)`` is a magicgui ``Container`` that the DiffCut dock
widget embeds. It acts on the active Labels layer when that layer carries
``metadata["napari_diffcut"]["segmentation"]`` (a run of the plugin or a
reopened ``*.diffcut.zarr``):

- **Split** / **Merge** act on the layer's selected label (napari's label
  picker, or "On click: select"); with "On click: split" or "merge", a click
  on a region acts at once. Clicks act only in the layer's pan/zoom mode, so
  painting is never mistaken for an edit, and a drag (pan) does not act.
- The change is written into the layer's data in place and redrawn at once;
  the model never runs.
- **Undo** / **Redo** revert our split and merge edits; pixels painted since
  are kept (:class:`~napari_diffcut.results.editing.EditHistory`). The history lives
  in the layer's metadata, next to the tree, under ``"edit_history"``.
- **Export...** asks for a folder and writes the layer's labels as a uint32
  TIFF plus a per-label CSV table (:func:`napari_diffcut.results.export.export_labels`).

After every edit the layer's ``features`` are recomputed (one row per label).
:meth:`HierarchyEditor.dispose` (called when the DiffCut widget is closed, or
when a standalone editor is un-docked) unhooks it from the viewer and layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, PushButton
from qtpy.QtWidgets import QSizePolicy

if TYPE_CHECKING:  # napari is only needed for the annotation; the viewer is passed in
    import napari

from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.plugin.features import label_features
from napari_diffcut.plugin.layers import LAYER_KEY, diffcut_meta
from napari_diffcut.results.editing import Edit, EditHistory, LabelTree
from napari_diffcut.results.export import export_labels, free_stem

#: What a click on the layer does.
CLICK_ACTIONS = ("off", "select", "split", "merge")
#: A press and release further apart than this (canvas pixels) is a drag, not a click.
CLICK_TOLERANCE_PX = 4.0
_NO_LAYER = "Select a DiffCut result layer to edit it."
#: Why a layer may not be editable (the status line's tooltip: long texts do not widen the dock).
_NO_LAYER_WHY = (
    "A 2-D Labels layer made by DiffCut; whole-stack, tiled and beyond-memory results have "
    "no tree to edit here."
)


def replay_message(undo: bool, description: str) -> str:
    """The status after an undo or redo of the edit ``description``.

    An undo's edit is the inverse edit, described as "undo <edit>": the
    message names the edit itself.

    Examples
    --------
    >>> replay_message(True, "undo merge 29 into 14"), replay_message(False, "split 3")
    ('undid merge 29 into 14', 'redid split 3')
    """
    if undo and description.startswith("undo "):
        description = description[len("undo ") :]
    return f"{'undid' if undo else 'redid'} {description}"


class HierarchyEditor(Container):
    """Split / merge / undo / export along the NCut tree of the active result layer.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose active layer is edited.
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)
        self._viewer = viewer
        self._layer: Any = None
        self._tree_cache: tuple[Any, LabelTree] | None = None
        self._writing = False  # our own ``layer.data = ...`` is not a replacement
        self.status = Label(value=_NO_LAYER, tooltip=_NO_LAYER_WHY)
        self.region = Label(value="")
        for label in (self.status, self.region):
            label.native.setWordWrap(True)  # long messages must not widen the dock
            label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.click_action = ComboBox(
            label="On click",
            choices=CLICK_ACTIONS,
            value="off",
            tooltip="select: pick a region; split / merge: act on the clicked region",
        )
        self.split_button = PushButton(text="Split", tooltip="Replace the region by its children")
        self.merge_button = PushButton(
            text="Merge",
            tooltip="Replace the region and its sibling(s) by their parent",
        )
        self.undo_button = PushButton(text="Undo", tooltip="Undo the last split or merge")
        self.redo_button = PushButton(text="Redo", tooltip="Redo the last undone edit")
        self.export_button = PushButton(
            text="Export...", tooltip="Write the labels as TIFF + a per-label CSV table"
        )
        click_row = Container(widgets=[self.click_action], labels=True)
        edit_row = Container(
            widgets=[self.split_button, self.merge_button],
            layout="horizontal",
            labels=False,
        )
        undo_row = Container(
            widgets=[self.undo_button, self.redo_button, self.export_button],
            layout="horizontal",
            labels=False,
        )
        self.extend([self.status, self.region, click_row, edit_row, undo_row])
        self.split_button.changed.connect(self._on_split)
        self.merge_button.changed.connect(self._on_merge)
        self.undo_button.changed.connect(self._on_undo)
        self.redo_button.changed.connect(self._on_redo)
        self.export_button.changed.connect(self._on_export)
        self.click_action.changed.connect(self._on_click_action)
        self._disposed = False
        for emitter, callback in self._viewer_connections():
            emitter.connect(callback)
        self._on_active_layer()
        self._refresh()
        # A closed editor must not keep acting on clicks. No slot on the Qt
        # ``destroyed`` signal: PyQt crashes when it calls a Python slot while
        # a Python-owned widget is being garbage-collected. The DiffCut widget
        # calls dispose() when it is closed; docked alone, un-docking does.
        self._docked = False
        self.native_parent_changed.connect(self._on_parent_changed)

    def _on_parent_changed(self, parent: Any) -> None:
        if parent is not None:
            self._docked = True
        elif self._docked:  # napari's remove_dock_widget un-parents the widget
            self.dispose()

    def _viewer_connections(self) -> list[tuple[Any, Any]]:
        """(emitter, callback) pairs tying the editor to the viewer."""
        layers = self._viewer.layers
        return [
            (layers.selection.events.active, self._on_active_layer),
            (layers.events.removed, self._on_layer_removed),
        ]

    def dispose(self) -> None:
        """Stop following the viewer and acting on clicks (the widget was closed)."""
        if self._disposed:
            return
        self._disposed = True
        for emitter, callback in self._viewer_connections():
            emitter.disconnect(callback)
        self._detach()
        self._tree_cache = None
        self._refresh()

    # -- the layer we act on -------------------------------------------------------
    @property
    def layer(self) -> Any:
        """The DiffCut Labels layer being edited, or None."""
        return self._layer

    def _on_active_layer(self, event: Any = None) -> None:
        """Follow the viewer's active layer; hook our click callback onto it."""
        layer = _unwrap(self._viewer.layers.selection.active)
        if layer is self._layer or self._disposed:
            return
        self._detach()
        if layer is not None and _segmentation(layer) is not None:
            self._layer = layer
            layer.mouse_drag_callbacks.append(self._on_mouse)
            layer.events.selected_label.connect(self._refresh)
            layer.events.data.connect(self._on_data_replaced)
            self._on_click_action()
        self._refresh()

    def _on_layer_removed(self, event: Any) -> None:
        if _unwrap(getattr(event, "value", None)) is self._layer:
            self._detach()
            self._refresh()

    def _detach(self) -> None:
        layer, self._layer = self._layer, None
        if layer is None:
            return
        if self._on_mouse in layer.mouse_drag_callbacks:
            layer.mouse_drag_callbacks.remove(self._on_mouse)
        layer.events.selected_label.disconnect(self._refresh)
        layer.events.data.disconnect(self._on_data_replaced)

    def _tree(self) -> LabelTree:
        """The tree of the current layer's segmentation (cached per segmentation)."""
        seg = _segmentation(self._layer)
        if seg is None:
            raise DiffCutError(_NO_LAYER)
        if self._tree_cache is None or self._tree_cache[0] is not seg:
            self._tree_cache = (seg, LabelTree.from_segmentation(seg))
        return self._tree_cache[1]

    def history(self, layer: Any = None) -> EditHistory:
        """Edit history of ``layer`` (default: current one), kept in its metadata."""
        info = (_unwrap(layer) or self._layer).metadata[LAYER_KEY]
        if not isinstance(info.get("edit_history"), EditHistory):
            info["edit_history"] = EditHistory()
        return info["edit_history"]

    # -- actions (also the public scripting/test API) -------------------------------
    def split(self, label: int | None = None) -> bool:
        """Split ``label`` (default: the layer's selected label); False when refused."""
        return self._edit("split", label)

    def merge(self, label: int | None = None) -> bool:
        """Merge ``label`` into its parent (default: the selected label)."""
        return self._edit("merge", label)

    def undo(self) -> bool:
        """Undo the last split or merge on the current layer."""
        return self._replay(undo=True)

    def redo(self) -> bool:
        """Redo the last undone edit on the current layer."""
        return self._replay(undo=False)

    def export_to(self, folder: str) -> tuple[Any, Any] | None:
        """Write the layer's labels (TIFF) and table (CSV) into ``folder``."""
        if self._layer is None:
            self._say(_NO_LAYER, warn=True)
            return None
        try:
            paths = export_labels(
                folder,
                np.asarray(self._layer.data),
                _segmentation(self._layer),
                name=free_stem(folder, self._layer.name),
            )
        except (DiffCutError, ValueError, OSError) as exc:
            self._say(f"Export failed: {exc}", warn=True)
            return None
        self._say(f"Exported {paths[0].name} and {paths[1].name} to {folder}")
        return paths

    def _edit(self, action: str, label: int | None) -> bool:
        if self._layer is None:
            self._say(_NO_LAYER, warn=True)
            return False
        layer = self._layer
        target = int(layer.selected_label if label is None else label)
        try:
            tree = self._tree()
            data = np.asarray(layer.data)
            if action == "split":
                edit = tree.split_edit(data, target)
            else:
                edit = tree.merge_edit(data, target)
        except (DiffCutError, ValueError) as exc:
            self._say(str(exc), warn=True)
            return False
        self._write(layer, edit)
        self.history(layer).record(edit)
        # Select the result: the first child after a split, the parent after a merge.
        layer.selected_label = int(edit.new[0]) if edit.n_pixels else target
        self._say(f"{edit.description} ({edit.n_pixels} pixels)")
        return True

    def _replay(self, *, undo: bool) -> bool:
        if self._layer is None:
            self._say(_NO_LAYER, warn=True)
            return False
        history = self.history()
        data = np.asarray(self._layer.data)
        try:
            edit = history.undo_edit(data) if undo else history.redo_edit(data)
        except DiffCutError as exc:
            self._say(str(exc), warn=True)
            return False
        self._write(self._layer, edit)
        self._say(replay_message(undo, edit.description))
        return True

    # -- events -------------------------------------------------------------------
    def _on_split(self, _value: Any = None) -> None:
        self.split()

    def _on_merge(self, _value: Any = None) -> None:
        self.merge()

    def _on_undo(self, _value: Any = None) -> None:
        self.undo()

    def _on_redo(self, _value: Any = None) -> None:
        self.redo()

    def _on_export(self, _value: Any = None) -> None:
        from qtpy.QtWidgets import QFileDialog  # noqa: TID253

        folder = QFileDialog.getExistingDirectory(self.native, "Export labels and table to")
        if folder:
            self.export_to(folder)

    def _on_click_action(self, _value: Any = None) -> None:
        """Clicks act in pan/zoom mode only: switch to it when an action is chosen."""
        if self._layer is not None and self.click_action.value != "off":
            self._layer.mode = "pan_zoom"

    def _on_mouse(self, layer: Any, event: Any) -> Any:
        """Mouse drag callback: act on release if the press was a click, not a drag."""
        action = self.click_action.value
        if (
            action == "off"
            or event.type != "mouse_press"
            or layer.mode != "pan_zoom"
            or getattr(event, "button", 1) != 1
        ):
            return
        value = _label_at(layer, event.position)
        start = np.asarray(getattr(event, "pos", (0.0, 0.0)), float)
        yield
        while event.type == "mouse_move":
            yield
        end = np.asarray(getattr(event, "pos", start), float)
        if np.hypot(*(end - start)) > CLICK_TOLERANCE_PX or value is None:
            return
        label = value
        if label == 0:
            self._say("background: no region here", warn=False)
            return
        layer.selected_label = label
        if action == "split":
            self.split(label)
        elif action == "merge":
            self.merge(label)

    def _on_data_replaced(self, _event: Any = None) -> None:
        """New data (a re-run, a script): our recorded edits no longer apply."""
        if not self._writing and self._layer is not None:
            self.history(self._layer).clear()
        self._refresh()

    def _refresh(self, _event: Any = None) -> None:
        """Update the status line, region description and button states."""
        layer = self._layer
        enabled = layer is not None
        for button in (self.split_button, self.merge_button, self.export_button):
            button.enabled = enabled
        if not enabled:
            self.status.value = _NO_LAYER
            self.region.value = ""
            self.undo_button.enabled = self.redo_button.enabled = False
            return
        history = self.history(layer)
        self.undo_button.enabled = history.can_undo
        self.redo_button.enabled = history.can_redo
        self.status.value = f"Editing {layer.name!r}"
        try:
            tree = self._tree()
            label = int(layer.selected_label)
            self.region.value = tree.describe(label)
            in_tree = 1 <= label <= tree.n_nodes
            self.split_button.enabled = in_tree and bool(tree.children_labels(label))
            self.merge_button.enabled = in_tree and tree.parent_label(label) is not None
        except (DiffCutError, ValueError) as exc:
            self.region.value = str(exc)

    def _write(self, layer: Any, edit: Edit) -> None:
        """Write an edit into the layer; its features follow (one row per label)."""
        self._writing = True
        try:
            _write(layer, edit)
        finally:
            self._writing = False
        seg = _segmentation(layer)
        if edit.n_pixels and seg is not None:
            layer.features = label_features(seg, np.asarray(layer.data))

    def _say(self, message: str, *, warn: bool = False) -> None:
        """Status line + napari notification (a warning for refused actions)."""
        from napari.utils.notifications import show_info, show_warning

        self._refresh()
        self.status.value = message
        (show_warning if warn else show_info)(message)


def _write(layer: Any, edit: Edit) -> None:
    """Write an edit into the layer's data in place and redraw it.

    Not ``Labels.data_setitem``: in napari 0.9 it casts values to the dtype of
    the displayed slice, which is a uint8 placeholder for a hidden layer.
    """
    if not edit.n_pixels:
        return
    data = layer.data
    top = int(edit.new.max())
    if not isinstance(data, np.ndarray) or not data.flags.writeable:
        layer.data = edit.apply(np.asarray(data))
        return
    if top > np.iinfo(data.dtype).max:
        # A child label the layer's dtype cannot hold: widen (labels are uint32).
        layer.data = edit.apply(data.astype(np.uint32))
        return
    data[edit.unravel(data.shape)] = edit.new
    layer.refresh()


def _label_at(layer: Any, world_position: Any) -> int | None:
    """The label under a world position, read from the data (None outside).

    Read from ``layer.data`` rather than ``layer.get_value``, which reads the
    displayed slice: a hidden layer has none.
    """
    coords = np.round(np.asarray(layer.world_to_data(world_position), float)).astype(int)
    shape = np.shape(layer.data)
    coords = coords[-len(shape) :]
    if coords.size != len(shape) or np.any(coords < 0) or np.any(coords >= shape):
        return None
    return int(np.asarray(layer.data[tuple(coords)]))


def _segmentation(layer: Any) -> Any:
    """The live Segmentation of a DiffCut Labels layer, or None."""
    from napari.layers import Labels

    from napari_diffcut.pipeline.segmentation import Segmentation

    if not isinstance(layer, Labels):
        return None
    seg = (diffcut_meta(layer.metadata) or {}).get("segmentation")
    # A 2-D result with its pixel map in memory only: stacks and tiled results
    # have no single tree, and a lazy (beyond-memory) map would be read whole.
    editable = isinstance(seg, Segmentation) and isinstance(seg.pixel_leaf, np.ndarray)
    return seg if editable else None


def _unwrap(obj: Any) -> Any:
    """The napari object behind a plugin proxy (identity checks need the real one)."""
    return getattr(obj, "__wrapped__", obj) if obj is not None else None
