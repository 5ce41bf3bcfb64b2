"""Freed memory kept for reuse while a model is loaded on the CPU (glibc's malloc).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with
fresh ``mmap`` pages and unmaps them on ``free``, and trims the heap top back
to the system. A 512 px run frees and re-allocates such buffers dozens of
times (VAE activations of 64 MiB, the 64 MiB attention accumulator, the
graph): every run faulted in about 2 GB of zeroed pages, 350,000-550,000
page faults and 1.2-2.5 s of kernel time on 2 cores. With mmap off and no
trimming, freed blocks stay in the heap and later runs reuse them (30,000
faults, 0.2 s): the end-to-end run was about 1 s faster (benchmarks/NOTES.md,
"Model side on the CPU"). jemalloc and tcmalloc, which Intel recommends for
PyTorch CPU inference, get the same by caching; this is glibc's own
``mallopt(3)``, set while it pays.

The price is memory: the process keeps the peak of a run's transient buffers
(about 1-2 GiB at 512 px, beside ~2 GiB of bf16 weights) instead of returning
them. So the setting lives exactly as long as a CPU model does:
:func:`keep_freed_memory` ties it to the loaded model, and when the last such
model is freed (``engine.unload()`` or garbage collection) glibc's defaults
come back and ``malloc_trim`` returns the kept memory to the system.
``NAPARI_DIFFCUT_KEEP_FREED_MEMORY=0`` turns it off; other C libraries
(macOS, Windows, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import weakref
from typing import Any

#: Environment switch: "0" leaves malloc's settings alone.
ENV_SWITCH = "NAPARI_DIFFCUT_KEEP_FREED_MEMORY"

# mallopt(3) parameter numbers (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
#: glibc's default number of mmapped chunks (DEFAULT_MMAP_MAX).
DEFAULT_MMAP_MAX = 65536
#: What glibc's dynamic thresholds grow to in a process that frees large blocks
#: (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, and twice it for trimming); setting any
#: of them turns the dynamic rule off, so these are restored explicitly.
RESTORED_MMAP_THRESHOLD = 32 << 20
RESTORED_TRIM_THRESHOLD = 64 << 20
_INT_MAX = 2**31 - 1

_lock = threading.Lock()
_holders = 0


def glibc() -> Any:
    """The process's C library if it is glibc (has ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # pragma: no cover - no dynamic loader
        return None
    needed = ("gnu_get_libc_version", "mallopt", "malloc_trim")
    return libc if all(hasattr(libc, name) for name in needed) else None


def holders() -> int:
    """Number of live objects currently keeping freed memory (0: glibc defaults)."""
    return _holders


def keep_freed_memory(owner: object) -> bool:
    """Keep freed heap memory for reuse for as long as ``owner`` lives.

    Parameters
    ----------
    owner : object
        Weak-referenceable object (a loaded CPU model); when the last owner is
        collected, glibc's defaults are restored and the kept memory trimmed.

    Returns
    -------
    bool
        Whether the setting applies (glibc, and not switched off by
        ``NAPARI_DIFFCUT_KEEP_FREED_MEMORY=0``).
    """
    global _holders
    libc = glibc()
    if libc is None or os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    with _lock:
        if _holders == 0:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX)
        _holders += 1
    weakref.finalize(owner, _release, libc)
    return True


def _release(libc: Any) -> None:
    """One owner fewer; the last one restores glibc's behaviour and trims."""
    global _holders
    with _lock:
        _holders -= 1
        if _holders > 0:
            return
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_MMAP_THRESHOLD, RESTORED_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, RESTORED_TRIM_THRESHOLD)
        libc.malloc_trim(0)
