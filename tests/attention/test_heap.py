"""Freed memory kept for reuse while a CPU model lives (glibc mallopt), and given back after."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from napari_diffcut.attention import heap

needs_glibc = pytest.mark.skipif(heap.glibc() is None, reason="glibc malloc only")


class Owner:
    """A weak-referenceable stand-in for a loaded model."""


#: Page faults of allocating, touching and freeing 64 MiB ten times in a row, in a fresh
#: interpreter, the way torch's CPU allocator does it (posix_memalign, 64-byte aligned;
#: numpy would put such arrays on huge pages); then the same once the owner is gone.
PROBE = textwrap.dedent(
    """
    import ctypes, gc, resource, sys
    from napari_diffcut.attention import heap

    libc = ctypes.CDLL(None)
    libc.free.argtypes = [ctypes.c_void_p]

    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = ctypes.c_void_p()
        assert libc.posix_memalign(ctypes.byref(block), 64, 64 << 20) == 0
        ctypes.memset(block, 1, 64 << 20)
        libc.free(block)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    owner = type("Owner", (), {})()
    kept = heap.keep_freed_memory(owner) if sys.argv[1] == "keep" else False
    during = [faults() for _ in range(10)]
    del owner
    gc.collect()
    print(kept, during[-1], heap.holders(), faults(), min(during))
    """
)


def _probe(mode: str, env: dict[str, str] | None = None) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
        env={**os.environ, **(env or {})},
    )
    return out.stdout.split()


@needs_glibc
def test_freed_blocks_are_reused_while_an_owner_lives_and_returned_after() -> None:
    # glibc 2.36's memalign splits free blocks, so the heap takes a few rounds to settle;
    # by the tenth the block comes back without a fault.
    kept, last, holders, after, _ = _probe("keep")
    assert kept == "True" and holders == "0"
    assert int(last) < 1000  # reused from the heap: no fresh 64 MiB of pages
    assert int(after) > 10000  # defaults back: mmapped and faulted in again
    plain = _probe("plain")
    assert plain[0] == "False" and int(plain[4]) > 10000  # every round fresh pages


@needs_glibc
@pytest.mark.parametrize(
    "env",
    [{heap.ENV_SWITCH: "0"}, {"MALLOC_TRIM_THRESHOLD_": "1048576"},
     {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=8"}],
    ids=["switch", "malloc-variable", "tunable"],
)
def test_left_alone_when_switched_off_or_tuned_by_the_user(env: dict[str, str]) -> None:
    kept, last, _, _, least = _probe("keep", env)
    assert kept == "False" and int(least) > 10000 and int(last) > 10000


@needs_glibc
def test_owners_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(heap.ENV_SWITCH, raising=False)
    start = heap.holders()
    a, b = Owner(), Owner()
    assert heap.keep_freed_memory(a) and heap.keep_freed_memory(b)
    assert heap.holders() == start + 2
    del a
    gc.collect()
    assert heap.holders() == start + 1
    del b
    gc.collect()
    assert heap.holders() == start


def test_other_platforms_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap.sys, "platform", "darwin")
    assert heap.glibc() is None
    start = heap.holders()
    assert heap.keep_freed_memory(Owner()) is False
    assert heap.holders() == start


@needs_glibc
def test_a_cpu_model_holds_the_setting_until_it_is_freed(tiny_model: Path) -> None:
    from napari_diffcut.pipeline.engine import ModelCache
    from napari_diffcut.pipeline.settings import Settings

    gc.collect()
    start = heap.holders()
    cache = ModelCache()
    cache.model_for(Settings(model=str(tiny_model), device="cpu", dtype="float32"))
    assert heap.holders() == start + 1
    cache.unload()
    gc.collect()
    assert heap.holders() == start
