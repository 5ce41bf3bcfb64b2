"""Memory estimates made before anything large is allocated (pure, numpy-free).

The walk and the cut work on dense ``N x N`` float32 matrices of the ``N``
patches of the latent grid, and a diffusion model's weights grow with the
square of its channel widths. A run that cannot fit is refused with one line
that says how much it would take and what would help, instead of a
MemoryError traceback minutes later.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

#: Dense N x N float32 matrices alive at once in the walk and the cut
#: (transition, walk, affinity and one working copy).
DENSE_COPIES = 4
#: Float32 copies of the working image alive at once (resized RGB and features).
IMAGE_COPIES = 8


def format_bytes(n: float) -> str:
    """A human size: ``format_bytes(3 * 2**30) == '3.0 GB'``."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(value) < 1024 or unit == "PB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PB"


def available_bytes() -> int:
    """Memory this process may still take: MemAvailable on Linux, else physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def graph_bytes(grid: Sequence[int], working: Sequence[int] | None = None) -> int:
    """Peak bytes of the walk and cut on a ``grid`` of patches (and the working image)."""
    n = math.prod(int(v) for v in grid)
    image = math.prod(int(v) for v in working) * 3 * 4 * IMAGE_COPIES if working else 0
    return DENSE_COPIES * n * n * 4 + image


def model_bytes(block_out_channels: Sequence[int], layers_per_block: int, itemsize: int) -> int:
    """Rough weight bytes of a Stable Diffusion UNet from its config.

    About 230 weights per squared channel width per block pair reproduces
    SD 1.5 (860 M parameters for widths 320, 640, 1280, 1280).
    """
    widths = sum(int(c) ** 2 for c in block_out_channels)
    return int(115 * max(1, int(layers_per_block)) * widths * itemsize)


def check_fits(need: int, what: str, help_text: str, limit: int | None = None) -> str:
    """'' when ``need`` bytes fit in ``limit`` (default: available memory), else the reason."""
    free = available_bytes() if limit is None else limit
    if need <= free:
        return ""
    return f"{what} would take {format_bytes(need)}, {format_bytes(free)} available; {help_text}"


def require_graph_fits(grid: Sequence[int], working: Sequence[int] | None = None) -> None:
    """Raise a one-line DiffCutError when the walk on ``grid`` cannot fit in memory.

    Called once the latent grid is known and before the working image or any
    ``N x N`` matrix is allocated.
    """
    from napari_diffcut.core.errors import DiffCutError

    n = math.prod(int(v) for v in grid)
    reason = check_fits(
        graph_bytes(grid, working),
        f"the graph of {n} patches ({grid[0]} x {grid[1]})",
        "use tiles (--tile-size) or a smaller --working-size",
    )
    if reason:
        raise DiffCutError(reason)
