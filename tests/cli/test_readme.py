"""The README's first two commands: install and run on a shipped sample; run the tests."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import tifffile

README = Path(__file__).resolve().parents[2] / "README.md"


def _first_block() -> list[str]:
    text = README.read_text()
    start = text.index("```bash\n") + len("```bash\n")
    return text[start : text.index("```", start)].strip().splitlines()


def _no_display_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}


def test_readme_opens_with_exactly_two_commands() -> None:
    install_and_run, tests = _first_block()
    assert install_and_run.startswith("pip install torch==2.13.0 -e . && napari-diffcut segment ")
    assert "--sample blood-smear" in install_and_run and "--backbone pixels" in install_and_run
    assert tests.split("#")[0].strip() == "bash .ci/run"
    assert (README.parent / ".ci" / "run").is_file()


def test_first_command_runs_with_no_weights_torch_or_display(tmp_path: Path) -> None:
    command = _first_block()[0].split("&&", 1)[1].strip()
    argv = shlex.split(command)
    assert argv[0] == "napari-diffcut"
    code = (
        "import sys\nfrom napari_diffcut.cli.main import main\n"
        f"assert main({argv[1:]!r}) == 0\n"
        "heavy = [m for m in ('torch', 'diffusers', 'napari', 'qtpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = _no_display_env()
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    out = tmp_path / "results"
    assert tifffile.imread(out / "blood-smear.diffcut.tif").shape == (256, 256)
    record = json.loads((out / "blood-smear.diffcut.json").read_text())
    assert record["sample"] == "blood-smear" and record["model"] is None
    assert run.stdout.startswith("[1/1] sample blood-smear: ")


def test_the_stable_diffusion_line_says_how_to_get_the_model_offline(tmp_path: Path) -> None:
    """Offline with an empty cache the SD run answers at once with how to get the model."""
    text = README.read_text()
    marker = "The same run with Stable Diffusion"
    line = text[text.index(marker) :].split("`")[1]
    argv = shlex.split(line)
    assert argv[:2] == ["napari-diffcut", "segment"] and "--backbone" not in argv
    env = _no_display_env()
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    run = subprocess.run(
        [sys.executable, "-m", "napari_diffcut", *argv[1:]], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2
    [error] = run.stderr.strip().splitlines()
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in error and "download" in error
