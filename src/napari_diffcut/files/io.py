"""Reading images and writing label images and settings (no napari, no torch)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.errors import DiffCutError

TIFF_SUFFIXES = (".tif", ".tiff")
#: Software tag of the label TIFFs this tool writes (how ``--overwrite`` knows them).
TIFF_SOFTWARE = "napari-diffcut"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", *TIFF_SUFFIXES)
_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def read_image(path: str | os.PathLike[str]) -> NDArray[Any]:
    """Read a 2-D image (or a multi-page TIFF stack) from ``path``.

    Raises
    ------
    DiffCutError
        When the file does not exist or cannot be read as an image.
    """
    p = Path(path)
    if not p.is_file():
        raise DiffCutError(f"image file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            return np.asarray(tifffile.imread(p))
        import imageio.v3 as iio

        return np.asarray(iio.imread(p))
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a user-file problem
        raise DiffCutError(f"could not read {p} as an image: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; renamed into place when the block ends.

    On success the file is synced to disk, given the usual permissions (mkstemp
    makes 0600) and renamed over ``path``, so ``path`` is never half-written or
    empty. On any exception the temporary file is removed and ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())  # the final name never points at an empty file
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_labels(
    path: str | os.PathLike[str], labels: NDArray[np.integer], *, atomic: bool = True
) -> Path:
    """Write a label image (or a stack of levels) as a compressed TIFF."""
    import io as _io

    import tifffile

    p = Path(path)
    arr = np.asarray(labels)
    if arr.dtype.kind not in "ui":
        raise ValueError(f"labels must be an integer array, got dtype {arr.dtype}")
    buf = _io.BytesIO()
    tifffile.imwrite(buf, arr, compression="zlib", software=TIFF_SOFTWARE)
    if atomic:
        atomic_write_bytes(p, buf.getvalue())
    else:
        p.write_bytes(buf.getvalue())
    return p


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write JSON atomically (indent 2, sorted keys)."""
    p = Path(path)
    atomic_write_bytes(
        p, (json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n").encode()
    )
    return p


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
