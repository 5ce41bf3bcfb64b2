"""One run's outputs: planned up front, written aside, moved into place together.

A run of the command line or of one batch image writes up to five files
derived from one stem: ``-o A.tif`` gives ``A.tif``, ``A.levels.tif``,
``A.instances.tif`` + ``A.instances.csv`` (with ``--instances``) and
``A.diffcut.json``; ``-o A.v2.tif`` gives ``A.v2.tif``, ``A.v2.levels.tif``,
..., ``A.v2.diffcut.json`` (``NAME.diffcut.tif`` keeps the stem ``NAME``).

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

import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_diffcut.core.budget import format_bytes
from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.files.io import write_json, write_labels
from napari_diffcut.files.leftovers import (
    OLD,
    STAGING_PREFIX,
    STAGING_SUFFIX,
    recover_stale,
    roll_back,
    temp_store_prefix,
    temp_stores,
    write_journal,
)

__all__ = [
    "STAGING_PREFIX",
    "OutputPlan",
    "OutputRun",
    "instance_names",
    "output_names",
    "output_stem",
    "plan_outputs",
    "recover_stale",
    "temp_store_prefix",
    "write_run_outputs",
]
from napari_diffcut.files.owned import (
    absolute,
    aliases_input,
    exists,
    is_our_record,
    is_ours,
    load_record,
)

#: Suffixes whose stem is kept: ``NAME.diffcut.tif`` -> ``NAME``.
_OWN_SUFFIXES = (".diffcut.tif", ".diffcut.tiff", ".diffcut.zarr")
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
    instances, instance_table : Path or None
        Instance labels (``STEM.instances.tif``) and their per-instance CSV
        (``STEM.instances.csv``), when asked for.
    """

    labels: Path
    record: Path
    levels: Path | None = None
    stale: tuple[Path, ...] = ()
    need_bytes: int = 0
    instances: Path | None = None
    instance_table: Path | None = None

    @property
    def folder(self) -> Path:
        """The folder all outputs live in."""
        return self.labels.parent

    @property
    def outputs(self) -> list[Path]:
        """Every output path, the record JSON last (the commit order)."""
        extra = [p for p in (self.levels, self.instances, self.instance_table) if p]
        return [self.labels, *extra, self.record]


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


def instance_names(labels: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(instance labels TIFF, per-instance CSV) of a run that writes ``labels``.

    Examples
    --------
    >>> [p.name for p in instance_names("out/cells.diffcut.tif")]
    ['cells.instances.tif', 'cells.instances.csv']
    """
    p = Path(os.fspath(labels))
    stem = output_stem(p)
    return p.with_name(stem + ".instances.tif"), p.with_name(stem + ".instances.csv")


def plan_outputs(
    labels: str | os.PathLike[str],
    *,
    inputs: Sequence[str | os.PathLike[str]],
    levels: bool = False,
    instances: bool = False,
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
    instances : bool
        The run writes instance labels and their CSV too (:func:`instance_names`).
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
    lab, lev, rec = (absolute(p) for p in (lab, lev, rec))
    ins = [absolute(Path(os.fspath(x))) for x in inputs]
    inst, table = (absolute(p) for p in instance_names(lab))
    recover_stale(lab.parent)
    wanted = [lab, *([lev] if levels else []), *([inst, table] if instances else []), rec]
    for path in wanted:
        _check_not_input(path, ins)
        if exists(path):
            _check_replaceable(path, overwrite, rec, owned=owned)
    if exists(rec) and is_our_record(rec):
        _check_same_run(rec, lab)
    # Our older outputs of this stem that this run does not rewrite would no
    # longer match the new labels: the commit removes them.
    unwritten = [*([] if levels else [lev]), *([] if instances else [inst, table])]
    stale = tuple(
        p for p in unwritten
        if overwrite and exists(p) and not aliases_input(p, ins) and is_ours(p, rec, owned)
    )
    return OutputPlan(
        lab, rec, lev if levels else None, stale, int(need_bytes),
        inst if instances else None, table if instances else None,
    )


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
            write_journal(path, "writing", [p.name for p in self.plan.outputs])
        except OSError as exc:
            shutil.rmtree(path, ignore_errors=True)
            raise DiffCutError(f"cannot write outputs in {folder}: {_reason(exc)}") from None
        self.staging = path
        self._check_room()
        if self._own_temp:
            self._temp_before = set(temp_stores(os.getpid()))
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
        instances: tuple[Any, str] | None = None,
    ) -> None:
        """Write labels, levels and the record into the staging folder.

        ``instances`` is (instance labels, CSV text) when the plan has them.

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
            if plan.instances is not None and plan.instance_table is not None:
                if instances is None:
                    raise DiffCutError("the plan has instance outputs but no instances were given")
                writer(self.staged(plan.instances), instances[0])
                self.staged(plan.instance_table).write_text(instances[1], encoding="utf-8")
                record["instances_output"] = str(plan.instances)
                record["instances_table"] = str(plan.instance_table)
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
            write_journal(staging, "ready", [p.name for p in plan.outputs])
            (staging / OLD).mkdir(exist_ok=True)
            _move_aside(plan.record, staging)
            for final in plan.outputs[:-1]:
                _move_aside(final, staging)
                os.replace(self.staged(final), final)
            for old in plan.stale:
                _move_aside(old, staging)
            os.replace(self.staged(plan.record), plan.record)
        except OSError as exc:
            roll_back(staging)
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
            for path in set(temp_stores(os.getpid())) - self._temp_before:
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
                f"{format_bytes(need)}, {format_bytes(free)} free; free some space or "
                "choose another folder"
            )


# -- checks of the plan ---------------------------------------------------------------


def _check_not_input(path: Path, inputs: Sequence[Path]) -> None:
    if aliases_input(path, inputs):
        raise DiffCutError(
            f"output {path} would overwrite the input image; choose another output name "
            "(inputs are never written)"
        )


def _check_replaceable(path: Path, overwrite: bool, record: Path, *, owned: bool) -> None:
    if not overwrite:
        raise DiffCutError(f"{path} exists; pass --overwrite to replace it or choose another name")
    if not is_ours(path, record, owned):
        raise DiffCutError(
            f"{path} exists and was not written by napari-diffcut; --overwrite replaces "
            "napari-diffcut outputs only: move it or choose another name"
        )


def _check_same_run(record: Path, labels: Path) -> None:
    """A record JSON of another run's labels is never reused (its labels would lose it)."""
    data = load_record(record)
    other = data.get("output") if data else None
    if isinstance(other, str) and Path(other).name != labels.name:
        raise DiffCutError(
            f"{record} is the record of another output ({other}); choose another name "
            "(two runs never share an output name)"
        )


def _move_aside(final: Path, staging: Path) -> None:
    if exists(final):
        os.replace(final, staging / OLD / final.name)


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
