"""Damaged, absurd or pickled model files: one line that names the file."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from napari_diffcut.attention.weights_check import check_model_files, load_error
from napari_diffcut.core.errors import DiffCutError


@pytest.fixture
def model(tiny_model: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(tiny_model, dest)
    return dest


def test_whole_model_passes(model: Path) -> None:
    check_model_files(model)


def test_truncated_safetensors_is_reported_as_damaged(model: Path) -> None:
    weights = next((model / "unet").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(DiffCutError, match=rf"{weights.name} is damaged.*truncated"):
        check_model_files(model)


def test_huge_block_out_channels_is_refused_before_loading(model: Path) -> None:
    config = model / "unet" / "config.json"
    data = json.loads(config.read_text())
    data["block_out_channels"] = [100000] * len(data["block_out_channels"])
    config.write_text(json.dumps(data))
    with pytest.raises(DiffCutError, match=r"UNet .* would take .* TB"):
        check_model_files(model)


def test_pickled_weights_error_is_one_line_naming_the_file(model: Path) -> None:
    (model / "text_encoder" / "pytorch_model.bin").write_bytes(b"not a pickle")
    try:
        raise OSError("load failed") from pickle.UnpicklingError("Weights only load failed")
    except OSError as exc:
        err = load_error(model, exc)
    assert err is not None and "pytorch_model.bin can't be loaded safely" in str(err)
    assert "\n" not in str(err)
    assert load_error(model, ValueError("other")) is None


def test_cli_names_a_truncated_weights_file(model: Path, tmp_path: Path, capsys) -> None:
    """End to end: the CLI says which file is damaged, not 'only pickled .bin files'."""
    from napari_diffcut.cli.main import main

    weights = next((model / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    status = main(["segment", "--sample", "blood-smear", "--model", str(model),
                   "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status != 0
    assert f"{weights.name} is damaged" in err and "pickled" not in err
    assert "Traceback" not in err


def test_engine_turns_an_unpicklable_encoder_into_one_line(model: Path) -> None:
    """--allow-pickle with a text encoder that is not a pickle: one DiffCutError line."""
    from napari_diffcut.pipeline.engine import ModelCache
    from napari_diffcut.pipeline.settings import Settings

    enc = model / "text_encoder"
    for f in enc.glob("*.safetensors"):
        f.unlink()
    (enc / "pytorch_model.bin").write_bytes(b"this is not a pickle")
    settings = Settings(model=str(model), device="cpu", allow_pickle=True)
    with pytest.raises(DiffCutError) as info:
        ModelCache().model_for(settings)
    assert "\n" not in str(info.value) and "pytorch_model.bin can't be loaded safely" in str(
        info.value
    )
