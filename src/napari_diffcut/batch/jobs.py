"""Batch jobs: which images, where their outputs go, and whether they are done.

See :mod:`napari_diffcut.batch.runner` for the output layout and the rules
that make a batch safe to stop and restart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from numpy.typing import NDArray

from napari_diffcut.files.io import IMAGE_SUFFIXES

if TYPE_CHECKING:  # pragma: no cover
    from napari_diffcut.pipeline.settings import Settings


LABELS_SUFFIX = ".diffcut.tif"


LEVELS_SUFFIX = ".levels.tif"


RECORD_SUFFIX = ".diffcut.json"


MANIFEST_NAME = "diffcut-manifest.json"


LOG_NAME = "diffcut-batch.log"


LOCK_NAME = ".diffcut-batch.lock"


#: The manifest is rewritten at most this often (plus at the end): rewriting a
#: manifest of thousands of images after every image would cost O(n^2) bytes.
MANIFEST_INTERVAL_S = 5.0


_OUTPUT_SUFFIXES = (LABELS_SUFFIX, LEVELS_SUFFIX, RECORD_SUFFIX)


_GLOB_MAGIC = "*?["

#: Reads one image file into an array (default: :func:`~napari_diffcut.files.io.read_image`).
Reader = Callable[[Path], NDArray[Any]]


@dataclass(frozen=True)
class Job:
    """One image of a batch and the paths of its outputs.

    Attributes
    ----------
    key : str
        Input path relative to the input root, without suffix ("plate1/A01").
    input : Path
        Absolute path of the image.
    labels, levels, record : Path
        Absolute paths of the label TIFF, the levels TIFF and the settings JSON.
    replace : bool
        Outputs made with other settings exist and are to be replaced.
    """

    key: str
    input: Path
    labels: Path
    levels: Path
    record: Path
    replace: bool = False

    def outputs(self, levels: bool) -> list[Path]:
        """Output paths of this job, the settings JSON last."""
        return [self.labels, *([self.levels] if levels else []), self.record]


def _has_magic(text: str) -> bool:
    return any(c in text for c in _GLOB_MAGIC)


def _is_candidate(path: Path) -> bool:
    """A visible file that is not one of our own outputs."""
    name = path.name
    return path.is_file() and not name.startswith(".") and not name.endswith(_OUTPUT_SUFFIXES)


def find_images(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> tuple[Path, list[Path]]:
    """The images of a batch and the root their output names are relative to.

    Parameters
    ----------
    inputs : str, path or sequence of paths
        A folder (its image files, not its subfolders: ``.png``, ``.tif``...),
        a glob (``"data/**/*.tif"``; ``**`` recurses; any suffix the glob
        selects), a single file, or a list of files.

    Returns
    -------
    root : Path
        Absolute folder the output keys are relative to: the folder, the
        glob's leading part without wildcards, or the common parent of a list.
    paths : list of Path
        Absolute, sorted, unique image paths (our own outputs excluded).

    Raises
    ------
    ValueError
        When nothing matches.
    """
    if isinstance(inputs, (str, os.PathLike)):
        text = os.fspath(inputs)
        root, paths = _images_of_pattern(text)
    else:
        text = repr(list(inputs))
        root, paths = _listed_images([Path(x).expanduser() for x in inputs])
    if not paths:
        raise ValueError(
            f"inputs {text} matched no image (a folder is searched for {', '.join(IMAGE_SUFFIXES)})"
        )
    return root.resolve(), sorted({x.resolve() for x in paths})


def _images_of_pattern(text: str) -> tuple[Path, list[Path]]:
    """(root, paths) of a folder, a glob or a single file."""
    import glob

    p = Path(text).expanduser()
    if p.is_dir():
        paths = [c for c in p.iterdir() if c.suffix.lower() in IMAGE_SUFFIXES]
        return p, [c for c in paths if _is_candidate(c)]
    if _has_magic(text):
        # The root is the pattern's leading folders without wildcards, so that
        # "data/**/*.tif" mirrors the tree below data/ in the output folder.
        parts = p.parts
        first_magic = next(i for i, part in enumerate(parts) if _has_magic(part))
        root = Path(*parts[:first_magic]) if first_magic else Path()
        matches = [Path(m) for m in glob.glob(str(p), recursive=True)]
        return root, [m for m in matches if _is_candidate(m)]
    if p.is_file():
        return p.parent, [p]
    raise ValueError(
        f"inputs {text!r} is neither a folder, an image file nor a glob that "
        "matches files; pass a folder, a file or a quoted pattern such as "
        "'data/**/*.tif'"
    )


def _listed_images(paths: list[Path]) -> tuple[Path, list[Path]]:
    """(common parent folder, paths) of an explicit list of files."""
    missing = [str(x) for x in paths if not x.is_file()]
    if missing:
        raise ValueError(f"inputs: {len(missing)} file(s) not found, e.g. {missing[0]!r}")
    if not paths:
        return Path(), []
    return Path(os.path.commonpath([x.resolve().parent for x in paths])), paths


def output_key(path: Path, root: Path) -> str:
    """``root/plate1/A01.ome.tif`` -> ``"plate1/A01"`` (suffix and ``.ome`` dropped).

    Only the last suffix goes (and ``.ome`` before it), so ``img.001.tif`` and
    ``img.002.tif`` keep distinct keys.
    """
    rel = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
    stem = rel.name[: -len(rel.suffix)] if rel.suffix else rel.name
    if stem.lower().endswith(".ome"):
        stem = stem[:-4]
    return (rel.parent / stem).as_posix()


def plan_jobs(paths: Sequence[Path], root: Path, out_dir: Path) -> list[Job]:
    """One :class:`Job` per image, with output paths under ``out_dir``.

    Raises
    ------
    ValueError
        When two inputs map to the same output key (``a.png`` and ``a.tif`` in
        one folder), which would make them overwrite each other.
    """
    jobs: dict[str, Job] = {}
    for path in paths:
        key = output_key(path, root)
        if key in jobs:
            raise ValueError(
                f"inputs {jobs[key].input} and {path} would both write "
                f"{key}{LABELS_SUFFIX}; "
                "select one of them with a narrower glob (e.g. '*.tif')"
            )
        base = out_dir / key
        jobs[key] = Job(
            key=key,
            input=path,
            labels=base.with_name(base.name + LABELS_SUFFIX),
            levels=base.with_name(base.name + LEVELS_SUFFIX),
            record=base.with_name(base.name + RECORD_SUFFIX),
        )
    return list(jobs.values())


def settings_difference(record: Any, settings: Settings) -> str:
    """Empty when a settings record was made with ``settings``, else what differs.

    The requested settings are read from the record's ``batch_settings``. A
    setting absent there (written by an older version, before the setting
    existed) matches when its requested value is the default, which by
    construction reproduces the older behaviour.
    """
    from napari_diffcut.pipeline.settings import Settings

    saved = record.get("batch_settings") if isinstance(record, dict) else None
    if not isinstance(saved, dict):
        return "settings JSON has no batch_settings (not written by napari-diffcut batch)"
    # Compare in JSON form (lists, string keys), the form the record was saved in.
    wanted = _json_form(settings.as_dict())
    defaults = _json_form(Settings().as_dict())
    diffs = []
    for name, value in wanted.items():
        if name not in saved:
            if value != defaults.get(name):
                diffs.append(f"{name} absent (requested {value!r})")
        elif saved[name] != value:
            diffs.append(f"{name}={saved[name]!r} (requested {value!r})")
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return "; ".join(diffs[:3]) + more


def _json_form(data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(data))


def output_state(job: Job, settings: Settings, *, levels: bool) -> tuple[str, str]:
    """``("done" | "missing" | "conflict", reason)`` for a job's outputs.

    done: the settings JSON matches ``settings`` and the label TIFF (and,
    when ``levels``, a levels TIFF that the JSON records) exist. missing: no
    JSON (never run, failed, or stopped before its JSON was renamed into
    place), or the JSON matches but an image is gone or its levels were not
    written with it. conflict: the JSON is unreadable or was made with other
    settings.
    """
    if not job.record.is_file():
        return "missing", "no settings JSON"
    try:
        record = json.loads(job.record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return "conflict", f"unreadable settings JSON ({type(exc).__name__}: {exc})"
    diff = settings_difference(record, settings)
    if diff:
        return "conflict", diff
    if not job.labels.is_file():
        return "missing", "label TIFF missing"
    # The JSON names the levels TIFF only when it was written with these labels;
    # a levels file alone may be left from a run with other settings.
    if levels and not (job.levels.is_file() and "levels_output" in record):
        return "missing", "levels TIFF missing"
    return "done", ""
