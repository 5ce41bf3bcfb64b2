"""Instance layers (plugin/instances.py): counted from the main layer, recounted on re-cuts."""

from __future__ import annotations

from pathlib import Path

import napari
import numpy as np
import pytest

from napari_diffcut.files.samples import make_nuclei
from napari_diffcut.plugin.instances import (
    INSTANCES_KEY,
    apply_instances,
    instances_layer_name,
    instances_summary,
)
from napari_diffcut.plugin.scripting import recut_layer, segment_layer


def test_segment_layer_adds_a_counted_instance_layer(viewer: napari.Viewer) -> None:
    image, truth = make_nuclei()
    layer = viewer.add_image(image, name="nuclei", scale=(0.5, 0.5))
    main, *rest = segment_layer(viewer, layer, backbone="pixels", instances=True)
    inst = rest[-1]
    assert inst.name == instances_layer_name("nuclei") and tuple(inst.scale) == (0.5, 0.5)
    entry = inst.metadata[INSTANCES_KEY]
    n = int(truth.max())
    assert abs(entry["count"] - n) <= 0.2 * n and entry["min_size"] == 16
    assert list(inst.features.columns) == ["index", "segment", "area", "centroid_y", "centroid_x"]
    assert len(inst.features) == entry["count"] == int(np.asarray(inst.data).max())
    assert (np.asarray(inst.data)[np.asarray(main.data) == entry["background"]] == 0).all()
    assert "instances" in instances_summary(inst)
    # A re-cut recounts the layer in place (one instance layer, the new labels).
    recut_layer(viewer, layer, 1e-6)
    again = viewer.layers[instances_layer_name("nuclei")]
    assert again is inst and inst.metadata[INSTANCES_KEY]["count"] <= entry["count"]
    assert sum(lay.name.startswith(instances_layer_name("nuclei")) for lay in viewer.layers) == 1


def test_a_painted_instance_layer_is_kept_and_the_count_goes_beside_it(
    viewer: napari.Viewer,
) -> None:
    image, _ = make_nuclei(128, seed=2)
    layer = viewer.add_image(image, name="n")
    main, *_ = segment_layer(viewer, layer, backbone="pixels", instances=5)
    inst = viewer.layers[instances_layer_name("n")]
    painted = np.asarray(inst.data).copy()
    painted[:4, :4] = 999
    inst.data = painted
    fresh = apply_instances(viewer, main)
    assert fresh is not inst and fresh.name == instances_layer_name("n") + " [1]"
    assert np.array_equal(np.asarray(inst.data), painted)  # the user's layer is untouched
    assert fresh.metadata[INSTANCES_KEY]["min_size"] == 5  # the min size it was counted with


def test_instances_refuse_a_stack_run_before_computing(viewer: napari.Viewer) -> None:
    layer = viewer.add_image(np.zeros((3, 64, 64), np.uint16), name="z")
    with pytest.raises(ValueError, match="run_on='plane'"):
        segment_layer(viewer, layer, backbone="pixels", run_on="stack", instances=True)
    with pytest.raises(ValueError, match="instances must be True, False or a minimum size"):
        segment_layer(viewer, layer, backbone="pixels", instances=0)
    assert [lay.name for lay in viewer.layers] == ["z"]


def test_save_an_instance_layer_as_csv_from_its_current_data(
    viewer: napari.Viewer, tmp_path
) -> None:
    import csv

    image, _ = make_nuclei(128, seed=3)
    layer = viewer.add_image(image, name="n")
    main, *_ = segment_layer(viewer, layer, backbone="pixels", instances=True)
    inst = viewer.layers[instances_layer_name("n")]
    from napari_diffcut.plugin.writer import write_table_csv

    data, meta, _ = inst.as_layer_data_tuple()
    written = write_table_csv(str(tmp_path / "counts"), data, meta)
    rows = list(csv.DictReader(Path(written[0]).read_text().splitlines()))
    assert written[0].endswith("counts.csv")
    assert len(rows) == inst.metadata[INSTANCES_KEY]["count"]
    assert list(rows[0]) == ["label", "segment", "area", "centroid_y", "centroid_x"]
    by_label = {int(r["label"]): r for r in rows}
    first = int(inst.features["index"][0])
    assert int(by_label[first]["segment"]) == int(inst.features["segment"][0])
    # A result layer saves its per-label table with the tree columns.
    data, meta, _ = main.as_layer_data_tuple()
    saved = Path(write_table_csv(str(tmp_path / "main.csv"), data, meta)[0])
    rows = list(csv.DictReader(saved.read_text().splitlines()))
    assert "ncut_cost" in rows[0] and len(rows) == len(np.unique(np.asarray(main.data)))
