"""The command line contract: files written, settings recorded, one-line errors in CLI spelling."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_diffcut.cli.main import cli_message, main

FAST = ["--backbone", "pixels", "--working-size", "64", "--min-size", "2", "-q"]


@pytest.fixture
def image_file(tmp_path: Path, two_tone_image: np.ndarray) -> Path:
    import imageio.v3 as iio

    path = tmp_path / "smear.png"
    iio.imwrite(path, two_tone_image)
    return path


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("napari-diffcut: error: "), err
    assert "Traceback" not in err and "usage:" not in err
    return lines[0]


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
    # The weight-free backbone loads no model, and the record says so.
    assert settings["model"] is None
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("[1/1] ") and "segments" in out[0]


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


def test_several_images_into_a_folder_created_if_missing(
    tmp_path: Path, two_tone_image: np.ndarray, capsys: pytest.CaptureFixture
) -> None:
    import imageio.v3 as iio

    paths = []
    for name in ("a.png", "b.jpg.png", "c.tif"):
        paths.append(tmp_path / name)
        iio.imwrite(paths[-1], two_tone_image[..., 0] if name.endswith(".tif") else two_tone_image)
    out = tmp_path / "results" / "run1"
    assert main(["segment", *map(str, paths), *FAST, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "a.diffcut.json",
        "a.diffcut.tif",
        "b.jpg.diffcut.json",
        "b.jpg.diffcut.tif",
        "c.diffcut.json",
        "c.diffcut.tif",
    ]
    for stem, src in (("a", paths[0]), ("c", paths[2])):
        record = json.loads((out / f"{stem}.diffcut.json").read_text())
        assert record["input"] == str(src) and record["output"] == str(out / f"{stem}.diffcut.tif")
    lines = capsys.readouterr().out.splitlines()
    assert [line[:6] for line in lines] == ["[1/3] ", "[2/3] ", "[3/3] "]
    assert str(paths[1]) in lines[1] and "b.jpg.diffcut.tif" in lines[1]


def test_out_without_a_suffix_is_a_folder(image_file: Path, tmp_path: Path) -> None:
    # It used to write a TIFF file literally named "out".
    out = tmp_path / "out"
    assert main(["segment", str(image_file), *FAST, "--out", str(out)]) == 0
    assert out.is_dir() and (out / "smear.diffcut.tif").is_file()
    assert (out / "smear.diffcut.json").is_file()


def test_sample_from_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from napari_diffcut.files.samples import make_blood_smear

    monkeypatch.chdir(tmp_path)
    # The README's first command, as written (the default grid: a tiny one is too coarse
    # for the automatic threshold to find cells on this sample).
    argv = ["segment", "--sample", "blood-smear", "--backbone", "pixels", "-q", "--out", "results/"]
    assert main(argv) == 0
    labels = tifffile.imread(tmp_path / "results" / "blood-smear.diffcut.tif")
    record = json.loads((tmp_path / "results" / "blood-smear.diffcut.json").read_text())
    assert labels.shape == make_blood_smear()[0].shape[:2] and len(np.unique(labels)) >= 2
    assert record["input"] is None and record["sample"] == "blood-smear"
    assert record["model"] is None and record["backbone"] == "pixels"
    line = capsys.readouterr().out.strip()
    assert line.startswith("[1/1] sample blood-smear: ")
    assert line.endswith("-> results/blood-smear.diffcut.tif, results/blood-smear.diffcut.json")


def test_sample_choices_are_the_shipped_samples() -> None:
    from napari_diffcut.cli.main import build_parser
    from napari_diffcut.files.samples import SAMPLES

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    sample = next(a for a in sub.choices["segment"]._actions if a.dest == "sample")
    assert sorted(sample.choices) == sorted(SAMPLES)


def test_never_overwrites_without_flag(image_file: Path, capsys: pytest.CaptureFixture) -> None:
    out = image_file.with_name("existing.tif")
    out.write_bytes(b"user data")
    rc = main(["segment", str(image_file), "--backbone", "pixels", "-o", str(out), "-q"])
    assert rc == 2
    assert out.read_bytes() == b"user data"
    assert "--overwrite" in _one_error_line(capsys.readouterr().err)
    rc = main(["segment", str(image_file), "--backbone", "pixels", "-o", str(image_file), "-q"])
    assert rc == 2


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("x.tif", "--out x.tif names one label file but 2 images were given"),
        ("x.png", "labels are written as .tif or .zarr"),
    ],
)
def test_out_file_needs_one_image_and_a_label_suffix(
    image_file: Path, tmp_path: Path, out: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "other.png"
    other.write_bytes(image_file.read_bytes())
    rc = main(["segment", str(image_file), str(other), *FAST, "--out", out])
    assert rc == 2 and message in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.png", "smear.png"]


def test_two_images_never_share_an_output(
    image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "b").mkdir()
    twin = tmp_path / "b" / "smear.png"
    twin.write_bytes(image_file.read_bytes())
    rc = main(["segment", str(image_file), str(twin), *FAST, "--out", str(tmp_path / "res")])
    assert rc == 2 and "would both write" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "res").exists()  # refused before anything was computed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "2"], "argument --threshold: expected 'auto' or a number in (0, 1]"),
        (["--power", "0"], "argument --power: must be an integer >= 1, got '0'"),
        (["--min-size", "x"], "argument --min-size: must be an integer >= 1, got 'x'"),
        (["--device", "gpu"], "--device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
        (["--dtype", "half"], "--dtype must be one of"),
        (["--backbone", "sd"], "argument --backbone: invalid choice: 'sd'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_option_values_are_one_line(
    image_file: Path, args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["segment", str(image_file), *args])
    assert info.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert message in line and line.endswith("(see napari-diffcut segment --help)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["segment", "missing.png", "--backbone", "pixels"], "image file not found"),
        (["segment", "--backbone", "pixels"], "no image given: pass IMAGE [IMAGE ...] or --sample"),
        (["segment", "IMAGE", "--model", "/nonexistent/model"], "Could not load model"),
        (
            [
                "segment",
                "IMAGE",
                "--backbone",
                "pixels",
                "--tile-size",
                "64",
                "--tile-overlap",
                "40",
            ],
            "--tile-overlap must be <= --tile-size // 2 (32)",
        ),
    ],
)
def test_user_mistakes_give_one_line(
    image_file: Path, args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    args = [str(image_file) if a == "IMAGE" else a for a in args]
    assert main([*args, "-q"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert message in line
    assert "tile_overlap" not in line and "model=" not in line  # CLI spelling only


def test_unreadable_image_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    assert main(["segment", str(bad), "--backbone", "pixels"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "could not read" in line and "pip install" not in line


def test_cli_message_spelling() -> None:
    assert cli_message("device='cuda' was asked for; use device='auto' or 'cpu'") == (
        "--device cuda was asked for; use --device auto or 'cpu'"
    )
    assert cli_message("min_size must be an integer >= 1, got 0") == (
        "--min-size must be an integer >= 1, got 0"
    )
    assert cli_message("pass channels=[0, 2] to pick") == "pass --channels 0,2 to pick"
    assert cli_message("Point model (--model) at a folder") == "Point --model at a folder"
    assert cli_message("levels=True (--levels) is not available") == "--levels is not available"
    assert cli_message("first line\n  pyav: pip install imageio[pyav]") == "first line"
    # Prose is left alone: only option names followed by '=' or 'must' are rewritten.
    assert cli_message("the model could not be loaded") == "the model could not be loaded"


def test_model_mistakes_answer_before_torch(tmp_path: Path) -> None:
    """A wrong --model is reported without importing torch (so in well under 2 s)."""
    incomplete = tmp_path / "sd15"
    (incomplete / "unet").mkdir(parents=True)
    image = tmp_path / "img.png"
    import imageio.v3 as iio

    iio.imwrite(image, np.zeros((32, 32, 3), np.uint8))
    code = (
        "import sys, time\n"
        "wall, cpu = time.perf_counter(), time.process_time()\n"
        "from napari_diffcut.cli.main import main\n"
        "codes = [main(['segment', sys.argv[1], '--model', m, '-q']) for m in sys.argv[2:]]\n"
        "wall, cpu = time.perf_counter() - wall, time.process_time() - cpu\n"
        "assert codes == [2, 2, 2], codes\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n"
        "print(f'{wall:.2f} {cpu:.2f}')\n"
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(image),
            "/no/such/model",
            str(incomplete),
            "nobody/not-cached",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    errors = run.stderr.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("napari-diffcut: error: ") for e in errors)
    assert "does not exist" in errors[0] and "it has no vae/" in errors[1]
    assert "HF_HUB_OFFLINE is set" in errors[2] and "--model DIR" in errors[2]
    wall, cpu = (float(v) for v in run.stdout.split())
    assert cpu < 2.0, (wall, cpu)  # three mistakes, imports included


def test_progress_is_one_live_line_on_a_terminal() -> None:
    from napari_diffcut.pipeline.options import print_progress
    from napari_diffcut.pipeline.settings import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert print_progress(False, io.StringIO()) is None  # logs and pipes: per-image lines only
    assert print_progress(True, Terminal()) is None
    term = Terminal()
    show = print_progress(False, term)
    assert show is not None
    for stage in ("load", "load", "cut"):
        show(Progress(stage, 0, 1, "working"))
    text = term.getvalue()
    assert text.count("\r") == 2 and "\n" not in text and "cut: working" in text


def test_default_model_is_spelled_once() -> None:
    from napari_diffcut.pipeline import options, settings

    assert options.DEFAULT_MODEL == settings.DEFAULT_MODEL


def test_console_script_is_main() -> None:
    from importlib.metadata import entry_points

    [script] = entry_points(group="console_scripts", name="napari-diffcut")
    assert script.load() is main


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
    assert "--threshold" in out and "--backbone" in out and "--sample" in out


def _cache_copy(model: Path, cache: Path, repo: str) -> None:
    """Lay ``model`` out as huggingface_hub caches a download of ``repo``."""
    import shutil

    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "1" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    shutil.copytree(model, folder / "snapshots" / commit)
    # A real first download records the optional files the repo lacks; transformers
    # asks for tokenizer/config.json and, offline, needs to know it does not exist.
    missing = folder / ".no_exist" / commit / "tokenizer" / "config.json"
    missing.parent.mkdir(parents=True)
    missing.touch()


#: The Python API's run of the cached hub model (the widget goes through the same ModelCache).
API_RUN = (
    "import sys, json, imageio.v3 as iio, napari_diffcut;"
    "seg = napari_diffcut.segment(iio.imread(sys.argv[1]), model='owner/tiny', min_size=2,"
    " threshold=0.9); print(json.dumps([list(seg.shape), seg.settings['model']]))"
)


@pytest.mark.parametrize("entry", ["cli", "api"])
def test_cached_hub_model_loads_without_the_network(
    tiny_model: Path, image_file: Path, tmp_path: Path, entry: str
) -> None:
    """Cached, hub unreachable: the run reads the cache instead of retrying the hub."""
    import os
    import socket
    import time

    cache = tmp_path / "hub"
    _cache_copy(tiny_model, cache, "owner/tiny")
    with socket.socket() as s:  # a closed local port: every connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HUB_CACHE=str(cache), HTTPS_PROXY=f"http://127.0.0.1:{port}")
    out = tmp_path / "labels.tif"
    if entry == "cli":
        argv = ["-m", "napari_diffcut", "segment", str(image_file), "--model", "owner/tiny",
                "--min-size", "2", "--threshold", "0.9", "-o", str(out), "-q"]
    else:
        argv = ["-c", API_RUN, str(image_file)]
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode == 0, run.stderr
    if entry == "cli":
        assert tifffile.imread(out).shape == (96, 144)
        record = json.loads((tmp_path / "labels.diffcut.json").read_text())
        assert record["model"] == "owner/tiny"
    else:
        assert json.loads(run.stdout.strip().splitlines()[-1]) == [[96, 144], "owner/tiny"]
    assert time.perf_counter() - start < 50  # no hub retries (5 of them take about 57 s)


def test_instances_count_nuclei_into_a_tiff_and_a_csv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import csv

    from napari_diffcut.files.samples import make_nuclei

    monkeypatch.chdir(tmp_path)
    argv = ["segment", "--sample", "nuclei", "--backbone", "pixels", "-q", "--out", "res",
            "--instances"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    instances = tifffile.imread(tmp_path / "res" / "nuclei.instances.tif")
    rows = list(csv.DictReader((tmp_path / "res" / "nuclei.instances.csv").open()))
    record = json.loads((tmp_path / "res" / "nuclei.diffcut.json").read_text())
    count = record["instances"]["count"]
    assert f", {count} instances -> " in line and "res/nuclei.instances.csv" in line
    assert len(rows) == count == int(instances.max())
    assert list(rows[0]) == ["label", "segment", "area", "centroid_y", "centroid_x"]
    assert [int(r["area"]) for r in rows] == np.bincount(instances.ravel())[1:].tolist()
    truth = int(make_nuclei()[1].max())
    assert abs(count - truth) <= 0.2 * truth  # objects, not fragments of them
    assert record["instances_output"].endswith("nuclei.instances.tif")
    # A rerun without --instances replaces the set: no instance file of older labels stays.
    assert main([*argv[:-1], "--overwrite"]) == 0
    assert not (tmp_path / "res" / "nuclei.instances.tif").exists()
    assert not (tmp_path / "res" / "nuclei.instances.csv").exists()


def test_instances_refuse_a_stack_before_computing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3, 32, 32), np.uint16), metadata={"axes": "ZYX"})
    rc = main(["segment", str(path), *FAST, "--instances", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--instances counts objects in a 2-D image" in _one_error_line(
        capsys.readouterr().err
    )
    assert not (tmp_path / "o").exists()


def test_instance_outputs_are_never_written_over_without_overwrite(
    image_file: Path, capsys: pytest.CaptureFixture
) -> None:
    foreign = image_file.with_name("smear.instances.csv")
    foreign.write_text("my own notes\n")
    rc = main(["segment", str(image_file), *FAST, "--instances"])
    assert rc == 2 and "smear.instances.csv" in _one_error_line(capsys.readouterr().err)
    rc = main(["segment", str(image_file), *FAST, "--instances", "--overwrite"])
    assert rc == 2 and foreign.read_text() == "my own notes\n"  # not ours: never replaced
