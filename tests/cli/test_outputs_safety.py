"""The command line never loses a file: inputs untouched, one run's outputs whole or absent.

Kills are real: a forked child runs the command (imports are shared, so a run
takes a fraction of a second) and is stopped with SIGINT or SIGKILL.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_diffcut.cli.main import main
from napari_diffcut.files import outputs

FAST = ["--backbone", "pixels", "--working-size", "64", "--min-size", "2", "-q"]


@pytest.fixture
def u16(tmp_path: Path) -> Path:
    """A small two-region uint16 TIFF."""
    img = np.full((48, 64), 1000, np.uint16)
    img[:, 32:] = 30000
    path = tmp_path / "u16.tif"
    tifffile.imwrite(path, img)
    return path


@pytest.fixture(autouse=True)
def own_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private system temporary folder, so leaked temp stores can be counted."""
    import tempfile

    tmp = tmp_path / "systmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _forked(run: Callable[[], int], *, kill_after: float | None = None, sig: int = 0) -> int:
    """Run ``run`` in a forked child; optionally signal it after ``kill_after`` s.

    Returns the exit status, or minus the signal that ended it.
    """
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            code = run()
        except KeyboardInterrupt:  # SIGINT outside main's own handler
            code = 130
        except BaseException:  # noqa: BLE001 - the child's status says it
            import traceback

            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    if kill_after is not None:
        deadline = time.monotonic() + kill_after
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.005)
        os.kill(pid, sig)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# -- 1. no output name equals an input; two runs share no name ---------------------------


def test_levels_output_never_replaces_the_input(tmp_path: Path, u16: Path) -> None:
    src = tmp_path / "X.levels.tif"
    src.write_bytes(u16.read_bytes())
    before = _digest(src)
    rc = main(["segment", str(src), *FAST, "-o", str(tmp_path / "X.tif"), "--levels"])
    assert rc == 2
    assert _digest(src) == before
    assert not (tmp_path / "X.tif").exists() and not (tmp_path / "X.diffcut.json").exists()


def test_runs_with_different_names_share_no_output(tmp_path: Path, u16: Path) -> None:
    assert main(["segment", str(u16), *FAST, "-o", str(tmp_path / "A.tif")]) == 0
    first = _digest(tmp_path / "A.diffcut.json")
    assert main(["segment", str(u16), *FAST, "-o", str(tmp_path / "A.v2.tif"), "--levels"]) == 0
    assert _digest(tmp_path / "A.diffcut.json") == first
    record = json.loads((tmp_path / "A.v2.diffcut.json").read_text())
    assert record["output"] == str(tmp_path / "A.v2.tif")
    assert record["levels_output"] == str(tmp_path / "A.v2.levels.tif")


def test_record_of_another_output_is_never_replaced(
    tmp_path: Path, u16: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["segment", str(u16), *FAST, "-o", str(tmp_path / "A.tif")]) == 0
    first = _digest(tmp_path / "A.diffcut.json")
    rc = main(["segment", str(u16), *FAST, "-o", str(tmp_path / "A.diffcut.tif"), "--overwrite"])
    assert rc == 2 and "another output" in capsys.readouterr().err
    assert _digest(tmp_path / "A.diffcut.json") == first
    assert not (tmp_path / "A.diffcut.tif").exists()


# -- 2. --overwrite replaces only what this tool wrote -----------------------------------


def test_overwrite_refuses_a_folder_holding_the_input(tmp_path: Path, u16: Path) -> None:
    proj = tmp_path / "proj.zarr"
    proj.mkdir()
    img = proj / "img.tif"
    img.write_bytes(u16.read_bytes())
    (proj / "notes.txt").write_text("keep\n")
    rc = main(["segment", str(img), *FAST, "-o", str(proj), "--overwrite"])
    assert rc == 2
    assert _digest(img) == _digest(u16) and (proj / "notes.txt").read_text() == "keep\n"


def test_overwrite_refuses_a_folder_it_did_not_write(
    tmp_path: Path, u16: Path, capsys: pytest.CaptureFixture
) -> None:
    proj = tmp_path / "proj.zarr"
    proj.mkdir()
    (proj / "notes.txt").write_text("keep\n")
    rc = main(["segment", str(u16), *FAST, "-o", str(proj), "--overwrite"])
    assert rc == 2 and "not written by napari-diffcut" in capsys.readouterr().err
    assert sorted(p.name for p in proj.iterdir()) == ["notes.txt"]


def test_overwrite_refuses_a_file_it_did_not_write(tmp_path: Path, u16: Path) -> None:
    out = tmp_path / "mine.tif"
    out.write_bytes(b"user data")
    assert main(["segment", str(u16), *FAST, "-o", str(out), "--overwrite"]) == 2
    assert out.read_bytes() == b"user data"


