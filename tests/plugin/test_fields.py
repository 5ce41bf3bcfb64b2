"""The form's meaning without Qt: channel text, settings, intensity mapping, channel axes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_diffcut.pipeline.settings import Settings
from napari_diffcut.plugin.fields import (
    FormFields,
    channel_axis_choices,
    parse_channels,
    settings_from_fields,
)
from napari_diffcut.plugin.take import FROM_LAYER, intensity_record, record_intensity


def test_parse_channels() -> None:
    assert parse_channels("") is None
    assert parse_channels(" 0, 2,1 ") == (0, 2, 1)
    with pytest.raises(ValueError, match="channels must be"):
        parse_channels("0;1")


def test_default_form_gives_the_cli_settings() -> None:
    """Issue 13 point 6: the form's defaults map intensities as the CLI does (percentiles)."""
    settings, limits = settings_from_fields(FormFields(model="m"), "auto")
    assert limits is None  # no contrast limits: Settings.normalize applies
    assert settings.normalize == Settings().normalize
    _, limits = settings_from_fields(FormFields(model="m", layer_contrast_limits=True), "auto")
    assert limits == FROM_LAYER


def test_off_values_and_overlap() -> None:
    s, _ = settings_from_fields(FormFields(model="m", working_size=0, tile_size=0), 0.3)
    assert s.working_size is None and s.tile_size is None and s.tile_overlap is None
    assert s.threshold == 0.3
    s, _ = settings_from_fields(FormFields(model="m", tile_size=256, tile_overlap=None), "auto")
    assert s.tile_size == 256 and s.tile_overlap is None  # auto
    s, _ = settings_from_fields(FormFields(model="m", tile_size=256, tile_overlap=0), "auto")
    assert s.tile_overlap == 0  # zero overlap is a real choice, not "auto"
    s, _ = settings_from_fields(FormFields(model="m", channels="1,0"), "auto")
    assert s.channels is None  # no channel axis: channels are ignored
    s, _ = settings_from_fields(FormFields(model="m", channel_axis=2, channels="1,0"), "auto")
    assert s.channels == (1, 0)


def test_intensity_is_recorded() -> None:
    assert intensity_record(None, [1.0, 99.8]) == {"intensity": "percentiles"}
    assert intensity_record(None, None) == {"intensity": "minmax"}
    record = intensity_record((10, 20), [1.0, 99.8])
    assert record == {"intensity": "contrast_limits", "contrast_limits": [10.0, 20.0]}
    seg = SimpleNamespace(settings={"normalize": [1.0, 99.8]})
    record_intensity(seg, None)
    assert seg.settings["intensity"] == "percentiles"


def test_channel_axis_choices() -> None:
    rgb = SimpleNamespace(data=np.zeros((4, 5, 3)), rgb=True, multiscale=False)
    assert [v for _, v in channel_axis_choices(rgb)] == [2]
    grey = SimpleNamespace(
        data=np.zeros((2, 4, 5)), rgb=False, multiscale=False, axis_labels=("c", "y", "x")
    )
    labels = [text for text, _ in channel_axis_choices(grey)]
    assert labels == ["none", "0: c (2)", "1: y (4)", "2: x (5)"]
