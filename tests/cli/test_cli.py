"""The command line: files written, settings recorded, user mistakes without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_diffcut.cli.main import main


@pytest.fixture
def image_file(tmp_path: Path, two_tone_image: np.ndarray) -> Path:
    import imageio.v3 as iio

    path = tmp_path / "smear.png"
    iio.imwrite(path, two_tone_image)
    return path


def test_segment_writes_labels_levels_and_settings(
    image_file: Path, capsys: pytest.CaptureFixture
) -> None:
    rc = main(
        ["segment", str(image_file), "--backbone", "pixels", "--levels", "--min-size", "4", "-q"]
    )
    assert rc == 0
    labels = tifffile.imread(image_file.with_name("smear.diffcut.tif"))
    levels = tifffile.imread(image_file.with_name("smear.levels.tif"))
    settings = json.loads(image_file.with_name("smear.diffcut.json").read_text())
    assert labels.shape == (96, 144) and labels.dtype == np.uint32 and labels.min() >= 1
    assert levels.ndim == 3 and levels.shape[1:] == (96, 144)
    np.testing.assert_array_equal(levels[-1], labels)
    assert settings["backbone"] == "pixels" and settings["min_size"] == 4
    assert settings["input"] == str(image_file)
    assert "segments" in capsys.readouterr().out


def test_segment_with_tiny_model(image_file: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "labels.tif"
    rc = main(
        [
            "segment",
            str(image_file),
            "--model",
            str(tiny_model),
            "--min-size",
            "2",
            "--threshold",
            "0.9",
            "-o",
            str(out),
            "-q",
        ]
    )
    assert rc == 0
    assert tifffile.imread(out).shape == (96, 144)
    settings = json.loads((tmp_path / "out" / "labels.diffcut.json").read_text())
    assert settings["threshold"] == 0.9 and settings["model"] == str(tiny_model)


def test_never_overwrites_without_flag(image_file: Path, capsys: pytest.CaptureFixture) -> None:
    out = image_file.with_name("existing.tif")
    out.write_bytes(b"user data")
    rc = main(["segment", str(image_file), "--backbone", "pixels", "-o", str(out), "-q"])
    assert rc == 2
    assert out.read_bytes() == b"user data"
    assert "--overwrite" in capsys.readouterr().err
    rc = main(["segment", str(image_file), "--backbone", "pixels", "-o", str(image_file), "-q"])
    assert rc == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["segment", "missing.png", "--backbone", "pixels"], "image file not found"),
        (
            ["segment", "IMAGE", "--backbone", "pixels", "--power", "0"],
            "power must be an integer >= 1",
        ),
        (["segment", "IMAGE", "--model", "/nonexistent/model"], "Could not load model"),
    ],
)
def test_user_mistakes_give_one_line(
    image_file: Path, args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    args = [str(image_file) if a == "IMAGE" else a for a in args]
    assert main([*args, "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_option_value_exits_2(image_file: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["segment", str(image_file), "--threshold", "2"])
    assert info.value.code == 2
    assert "expected 'auto' or a number" in capsys.readouterr().err


def test_unreadable_image(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    assert main(["segment", str(bad), "--backbone", "pixels"]) == 2
    assert "could not read" in capsys.readouterr().err


def test_help_is_fast_and_light() -> None:
    code = (
        "import sys; from napari_diffcut.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "names = ('torch', 'diffusers', 'napari', 'qtpy', 'transformers')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)
    out = subprocess.run(
        [sys.executable, "-m", "napari_diffcut", "segment", "--help"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "--threshold" in out and "--backbone" in out
