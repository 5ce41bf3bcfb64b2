"""Freed memory kept for reuse while a model is loaded on the CPU (glibc's malloc).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with
fresh ``mmap`` pages and unmaps them on ``free``, and trims the heap top back
to the system. A 512 px run frees and re-allocates such buffers dozens of
times (VAE activations of 64 MiB, the 64 MiB attention accumulator, the
graph): every run faulted in about 2 GB of zeroed pages, 350,000-550,000
page faults and 1.2-2.5 s of kernel time on 2 cores. With mmap off and no
trimming, freed blocks stay in the heap and later runs reuse them (30,000-50,000
faults, 0.2 s): the end-to-end run was 0.5-1 s faster (benchmarks/NOTES.md,
"Model side on the CPU"). jemalloc and tcmalloc, which Intel recommends for
PyTorch CPU inference, get the same by caching; this is glibc's own
``mallopt(3)``, set while it pays.

Where it works: on the main thread (the command line, scripts, notebooks). A
thread other than the main one allocates from its own glibc arena, whose heaps
are at most 64 MiB, so its blocks of 64 MiB and more are mapped fresh whatever
the setting (the napari widget runs on a worker thread: there only smaller
blocks are reused). ``MALLOC_ARENA_MAX=1`` in the environment of the process
(napari's, set before it starts) puts every thread on the main arena, and the
worker threads then reuse everything too (README, "Performance").

The price is memory: the setting is process-wide, so the process keeps what it
frees, at least the peak of a run's transient buffers (about 1-2 GiB at 512 px,
beside ~2 GiB of bf16 weights; torch's 64-byte-aligned blocks can take a few
runs to settle, as glibc 2.36's ``memalign`` splits free blocks). So the
setting lives exactly as long as a CPU model does: :func:`keep_freed_memory`
ties it to the loaded model, and when the last such model is freed
(``engine.unload()`` or garbage collection) ``M_MMAP_MAX`` gets its default
back, the thresholds are set to what glibc's dynamic rule grows them to in such
a process (32 MiB, trim at 64 MiB; any ``mallopt`` turns that rule off for
good), and ``malloc_trim`` returns the kept memory. It is not applied when
``NAPARI_DIFFCUT_KEEP_FREED_MEMORY=0``, when the user tuned malloc already
(``MALLOC_*_`` variables or ``glibc.malloc`` tunables), or with another C
library (macOS, Windows, musl).
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


#: glibc's environment variables for the parameters this module sets (MALLOC_ARENA_MAX
#: is not among them: it works with them, README "Performance").
USER_MALLOC_VARIABLES = (
    "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
)


def user_tuned_malloc() -> bool:
    """Whether the environment already sets glibc malloc parameters (left as they are)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(n in os.environ for n in USER_MALLOC_VARIABLES) or "glibc.malloc." in tunables


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
        Whether the setting applies (glibc, not switched off by
        ``NAPARI_DIFFCUT_KEEP_FREED_MEMORY=0``, malloc not tuned by the user).
    """
    global _holders
    libc = glibc()
    if libc is None or os.environ.get(ENV_SWITCH, "1").strip() == "0" or user_tuned_malloc():
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
