"""Batch runs: inputs, resumability, atomic outputs, failures, CLI, Dask clusters."""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_diffcut.batch.jobs import (
    LOG_NAME,
    MANIFEST_NAME,
    find_images,
    output_key,
    output_state,
    plan_jobs,
)
from napari_diffcut.batch.runner import _output_lock, remove_stale_temporaries, run_batch
from napari_diffcut.batch.work import ImageResult, process_image
from napari_diffcut.cli.main import main
from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.files.io import read_image
from napari_diffcut.large.dispatch import DiffCutEngine
from napari_diffcut.pipeline.settings import Settings

# A 16 x 16 patch grid and a shallow tree: a fraction of a second per image.
FAST = {"backbone": "pixels", "working_size": 128, "max_depth": 2, "min_size": 8}
GOOD = ("img0", "img1", "img2")


def _disc_image(i: int) -> np.ndarray:
    img = np.zeros((40, 56, 3), np.uint8)
    img[:] = (30, 40, 60)
    yy, xx = np.mgrid[:40, :56]
    img[(yy - 20) ** 2 + (xx - 15 - 12 * i) ** 2 < 12**2] = (220, 180, 160)
    return img


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three small PNG images and one file that is not an image."""
    import imageio.v3 as iio

    src = tmp_path / "images"
    src.mkdir()
    for i, name in enumerate(GOOD):
        iio.imwrite(src / f"{name}.png", _disc_image(i))
    (src / "broken.png").write_bytes(b"not an image")
    return src


def _files(out: Path) -> list[str]:
    """Every file under out (hidden ones too), relative, sorted."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def _expected_files(keys: tuple[str, ...], levels: bool = False) -> list[str]:
    names = [f"{k}.diffcut.tif" for k in keys] + [f"{k}.diffcut.json" for k in keys]
    if levels:
        names += [f"{k}.levels.tif" for k in keys]
    return sorted([*names, MANIFEST_NAME, LOG_NAME, ".diffcut-batch.lock"])


def _stamps(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) per output: a rename-into-place changes the inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.diffcut.*")}


# --------------------------------------------------------------------------------------
# Inputs and output names