def test_overwrite_replaces_its_own_outputs(tmp_path: Path, u16: Path) -> None:
    out = tmp_path / "A.tif"
    assert main(["segment", str(u16), *FAST, "-o", str(out), "--levels"]) == 0
    assert main(["segment", str(u16), *FAST, "-o", str(out), "--overwrite"]) == 0
    # The old levels would not match the new labels: they went with the rerun.
    assert sorted(p.name for p in tmp_path.glob("A.*")) == ["A.diffcut.json", "A.tif"]
    zarr_out = tmp_path / "B.zarr"
    assert main(["segment", str(u16), *FAST, "-o", str(zarr_out)]) == 0
    assert main(["segment", str(u16), *FAST, "-o", str(zarr_out), "--overwrite"]) == 0
    assert (zarr_out / "zarr.json").is_file() and _hidden(tmp_path) == []


# -- 5. a run's outputs appear together or not at all ------------------------------------


def test_interrupt_before_the_record_leaves_nothing(
    tmp_path: Path, u16: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "write_json", interrupted)
    rc = main(["segment", str(u16), *FAST, "-o", str(tmp_path / "A.tif"), "--levels"])
    assert rc == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["systmp", "u16.tif"]


def _kill_on_replace(n: int) -> None:
    """SIGKILL this process at the ``n``-th rename of a commit (mid-commit)."""
    real = os.replace
    calls = []

    def replace(a: object, b: object) -> None:
        calls.append(b)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGKILL)
        real(a, b)  # type: ignore[arg-type]

    outputs.os.replace = replace  # type: ignore[attr-defined]  # only in the forked child


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_sigkill_mid_commit_is_rolled_back_and_rerun_works(
    tmp_path: Path, u16: Path, n: int
) -> None:
    out = tmp_path / "A.tif"
    argv = ["segment", str(u16), *FAST, "-o", str(out), "--levels"]

    def killed() -> int:
        _kill_on_replace(n)
        return main(argv)

    assert _forked(killed) == -signal.SIGKILL
    # No orphan labels without their record; the rerun needs no --overwrite.
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.glob("A.*")) == [
        "A.diffcut.json", "A.levels.tif", "A.tif",
    ]
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("n", [6, 7, 8, 9, 10])
def test_sigkill_mid_overwrite_restores_the_old_outputs(
    tmp_path: Path, u16: Path, n: int
) -> None:
    out = tmp_path / "A.tif"
    argv = ["segment", str(u16), *FAST, "-o", str(out), "--levels"]
    assert main(argv) == 0
    before = {p.name: _digest(p) for p in tmp_path.glob("A.*")}

    def killed() -> int:
        # Renames: journal, 3 staged files, journal, then the commit's own (n > 5).
        _kill_on_replace(n)
        return main([*argv, "--overwrite", "--min-size", "8"])

    assert _forked(killed) == -signal.SIGKILL
    outputs.recover_stale(tmp_path)
    assert {p.name: _digest(p) for p in tmp_path.glob("A.*")} == before
    assert _hidden(tmp_path) == []


def test_sigkill_mid_write_leaves_no_hidden_file_after_rerun(
    tmp_path: Path, u16: Path
) -> None:
    out = tmp_path / "A.tif"
    argv = ["segment", str(u16), *FAST, "-o", str(out)]

    def killed() -> int:
        import napari_diffcut.files.io as io

        def dying(*args: object, **kwargs: object) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        io.atomic_write_bytes = dying  # type: ignore[assignment]
        return main(argv)

    assert _forked(killed) == -signal.SIGKILL
    assert [p.name for p in tmp_path.glob("A.*")] == []
    assert main(argv) == 0
    assert _hidden(tmp_path) == []


def _big(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    img = (rng.random((600, 600)) * 1000).astype(np.uint16)
    img[:300] += 20000
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, img)
    return path


TILED = [*FAST, "--tile-size", "256", "--memory-budget", "1"]


def test_killed_tiled_zarr_run_leaves_no_half_written_output(tmp_path: Path) -> None:
    big = _big(tmp_path)
    out = tmp_path / "big.zarr"
    argv = ["segment", str(big), *TILED, "-o", str(out)]

    def killed() -> int:
        from napari_diffcut.large import tiling

        real = tiling.relabel

        def dying(*args: object, **kwargs: object) -> None:
            os.kill(os.getpid(), signal.SIGKILL)
            real(*args, **kwargs)  # type: ignore[arg-type]

        tiling.relabel = dying  # type: ignore[assignment]  # dies once tiles are written
        return main(argv)

    assert _forked(killed) == -signal.SIGKILL
    assert not out.exists()
    assert main(argv) == 0
    assert (out / "zarr.json").is_file() and _hidden(tmp_path) == []


