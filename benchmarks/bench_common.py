"""Shared helpers of the benchmark scripts: timing, machine description, load.

The benchmark machine may be shared (2 cores, several users): every timing is
repeated and reported as the median, with the minimum beside it (the minimum
is the best estimate of the uncontended time of CPU-bound code), and the load
average before and after each section is recorded so that a contended run can
be recognised.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Timing:
    """Repeated wall-clock timings of one operation, in seconds."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median of the samples (nan when empty)."""
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def min(self) -> float:
        """Fastest sample (nan when empty)."""
        return min(self.samples) if self.samples else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"median": self.median, "min": self.min, "samples": self.samples}


def time_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall-clock seconds of one call, and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def repeat(fn: Callable[[], Any], n: int) -> tuple[Timing, Any]:
    """Call ``fn`` ``n`` times; timings and the last result."""
    timing = Timing()
    result = None
    for _ in range(max(1, n)):
        seconds, result = time_call(fn)
        timing.samples.append(seconds)
    return timing, result


def load_average() -> float:
    """1-minute load average (nan where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return float("nan")


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far, GiB (Linux: ru_maxrss in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    return kib * scale / 2**30


def machine() -> dict[str, Any]:
    """CPU, core count, library versions: the context of a table."""
    import numpy as np
    import scipy

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }
    try:
        import torch

        info.update(
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
            cpu_capability=torch.backends.cpu.get_cpu_capability(),
            cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        )
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    """CPU model name from /proc/cpuinfo, else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def file_gib(*paths: str) -> float:
    """Total size of the files under ``paths`` in GiB."""
    total = 0
    for root in paths:
        if os.path.isfile(root):
            total += os.path.getsize(root)
            continue
        for folder, _, files in os.walk(root):
            total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total / 2**30


def weights_gib(model_dir: str) -> float:
    """Size of the weight files (safetensors) a run loads: UNet, VAE, text encoder."""
    total = 0
    for sub in ("unet", "vae", "text_encoder"):
        folder = os.path.join(model_dir, sub)
        if not os.path.isdir(folder):
            continue
        total += sum(
            os.path.getsize(os.path.join(folder, f))
            for f in os.listdir(folder)
            if f.endswith(".safetensors")
        )
    return total / 2**30
