"""Model files checked before torch reads them: damaged weights, absurd configs, pickles.

:func:`check_model_files` runs on a local diffusers folder before
``from_pretrained``: every ``.safetensors`` file must hold its whole header
and data (a truncated download is reported as damaged, with the file), and
the UNet config must describe weights that fit in memory.
:func:`load_error` turns what a pickled file raises on loading into one line.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from napari_diffcut.core.budget import check_fits, model_bytes
from napari_diffcut.core.errors import DiffCutError

#: Parts of a diffusers folder whose weights are loaded.
PARTS = ("unet", "vae", "text_encoder")
#: Largest safetensors header read (the format's own limit is 100 MB).
MAX_HEADER = 100 * 2**20


def check_safetensors(path: Path) -> None:
    """Raise DiffCutError when ``path`` is not a whole safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _damaged(path, f"{size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise _damaged(path, f"header of {n} bytes in a file of {size} bytes (truncated?)")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, RecursionError):
            raise _damaged(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    ends = [
        t["data_offsets"][1] for k, t in header.items()
        if k != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets", ())) == 2
    ]
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise _damaged(path, f"{size} bytes, its header says {need} (truncated download?)")


def check_model_files(model: str | os.PathLike[str], *, itemsize: int = 4) -> None:
    """Check a local diffusers folder's weights and UNet size before loading it.

    Hub ids (no such folder) are left to the loader.

    Raises
    ------
    DiffCutError
        A damaged safetensors file (named), or a UNet whose weights would not fit.
    """
    root = Path(os.fspath(model)).expanduser()
    if not root.is_dir():
        return
    for part in PARTS:
        for path in sorted((root / part).glob("*.safetensors")):
            check_safetensors(path)
    config = root / "unet" / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return
    widths = data.get("block_out_channels")
    if not isinstance(widths, list) or not all(isinstance(c, int | float) for c in widths):
        return
    if not all(math.isfinite(c) and c > 0 for c in widths):
        raise DiffCutError(f"{config}: block_out_channels {widths} must be positive numbers")
    layers = data.get("layers_per_block", 2)
    layers = int(layers[0] if isinstance(layers, list) and layers else layers or 2)
    reason = check_fits(
        model_bytes([int(c) for c in widths], layers, itemsize),
        f"the UNet of {root} (block_out_channels {widths})",
        "check the model's unet/config.json, or use a smaller model",
    )
    if reason:
        raise DiffCutError(reason)


def load_error(model: str | os.PathLike[str], exc: BaseException) -> DiffCutError | None:
    """One line for a pickled weights file that cannot be loaded safely (else None)."""
    import pickle

    chain: BaseException | None = exc
    while chain is not None and not (
        isinstance(chain, pickle.UnpicklingError) or _raised_by_unpickler(chain)
    ):
        chain = chain.__cause__ or chain.__context__
    if chain is None:
        return None
    root = Path(os.fspath(model)).expanduser()
    found = (p for part in PARTS for p in (root / part).glob("*.bin")) if root.is_dir() else ()
    files = sorted(str(p) for p in found)
    which = files[0] if len(files) == 1 else (", ".join(files) or str(model))
    return DiffCutError(
        f"{which} can't be loaded safely: it is a pickle that needs code to load "
        f"({str(chain).splitlines()[0] if str(chain) else 'UnpicklingError'}); "
        "convert the model to safetensors"
    )


def _raised_by_unpickler(exc: BaseException) -> bool:
    """Whether ``exc`` came out of torch's unpickler (garbage in a .bin raises
    IndexError or EOFError there, not UnpicklingError)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    return any(
        f.filename.endswith(("_weights_only_unpickler.py", "torch/serialization.py"))
        for f in frames
    )


def _damaged(path: Path, why: str) -> DiffCutError:
    return DiffCutError(f"model file {path} is damaged: {why}; download it again")
