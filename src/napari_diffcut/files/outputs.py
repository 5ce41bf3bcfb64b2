"""One run's outputs: planned up front, written aside, moved into place together.

A run of the command line or of one batch image writes up to three files
derived from one stem: ``-o A.tif`` gives ``A.tif``, ``A.levels.tif`` and
``A.diffcut.json``; ``-o A.v2.tif`` gives ``A.v2.tif``, ``A.v2.levels.tif``,
``A.v2.diffcut.json`` (``NAME.diffcut.tif`` keeps the stem ``NAME``).

:func:`plan_outputs` checks every name before anything is computed: none may
be (or alias, through a link or a folder) an input; an existing name is
replaced only with ``overwrite`` and only when it is recognisably a
napari-diffcut output (a record JSON, a label TIFF or label Zarr this tool
wrote), never a folder holding anything else. :class:`OutputRun` then creates
one hidden staging folder ``.napari-diffcut-run-<pid>-<random>.tmp`` beside
the outputs (which proves the folder writable and checks its free space),
the outputs are written there, and :meth:`OutputRun.commit` renames them into
place with the record JSON last: its presence marks a complete set.

An interrupted run (SIGINT, SIGKILL, full disk) leaves at most its staging
folder. The next run in that folder recognises staging folders of dead
processes and undoes them: a run stopped before its record was in place is
rolled back (old outputs it had moved aside come back), so a rerun after a
crash just works. Temporary label stores of dead runs in the system
temporary folder (``napari-diffcut-<pid>-*``) are removed too.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.files.io import TIFF_SOFTWARE, write_json, write_labels

#: Hidden staging folders of runs: ``.napari-diffcut-run-<pid>-<token>.tmp``.
STAGING_PREFIX = ".napari-diffcut-run-"
STAGING_SUFFIX = ".tmp"
#: Journal inside a staging folder: which outputs, and whether all are written.
JOURNAL = ".journal.json"
#: Sub-folder of a staging folder that holds the outputs a commit replaces.
OLD = ".old"
#: Suffixes whose stem is kept: ``NAME.diffcut.tif`` -> ``NAME``.
_OWN_SUFFIXES = (".diffcut.tif", ".diffcut.tiff", ".diffcut.zarr")
_STAGING_RE = re.compile(re.escape(STAGING_PREFIX) + r"(\d+)-[0-9a-f]+" + re.escape(STAGING_SUFFIX))
_TEMP_STORE_RE = re.compile(r"napari-diffcut-(\d+)-")
_MAX_RECORD_BYTES = 16 * 2**20
_ROOM_MARGIN = 1 << 20


@dataclass(frozen=True)
class OutputPlan:
    """The names of one run's outputs, checked before anything is computed.

    Attributes
    ----------
    labels : Path
        Label image (``.tif`` or a ``.zarr`` folder).
    record : Path
        Settings record JSON, written last.
    levels : Path or None
        Every hierarchy level (``STEM.levels.tif``), when asked for.
    stale : tuple of Path
        Our older outputs of this stem that the commit removes because this run
        does not rewrite them (a levels TIFF that would not match new labels).
    need_bytes : int
        Free space the outputs may take (checked when the run starts).
    """

    labels: Path
    record: Path
    levels: Path | None = None
    stale: tuple[Path, ...] = ()
    need_bytes: int = 0

    @property
    def folder(self) -> Path:
        """The folder all outputs live in."""
        return self.labels.parent

    @property
    def outputs(self) -> list[Path]:
        """Every output path, the record JSON last (the commit order)."""
        return [self.labels, *([self.levels] if self.levels else []), self.record]


def output_stem(labels: str | os.PathLike[str]) -> str:
    """The stem all names of a run derive from.

    Examples
    --------
    >>> output_stem("A.v2.tif"), output_stem("cells.diffcut.tif"), output_stem("p.zarr")
    ('A.v2', 'cells', 'p')
    """
    name = Path(os.fspath(labels)).name
    for suffix in _OWN_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name[: -len(Path(name).suffix)] if Path(name).suffix else name


def output_names(labels: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """(labels, levels TIFF, record JSON) of a run that writes ``labels``."""
    p = Path(os.fspath(labels))
    stem = output_stem(p)
    if not stem:
        raise DiffCutError(f"output {p} has no file name stem; name it like 'cells.tif'")
    return p, p.with_name(stem + ".levels.tif"), p.with_name(stem + ".diffcut.json")


def plan_outputs(
    labels: str | os.PathLike[str],
    *,
    inputs: Sequence[str | os.PathLike[str]],
    levels: bool = False,
    overwrite: bool = False,
    need_bytes: int = 0,
    names: tuple[Path, Path, Path] | None = None,
    owned: bool = False,
) -> OutputPlan:
    """Plan and check one run's output names (nothing is written).

    Parameters
    ----------
    labels : str or path-like
        The label output; the levels TIFF and record JSON are named after it.
    inputs : sequence of path-like
        Files the run reads: no output may be, alias or contain one.
    levels : bool
        The run writes every hierarchy level too.
    overwrite : bool
        Replace existing napari-diffcut outputs of these names.
    need_bytes : int
        Free space the outputs may take.
    names : (labels, levels, record), optional
        Explicit names instead of :func:`output_names` (the batch's layout).
    owned : bool
        The names belong to the caller (a batch's output folder, its own
        suffixes): with ``overwrite``, any regular file there may be replaced,
        e.g. labels left without a JSON by an older version. Folders and links
        never are.

    Returns
    -------
    OutputPlan

    Raises
    ------
    DiffCutError
        An output would replace an input, an existing output without
        ``overwrite``, or something that napari-diffcut did not write.
    """
    lab, lev, rec = names or output_names(labels)
    lab, lev, rec = (_absolute(p) for p in (lab, lev, rec))
    ins = [_absolute(Path(os.fspath(x))) for x in inputs]
    recover_stale(lab.parent)
    wanted = [lab, *([lev] if levels else []), rec]
    for path in wanted:
        _check_not_input(path, ins)
        if _exists(path):
            _check_replaceable(path, overwrite, rec, owned=owned)
    if _exists(rec) and _is_our_record(rec):
        _check_same_run(rec, lab)
    stale = tuple(
        p for p in ([] if levels else [lev])
        if overwrite and _exists(p) and not _aliases_input(p, ins) and _is_ours(p, rec, owned)
    )
    return OutputPlan(lab, rec, lev if levels else None, stale, int(need_bytes))


def write_run_outputs(
    plan: OutputPlan,
    labels: Any,
    levels: Any | None,
    record: dict[str, Any],
    *,
    write: Callable[[Path, Any], Any] | None = None,
) -> list[Path]:
    """Write a planned run's outputs together: staged, then renamed into place.

    Parameters
    ----------
    plan : OutputPlan
        From :func:`plan_outputs`.
    labels : array-like
        Label image (written with ``write``).
    levels : array-like or None
        Stack of levels (required when the plan has a levels name).
    record : dict
        Settings record; "output" (and "levels_output") are set to the final names.
    write : callable, optional
        ``write(path, array)``; default :func:`napari_diffcut.files.io.write_labels`.

    Returns
    -------
    list of Path
        The outputs written, the record JSON last.
    """
    with OutputRun(plan) as run:
        run.write(labels, levels, record, write=write)
        return run.commit()


class OutputRun:
    """A run's staging folder: write outputs into it, then :meth:`commit` them.

    Used as a context manager around the whole run (computing included):
    leaving the block without a commit, by any exception or interrupt,
    removes the staging folder and leaves every existing file as it was.

    Parameters
    ----------
    plan : OutputPlan
        The checked names.
    own_temp : bool
        Also remove temporary label stores (``napari-diffcut-<pid>-*`` in the
        system temporary folder) this process creates during the run when it
        fails. Only for single-run processes such as the command line.
    """

    def __init__(self, plan: OutputPlan, *, own_temp: bool = False) -> None:
        self.plan = plan
        self.staging: Path | None = None
        self._own_temp = own_temp
        self._temp_before: set[Path] = set()

    def __enter__(self) -> OutputRun:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def start(self) -> Path:
        """Create the staging folder (proves the folder writable) and check free space."""
        folder = self.plan.folder
        token = secrets.token_hex(4)
        path = folder / f"{STAGING_PREFIX}{os.getpid()}-{token}{STAGING_SUFFIX}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.mkdir()
            _write_journal(path, "writing", self.plan)
        except OSError as exc:
            shutil.rmtree(path, ignore_errors=True)
            raise DiffCutError(f"cannot write outputs in {folder}: {_reason(exc)}") from None
        self.staging = path
        self._check_room()
        if self._own_temp:
            self._temp_before = set(_temp_stores(os.getpid()))
        return path

    def staged(self, final: Path) -> Path:
        """Where to write the output that ends up at ``final``."""
        if self.staging is None:
            raise RuntimeError("OutputRun.start() first")
        return self.staging / final.name

    def write(
        self,
        labels: Any,
        levels: Any | None,
        record: dict[str, Any],
        *,
        write: Callable[[Path, Any], Any] | None = None,
    ) -> None:
        """Write labels, levels and the record into the staging folder.

        A labels folder already staged (a ``.zarr`` the run wrote in place)
        is kept. Any OSError becomes a one-line DiffCutError.
        """
        writer = write or (lambda p, a: write_labels(p, a, atomic=False))
        plan = self.plan
        record = dict(record, output=str(plan.labels))
        try:
            target = self.staged(plan.labels)
            if not target.exists():
                writer(target, labels)
            if plan.levels is not None:
                if levels is None:
                    raise DiffCutError("the plan has a levels output but no levels were given")
                writer(self.staged(plan.levels), levels)
                record["levels_output"] = str(plan.levels)
            write_json(self.staged(plan.record), record)
        except OSError as exc:
            self.abort()
            raise DiffCutError(
                f"could not write outputs in {plan.folder}: {_reason(exc)}; nothing was written"
            ) from None

    def commit(self) -> list[Path]:
        """Rename the staged outputs into place, the record JSON last.

        Returns
        -------
        list of Path
            The outputs, record last.
        """
        if self.staging is None:
            raise RuntimeError("OutputRun.start() first")
        plan, staging = self.plan, self.staging
        try:
            _sync_tree(staging)
            _write_journal(staging, "ready", plan)
            (staging / OLD).mkdir(exist_ok=True)
            _move_aside(plan.record, staging)
            for final in plan.outputs[:-1]:
                _move_aside(final, staging)
                os.replace(self.staged(final), final)
            for old in plan.stale:
                _move_aside(old, staging)
            os.replace(self.staged(plan.record), plan.record)
        except OSError as exc:
            _roll_back(staging)
            self.staging = None
            raise DiffCutError(
                f"could not move outputs into {plan.folder}: {_reason(exc)}; nothing was written"
            ) from None
        self.staging = None
        shutil.rmtree(staging, ignore_errors=True)
        _fsync_dir(plan.folder)
        return plan.outputs

    def abort(self) -> None:
        """Remove the staging folder (no-op after a commit)."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if self._own_temp:
            for path in set(_temp_stores(os.getpid())) - self._temp_before:
                shutil.rmtree(path, ignore_errors=True)
            self._own_temp = False

    def _check_room(self) -> None:
        need = self.plan.need_bytes
        if need <= 0:
            return
        free = shutil.disk_usage(self.plan.folder).free
        if free < need + _ROOM_MARGIN:
            self.abort()
            raise DiffCutError(
                f"not enough room in {self.plan.folder}: the outputs may take "
                f"{_size(need)}, {_size(free)} free; free some space or choose another folder"
            )


# -- leftovers of interrupted runs ---------------------------------------------------


def recover_stale(folder: Path) -> list[Path]:
    """Undo the staging folders of dead runs in ``folder``; remove their temp stores.

    A run whose record JSON was not yet in place is rolled back (outputs it
    moved in are removed, outputs it moved aside come back); one whose record
    is in place is complete and only its staging folder goes. Never raises.

    Returns
    -------
    list of Path
        The staging folders removed.
    """
    removed = []
    try:
        entries = list(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        entries = []
    for path in entries:
        match = _STAGING_RE.fullmatch(path.name)
        if match and _is_real_dir(path) and not _alive(int(match.group(1)), path):
            _roll_back(path)
            removed.append(path)
    for store in _temp_stores(None):
        match = _TEMP_STORE_RE.match(store.name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(store, ignore_errors=True)
    return removed


def temp_store_prefix() -> str:
    """Prefix of this process's temporary label stores (recognised when it dies)."""
    return f"napari-diffcut-{os.getpid()}-"


def _temp_stores(pid: int | None) -> list[Path]:
    """Our temporary label stores in the system temporary folder (of ``pid``, or all)."""
    root = Path(tempfile.gettempdir())
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    out = []
    for path in entries:
        match = _TEMP_STORE_RE.match(path.name)
        if match and (pid is None or int(match.group(1)) == pid) and _is_real_dir(path):
            try:
                if path.lstat().st_uid == os.getuid():
                    out.append(path)
            except OSError:
                continue
    return out


def _alive(pid: int, staging: Path | None = None) -> bool:
    """Whether the run ``pid`` (on this host, per the journal) may still be writing."""
    if staging is not None:
        host = _read_journal(staging).get("host")
        if host not in (None, socket.gethostname()):
            return True  # another machine's run: not ours to judge
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _roll_back(staging: Path) -> None:
    """Undo an interrupted commit (or a run that never committed), then remove ``staging``."""
    journal = _read_journal(staging)
    if journal.get("state") == "ready":
        names = [str(n) for n in journal.get("outputs", [])]
        folder = staging.parent
        record_in_place = bool(names) and not (staging / names[-1]).exists()
        if not record_in_place:
            for name in names[:-1]:
                if not (staging / name).exists() and _exists(folder / name):
                    _remove(folder / name)  # moved in by the interrupted commit
            old = staging / OLD
            for entry in sorted(old.iterdir()) if old.is_dir() else []:
                if not _exists(folder / entry.name):
                    os.replace(entry, folder / entry.name)
    shutil.rmtree(staging, ignore_errors=True)


def _write_journal(staging: Path, state: str, plan: OutputPlan) -> None:
    data = {
        "state": state,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "outputs": [p.name for p in plan.outputs],
    }
    tmp = staging / (JOURNAL + ".new")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, staging / JOURNAL)


def _read_journal(staging: Path) -> dict[str, Any]:
    try:
        data = json.loads((staging / JOURNAL).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _move_aside(final: Path, staging: Path) -> None:
    if _exists(final):
        os.replace(final, staging / OLD / final.name)


# -- which existing files may be replaced ----------------------------------------------


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(os.fspath(path.expanduser())))


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False


def _aliases_input(path: Path, inputs: Sequence[Path]) -> bool:
    """``path`` is an input, a link to one, or a folder holding one (or inside one)."""
    real = Path(os.path.realpath(path))
    for inp in inputs:
        real_in = Path(os.path.realpath(inp))
        if real == real_in or real_in.is_relative_to(real) or real.is_relative_to(real_in):
            return True
        try:
            if path.exists() and inp.exists() and os.path.samefile(path, inp):
                return True  # a hard link
        except OSError:
            continue
    return False


def _check_not_input(path: Path, inputs: Sequence[Path]) -> None:
    if _aliases_input(path, inputs):
        raise DiffCutError(
            f"output {path} would overwrite the input image; choose another output name "
            "(inputs are never written)"
        )


def _check_replaceable(path: Path, overwrite: bool, record: Path, *, owned: bool) -> None:
    if not overwrite:
        raise DiffCutError(f"{path} exists; pass --overwrite to replace it or choose another name")
    if not _is_ours(path, record, owned):
        raise DiffCutError(
            f"{path} exists and was not written by napari-diffcut; --overwrite replaces "
            "napari-diffcut outputs only: move it or choose another name"
        )


def _check_same_run(record: Path, labels: Path) -> None:
    """A record JSON of another run's labels is never reused (its labels would lose it)."""
    data = _load_record(record)
    other = data.get("output") if data else None
    if isinstance(other, str) and Path(other).name != labels.name:
        raise DiffCutError(
            f"{record} is the record of another output ({other}); choose another name "
            "(two runs never share an output name)"
        )


def _is_ours(path: Path, record: Path, owned: bool = False) -> bool:
    """Whether ``path`` is recognisably a napari-diffcut output (any file when ``owned``)."""
    if path.is_symlink():
        return False
    if owned and path.is_file():
        return True
    if path == record or path.suffix.lower() == ".json":
        return _is_our_record(path)
    if path.suffix.lower() == ".zarr":
        return _is_label_zarr(path)
    if not path.is_file():
        return False
    return _is_our_tiff(path) or _named_by_record(path, record)


def _load_record(path: Path) -> dict[str, Any] | None:
    try:
        if not stat.S_ISREG(path.lstat().st_mode) or path.stat().st_size > _MAX_RECORD_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _is_our_record(path: Path) -> bool:
    data = _load_record(path)
    return data is not None and "napari_diffcut_version" in data


def _named_by_record(path: Path, record: Path) -> bool:
    """A label file named as its output by the record beside it (outputs of older versions)."""
    data = _load_record(record) if _is_our_record(record) else None
    if not data:
        return False
    named = {Path(str(data[k])).name for k in ("output", "levels_output") if data.get(k)}
    return path.name in named


def _is_our_tiff(path: Path) -> bool:
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return tif.pages[0].software == TIFF_SOFTWARE  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def _is_label_zarr(path: Path) -> bool:
    """A Zarr folder holding only array metadata and chunks (a label store or result)."""
    from napari_diffcut.files.store import is_result_store

    if not _is_real_dir(path):
        return False
    if is_result_store(path):
        return True
    try:
        meta = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(meta, dict) or meta.get("node_type") != "array":
        return False
    for root, dirs, files in os.walk(path):
        rel = Path(root).relative_to(path).parts
        if rel and (rel[0] != "c" or not all(p.isdigit() for p in rel[1:])):
            return False
        if any(f != "zarr.json" and not (rel and f.isdigit()) for f in files):
            return False
        if not rel and any(d != "c" for d in dirs):
            return False
    return True


def _remove(path: Path) -> None:
    if _is_real_dir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sync_tree(root: Path) -> None:
    """fsync every staged file, so a renamed output never points at unwritten data."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            try:
                with open(os.path.join(folder, name), "rb+") as fh:
                    os.fsync(fh.fileno())
            except OSError:
                continue


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    """The OS's words for a failure ("No space left on device"), without a traceback."""
    return exc.strerror or str(exc)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"
