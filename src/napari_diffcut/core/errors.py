"""Errors and small argument checks shared by every layer (stdlib only)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class DiffCutError(RuntimeError):
    """A run failed for a reason the user can act on (missing model, bad file...).

    The CLI prints its message without a traceback; the widget shows it as a
    napari notification.
    """


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError`` naming the parameter unless ``value`` is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` as int, raising ``ValueError`` unless it is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
        except ImportError:  # pragma: no cover
            pass
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_threshold(value: Any) -> float | str:
    """Validate an NCut threshold: ``"auto"`` or a number in (0, 1]."""
    if value == "auto":
        return "auto"
    try:
        tau = float(value)
    except (TypeError, ValueError):
        tau = float("nan")
    if not 0.0 < tau <= 1.0:
        raise ValueError(
            f"threshold must be 'auto' or a number in (0, 1], got {value!r} "
            "(NCut costs live in [0, 1]; smaller keeps only strong splits)"
        )
    return tau