def test_interrupted_over_budget_run_leaks_no_temp_store(
    tmp_path: Path, own_tmpdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = _big(tmp_path)
    argv = ["segment", str(big), *TILED, "-o", str(tmp_path / "labels.tif")]
    from napari_diffcut.large import tiling

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(tiling, "relabel", interrupted)
        assert main(argv) == 130
    assert list(own_tmpdir.iterdir()) == []

    def killed_late() -> int:
        def dying(*args: object, **kwargs: object) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        tiling.relabel = dying  # type: ignore[assignment]
        return main(argv)

    assert _forked(killed_late) == -signal.SIGKILL
    assert len(list(own_tmpdir.iterdir())) == 1  # the dead run's store ...
    assert main(argv) == 0
    assert list(own_tmpdir.iterdir()) == []  # ... is recognised and removed
    assert _hidden(tmp_path) == []


# -- 6. failures to write are found before the work, and leave nothing --------------------


def _no_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_diffcut.large import dispatch

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("computed before checking the outputs")

    monkeypatch.setattr(dispatch, "iter_segment", never)


def test_unwritable_folder_fails_before_computing(
    tmp_path: Path, u16: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _no_compute(monkeypatch)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    rc = main(["segment", str(u16), *FAST, "-o", str(blocker / "out.tif")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("napari-diffcut: error: cannot write outputs")
    assert len(err.strip().splitlines()) == 1

    def denied(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)  # a read-only folder (tests run as root)
    rc = main(["segment", str(u16), *FAST, "-o", str(tmp_path / "ro" / "out.tif")])
    assert rc == 2 and "Permission denied" in capsys.readouterr().err


def test_full_disk_is_refused_before_computing(
    tmp_path: Path, u16: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import shutil
    from collections import namedtuple

    _no_compute(monkeypatch)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    rc = main(["segment", str(u16), *FAST, "-o", str(tmp_path / "A.tif")])
    assert rc == 2 and "not enough room" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["systmp", "u16.tif"]


def test_write_failure_is_one_line_and_leaves_nothing(
    tmp_path: Path, u16: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import napari_diffcut.files.io as io

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "write_labels", full)
    rc = main(["segment", str(u16), *FAST, "-o", str(tmp_path / "A.tif"), "--levels"])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and "nothing was written" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["systmp", "u16.tif"]


# -- the soak: 50 runs, killed at random moments ------------------------------------------


def _complete(folder: Path) -> None:
    """Every output present is whole and readable, and named by its record."""
    for record_path in folder.glob("*.diffcut.json"):
        record = json.loads(record_path.read_text())
        if record["output"].endswith(".zarr"):
            import zarr

            labels = np.asarray(zarr.open_array(record["output"], mode="r")[...])
        else:
            labels = tifffile.imread(record["output"])
        assert labels.shape == (48, 64) and labels.dtype == np.uint32
        if "levels_output" in record:
            levels = tifffile.imread(record["levels_output"])
            np.testing.assert_array_equal(levels[-1], labels)
    for tif in folder.glob("out*.tif"):
        if ".levels" not in tif.name:
            stem = tif.name[: -len(".tif")]
            assert (folder / f"{stem}.diffcut.json").is_file(), f"orphan {tif.name}"


def test_soak_random_kills_lose_nothing(tmp_path: Path, u16: Path, own_tmpdir: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    inputs = [folder / "a.tif", folder / "b.levels.tif"]
    for path in inputs:
        path.write_bytes(u16.read_bytes())
    digests = {p: _digest(p) for p in inputs}
    rng = random.Random(12)
    seen: list[int] = []
    # How long one forked run takes here (about a second cold, ~0.1 s once the parent
    # has imported everything): kill times are drawn over that span, so the soak
    # really kills runs on the way whatever ran before it.
    spans = []
    for k in range(2):  # the faster of two probes: the first may be cold
        start = time.perf_counter()
        probe = ["segment", str(inputs[0]), *FAST, "-o", str(tmp_path / f"probe{k}.tif")]
        assert _forked(lambda probe=probe: main(probe), kill_after=None, sig=signal.SIGKILL) == 0
        spans.append(time.perf_counter() - start)
    span = max(0.02, min(spans))
    for i in range(50):
        src = inputs[rng.randrange(2)]
        out = folder / rng.choice(["out.tif", "out.v2.tif", "b.tif", "out.zarr"])
        argv = ["segment", str(src), *FAST, "-o", str(out)]
        argv += ["--levels"] * (out.suffix == ".tif" and rng.random() < 0.5)
        argv += ["--overwrite"] * (rng.random() < 0.7)
        sig = rng.choice([signal.SIGINT, signal.SIGKILL])
        # Kill anywhere in a run, or (1 in 5) let it finish.
        after = None if rng.random() < 0.2 else rng.uniform(0.0, 0.9 * span)
        status = _forked(lambda argv=argv: main(argv), kill_after=after, sig=sig)
        assert status in (0, 2, 130, -signal.SIGKILL, -signal.SIGINT), (i, status)
        assert {p: _digest(p) for p in inputs} == digests
        seen.append(status)
    # Both ends are exercised: runs that finished and runs killed on the way.
    assert seen.count(0) >= 1 and sum(s < 0 or s == 130 for s in seen) >= 10, seen
    outputs.recover_stale(folder)  # what any next run does first
    _complete(folder)
    assert _hidden(folder) == [] and list(own_tmpdir.iterdir()) == []
    assert main(["segment", str(inputs[0]), *FAST, "-o", str(folder / "out.tif"),
                 "--overwrite"]) == 0