def test_find_images_folder_glob_and_list(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in (
        "a.png",
        "b.tif",
        "sub/c.png",
        "x.diffcut.tif",
        ".hidden.png",
        "n.txt",
    ):
        (tmp_path / name).write_bytes(b"")
    root, paths = find_images(tmp_path)
    assert root == tmp_path.resolve()
    assert [p.name for p in paths] == ["a.png", "b.tif"]  # no subfolders, no outputs

    root, paths = find_images(str(tmp_path / "**" / "*.png"))
    assert root == tmp_path.resolve()
    assert [output_key(p, root) for p in paths] == ["a", "sub/c"]

    root, paths = find_images([tmp_path / "sub" / "c.png", tmp_path / "a.png"])
    assert root == tmp_path.resolve()
    assert [output_key(p, root) for p in paths] == ["a", "sub/c"]

    with pytest.raises(ValueError, match="matched no image"):
        find_images(str(tmp_path / "*.jpg"))
    with pytest.raises(ValueError, match="neither a folder"):
        find_images(tmp_path / "missing")


def test_output_keys_keep_numbered_names_apart(tmp_path: Path) -> None:
    root = tmp_path
    assert output_key(root / "img.001.tif", root) == "img.001"
    assert output_key(root / "img.002.tif", root) == "img.002"
    assert output_key(root / "plate" / "A01.ome.tif", root) == "plate/A01"


def test_plan_jobs_refuses_two_inputs_with_one_output_name(tmp_path: Path) -> None:
    paths = [tmp_path / "a.png", tmp_path / "a.tif"]
    with pytest.raises(ValueError, match="would both write a.diffcut.tif"):
        plan_jobs(paths, tmp_path, tmp_path / "out")


def test_stale_temporaries_of_outputs_and_manifest_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (job,) = plan_jobs([tmp_path / "sub" / "c.png"], tmp_path, out)  # key "sub/c"
    stale = [
        out / ".diffcut-manifest.json.k3j2h1g0.tmp",
        out / "sub" / ".c.diffcut.tif.a1b2c3d4.tmp",
    ]
    kept = [out / ".x.diffcut.tif.a1b2c3d4.tmp", out / "sub" / "c.diffcut.tif", out / ".other.tmp"]
    for path in stale + kept:
        path.write_bytes(b"")
    assert remove_stale_temporaries([job], out) == 2
    assert [p.exists() for p in stale + kept] == [False, False, True, True, True]


def test_run_batch_rejects_bad_cluster_arguments(folder: Path, tmp_path: Path) -> None:
    s = Settings(**FAST)
    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0"):
        run_batch(folder, tmp_path / "o", s, workers=0)
    with pytest.raises(ValueError, match="either workers"):
        run_batch(folder, tmp_path / "o", s, workers=2, scheduler="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="scheduler must be an address"):
        run_batch(folder, tmp_path / "o", s, scheduler="localhost")


def test_batch_import_is_light() -> None:
    """The CLI imports this module for --help: no torch, dask or distributed."""
    import subprocess

    code = (
        "import sys, napari_diffcut.batch.runner\n"
        "heavy = [m for m in ('torch', 'dask', 'distributed', 'napari') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------
# In-process runs


def test_in_process_batch_resumes_and_reports_failures(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = Settings(**FAST)
    summary = run_batch(folder, out, s)

    assert sorted(summary.done) == list(GOOD)
    assert summary.skipped == []
    assert list(summary.failed) == ["broken"]
    assert "could not read" in summary.failed["broken"]
    assert summary.status == "completed"
    assert _files(out) == _expected_files(GOOD)  # no temporary files, nothing extra
    log = (out / LOG_NAME).read_text()
    assert "FAILED broken" in log and "Traceback" in log
    assert "1 failed" in str(summary) and str(out / LOG_NAME) in str(summary)

    # Outputs are the engine's result for the same image and settings.
    seg = DiffCutEngine().segment(read_image(folder / "img1.png"), s)
    labels = tifffile.imread(out / "img1.diffcut.tif")
    np.testing.assert_array_equal(labels, seg.labels)
    record = json.loads((out / "img1.diffcut.json").read_text())
    assert record["backbone"] == "pixels" and record["min_size"] == 8
    assert record["input"] == str((folder / "img1.png").resolve())
    assert oct((out / "img1.diffcut.tif").stat().st_mode & 0o777) != "0o600"

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["settings"] == json.loads(json.dumps(s.as_dict()))
    assert manifest["napari_diffcut_version"]
    assert {k: v["status"] for k, v in manifest["images"].items()} == {
        "img0": "done",
        "img1": "done",
        "img2": "done",
        "broken": "failed",
    }
    assert manifest["images"]["img0"]["outputs"] == [
        "img0.diffcut.tif",
        "img0.diffcut.json",
    ]
    assert manifest["runs"][-1]["status"] == "completed"

    # Second run: everything done is skipped and left untouched; the failure is retried.
    before = _stamps(out)
    again = run_batch(folder, out, s)
    assert sorted(again.skipped) == list(GOOD)
    assert again.done == [] and list(again.failed) == ["broken"]
    assert _stamps(out) == before
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert len(manifest["runs"]) == 2
    assert manifest["images"]["img0"]["status"] == "done"


def test_stopped_run_leftovers_are_redone_and_cleaned(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = Settings(**FAST)
    (folder / "broken.png").unlink()
    # A crash after writing the labels but before the JSON, and while writing
    # another file: a label TIFF without JSON, and a stray temporary file.
    out.mkdir()
    (out / "img0.diffcut.tif").write_bytes(b"partial")
    (out / ".img1.diffcut.json.k3j2h1g0.tmp").write_bytes(b"{")
    summary = run_batch(folder, out, s, levels=True)
    assert sorted(summary.done) == list(GOOD)
    assert _files(out) == _expected_files(GOOD, levels=True)
    levels = tifffile.imread(out / "img0.levels.tif")
    assert levels.ndim == 3 and levels.dtype == np.uint32
    np.testing.assert_array_equal(levels[-1], tifffile.imread(out / "img0.diffcut.tif"))

    # A deleted levels stack makes the image not done when levels are asked for.
    (out / "img2.levels.tif").unlink()
    assert run_batch(folder, out, s).done == []
    assert run_batch(folder, out, s, levels=True).done == ["img2"]


def test_other_settings_are_refused_unless_overwrite(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (folder / "broken.png").unlink()
    run_batch(folder / "img0.png", out, Settings(**FAST), levels=True)
    before = _stamps(out)
    other = Settings(**FAST, threshold=0.5)
    with pytest.raises(ValueError, match=r"threshold='auto' \(requested 0.5\).*--overwrite"):
        run_batch(folder, out, other)
    assert _stamps(out) == before  # refused before anything was written
    summary = run_batch(folder, out, other, overwrite=True)
    assert sorted(summary.done) == list(GOOD)
    assert json.loads((out / "img0.diffcut.json").read_text())["threshold"] == 0.5
    # The old levels (threshold 'auto') went with the old labels: asking for
    # levels now redoes img0 instead of taking the stale file as done.
    assert not (out / "img0.levels.tif").exists()
    assert sorted(run_batch(folder, out, other, levels=True).done) == list(GOOD)


def test_a_levels_file_not_named_by_the_json_is_not_done(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = Settings(**FAST)
    run_batch(folder / "img0.png", out, s)
    (out / "img0.levels.tif").write_bytes(b"left by someone else")
    (job,) = plan_jobs([(folder / "img0.png").resolve()], folder.resolve(), out.resolve())
    assert output_state(job, s, levels=False) == ("done", "")
    assert output_state(job, s, levels=True) == ("missing", "levels TIFF missing")


def test_ctrl_c_stops_cleanly_and_the_next_run_resumes(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (folder / "broken.png").unlink()
    s = Settings(**FAST)

    def interrupt_on_img1(path: Path) -> np.ndarray:
        if path.name == "img1.png":
            raise KeyboardInterrupt
        return read_image(path)

    with pytest.raises(KeyboardInterrupt):
        run_batch(folder, out, s, reader=interrupt_on_img1)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["runs"][-1]["status"] == "interrupted"
    assert manifest["images"]["img0"]["status"] == "done"
    assert manifest["images"]["img1"]["status"] == "pending"
    assert _files(out) == _expected_files(("img0",))

    summary = run_batch(folder, out, s)
    assert summary.skipped == ["img0"] and summary.done == ["img1", "img2"]


def test_in_process_tiny_model_loads_once(folder: Path, tmp_path: Path, tiny_model: Path) -> None:
    for name in ("img2.png", "broken.png"):
        (folder / name).unlink()
    s = Settings(model=str(tiny_model), device="cpu", working_size=128, max_depth=2, min_size=8)
    summary = run_batch(folder, tmp_path / "out", s)
    assert summary.done == ["img0", "img1"] and summary.failed == {}
    assert [r.loaded_model for r in summary.results] == [True, False]
    assert {r.worker for r in summary.results} == {f"{socket.gethostname()}:{os.getpid()}"}
    record = json.loads((tmp_path / "out" / "img1.diffcut.json").read_text())
    assert record["backbone"] == "diffusion" and record["device_used"] == "cpu"


def test_a_model_that_cannot_load_stops_the_batch_at_once(folder: Path, tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    out = tmp_path / "out"
    with pytest.raises(DiffCutError, match="batch stopped: the model could not be loaded"):
        run_batch(folder, out, Settings(model=str(empty), working_size=128))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["runs"][-1]["status"] == "aborted"
    statuses = sorted(v["status"] for v in manifest["images"].values())
    assert statuses == ["failed", "pending", "pending", "pending"]  # one try, not four
    assert "not a complete diffusers model" in (out / LOG_NAME).read_text()


def test_a_stack_gives_a_label_stack(tmp_path: Path) -> None:
    """A multi-page TIFF is segmented plane by plane by the engine; no levels list."""
    src = tmp_path / "stacks"
    src.mkdir()
    stack = np.stack([_disc_image(0)[..., 0], _disc_image(2)[..., 0]])
    tifffile.imwrite(src / "s.tif", stack)
    summary = run_batch(src, tmp_path / "out", Settings(**FAST))
    assert summary.done == ["s"]
    labels = tifffile.imread(tmp_path / "out" / "s.diffcut.tif")
    assert labels.shape == (2, 40, 56) and labels.dtype == np.uint32
    refused = run_batch(src, tmp_path / "out2", Settings(**FAST), levels=True)
    assert "not available" in refused.failed["s"]


def test_a_retried_task_does_not_write_again(folder: Path, tmp_path: Path) -> None:
    """A task rerun after its worker died *after* writing finds complete outputs."""
    out = tmp_path / "out"
    s = Settings(**FAST)
    run_batch(folder / "img0.png", out, s)
    (job,) = plan_jobs([(folder / "img0.png").resolve()], folder.resolve(), out.resolve())
    before = _stamps(out)
    result = process_image(job, s, levels=False, engine=DiffCutEngine())
    assert result.status == "done" and "retried" in result.note
    assert _stamps(out) == before


def test_one_batch_per_output_folder(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with (
        _output_lock(out),
        pytest.raises(DiffCutError, match="another napari-diffcut batch"),
    ):
        run_batch(folder, out, Settings(**FAST))


def test_cli_batch(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The CLI has no --working-size: one image at the default grid keeps it short.
    for name in ("img1.png", "img2.png"):
        (folder / name).unlink()
    out = tmp_path / "out"
    args = ["batch", str(folder), "--out", str(out), "--backbone", "pixels",
            "--max-depth", "1", "--min-size", "256", "-q"]  # fmt: skip
    assert main(args[:-1]) == 1  # one image failed; without -q: a progress bar
    captured = capsys.readouterr()
    assert "1 done, 0 skipped" in captured.out and "failed broken" in captured.out
    assert "napari-diffcut batch" in captured.err and "2/2" in captured.err
    (folder / "broken.png").unlink()
    assert main(args) == 0
    assert "0 done, 1 skipped" in capsys.readouterr().out
    assert main([*args, "--threshold", "0.5"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"])


# --------------------------------------------------------------------------------------
# Dask clusters (loopback only)


@pytest.fixture(scope="module")
def cluster():  # type: ignore[no-untyped-def]
    """An existing local cluster: 2 worker processes with a nanny, on 127.0.0.1."""
    import logging

    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
    ) as c:
        yield c


def _kill_worker_once(path: Path, *, victim: str, marker: str) -> np.ndarray:
    """Reader that kills its own worker process the first time it sees ``victim``."""
    if path.name == victim:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            os._exit(1)
    return read_image(path)


def test_dask_worker_death_and_bad_image(folder: Path, tmp_path: Path, cluster) -> None:  # type: ignore[no-untyped-def]
    import cloudpickle

    assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    workers = cluster.scheduler_info["workers"]
    assert len(workers) == 2 and all(a.startswith("tcp://127.0.0.1:") for a in workers)
    out = tmp_path / "out"
    marker = tmp_path / "killed-once"
    reader = functools.partial(_kill_worker_once, victim="img1.png", marker=str(marker))
    # Ship the reader by value: worker processes cannot import this test module.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        summary = run_batch(
            folder,
            out,
            Settings(**FAST),
            scheduler=cluster.scheduler_address,
            reader=reader,
        )
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    assert marker.exists()  # a worker really died mid-batch
    assert summary.status == "completed"
    assert sorted(summary.done) == list(GOOD)
    assert list(summary.failed) == ["broken"]
    assert Counter(r.key for r in summary.results) == Counter([*GOOD, "broken"])  # once each
    assert _files(out) == _expected_files(GOOD)  # no duplicates, no partial files
    for key in GOOD:
        labels = tifffile.imread(out / f"{key}.diffcut.tif")
        assert labels.shape == (40, 56) and labels.dtype == np.uint32
        assert len(np.unique(labels)) >= 2
    assert "FAILED broken" in (out / LOG_NAME).read_text()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["runs"][-1]["scheduler"] == cluster.scheduler_address
    # The shared cluster's workers no longer hold our engine (nor its model).
    from distributed import Client

    from napari_diffcut.batch.dask import PLUGIN_NAME

    with Client(cluster) as client:
        held = client.run(lambda dask_worker: PLUGIN_NAME in dask_worker.plugins)
    assert held and not any(held.values())

    # Second run on the same cluster: everything done is skipped.
    before = _stamps(out)
    again = run_batch(folder, out, Settings(**FAST), scheduler=cluster.scheduler_address)
    assert sorted(again.skipped) == list(GOOD) and again.done == []
    assert list(again.failed) == ["broken"]
    assert _stamps(out) == before


def test_a_task_lost_on_the_cluster_is_reported_as_failed(tmp_path: Path) -> None:
    """After allowed-failures worker deaths Dask gives up on a task: report it, go on."""
    from types import SimpleNamespace

    from distributed import KilledWorker

    from napari_diffcut.batch.dask import _collect

    class LostFuture:
        def result(self) -> None:
            worker = SimpleNamespace(address="tcp://127.0.0.1:1")
            raise KilledWorker("napari-diffcut-ab-1", worker, 3)

    (job,) = plan_jobs([tmp_path / "a.png"], tmp_path, tmp_path / "out")
    result = _collect(LostFuture(), job)
    assert (result.key, result.status, result.fatal) == ("a", "failed", False)
    assert result.error.startswith("KilledWorker: Attempted to run task")
    assert "allowed-failures" in result.details and str(job.input) in result.details


def test_local_cluster_with_tiny_model_loads_once_per_worker(
    folder: Path, tmp_path: Path, tiny_model: Path
) -> None:
    (folder / "broken.png").unlink()
    out = tmp_path / "out"
    s = Settings(model=str(tiny_model), working_size=128, max_depth=2, min_size=8)
    summary = run_batch(folder, out, s, workers=2, levels=True)
    assert summary.failed == {} and sorted(summary.done) == list(GOOD)
    assert _files(out) == _expected_files(GOOD, levels=True)
    by_worker: dict[str, list[ImageResult]] = {}
    for r in summary.results:
        by_worker.setdefault(r.worker, []).append(r)
    assert all(w.split(":")[-1] != str(os.getpid()) for w in by_worker)  # ran on workers
    # 3 images on 2 single-threaded workers: some worker did two, loading once.
    assert max(len(rs) for rs in by_worker.values()) >= 2
    for rs in by_worker.values():
        assert sum(r.loaded_model for r in rs) == 1
    record = json.loads((out / "img0.diffcut.json").read_text())
    assert record["batch_settings"]["model"] == str(tiny_model.resolve())
    assert record["batch_settings"]["device"] == "auto"
    import torch

    # device="auto": each worker uses its GPU when it has one.
    assert record["device_used"].startswith("cuda" if torch.cuda.is_available() else "cpu")
