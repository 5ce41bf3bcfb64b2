"""Which result layers a new result updates, adds or removes: a pure decision, no viewer.

A run (or a re-cut) gives a *result set*: the main layer ``"<image> diffcut"``
and its level layers ``"<image> diffcut level d"``. napari names duplicates
``"name [n]"``, so set ``n`` is the layers with the suffix ``[n]`` (set 0 has
none). A set is updated as a whole or not at all (issue 13, point 7): if any
layer of it was edited by the user, or a name of it is held by a layer that
is not ours, the new result goes to the first set ``n`` that is free (or ours
and unedited), all of its layers together. So a main layer always shows the
same segmentation as the level layers next to it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from napari_diffcut.plugin.layers import (
    LayerDataTuple,
    diffcut_meta,
    is_edited,
    level_layer_name,
    main_layer_name,
)


@dataclass(frozen=True)
class ExistingLayer:
    """What the planner needs to know about a layer already in the viewer."""

    name: str
    data: Any = None
    metadata: Any = None
    is_labels: bool = True


@dataclass
class LayerPlan:
    """Result of :func:`plan_layer_updates`.

    Attributes
    ----------
    steps : list of (name, update, layer-data tuple)
        In the order of the wanted tuples; ``update`` is True to update the
        existing layer ``name`` in place, False to add a layer named ``name``.
    remove : list of str
        Level layers of the chosen set that the new result no longer has.
    protected : list of (name, new_name)
        Layers of set 0 left untouched (a layer of that set was edited, or a
        name is held by a layer that is not ours), and where their
        replacement goes.
    """

    steps: list[tuple[str, bool, LayerDataTuple]] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    protected: list[tuple[str, str]] = field(default_factory=list)


def suffixed(base: str, n: int) -> str:
    """The name of layer ``base`` in result set ``n`` (napari's ``"base [n]"``)."""
    return base if n == 0 else f"{base} [{n}]"


def suffix_number(name: str, base: str) -> int | None:
    """0 for ``base`` itself, n for napari's ``"base [n]"``, None otherwise."""
    if name == base:
        return 0
    m = re.fullmatch(re.escape(base) + r" \[(\d+)\]", name)
    return int(m.group(1)) if m else None


def _slot(meta: dict[str, Any] | None) -> tuple[Any, Any, Any] | None:
    """(source, role, level) of a result layer's metadata, or None."""
    if meta is None:
        return None
    return (meta.get("source"), meta.get("role"), meta.get("level"))


def _own_base(meta: dict[str, Any]) -> str | None:
    """The unsuffixed name a result layer was given, from its metadata."""
    source, role, level = _slot(meta) or (None, None, None)
    if not isinstance(source, str):
        return None
    if role == "main":
        return main_layer_name(source)
    if role == "level" and level is not None:
        return level_layer_name(source, int(level))
    return None


def set_members(existing: Sequence[ExistingLayer], source: str) -> dict[int, list[ExistingLayer]]:
    """Our result layers of ``source``, by result set (their ``[n]`` suffix).

    Layers renamed by the user belong to no set (they are never touched).
    """
    sets: dict[int, list[ExistingLayer]] = {}
    for e in existing:
        meta = diffcut_meta(e.metadata)
        if not e.is_labels or meta is None or meta.get("source") != source:
            continue
        base = _own_base(meta)
        n = None if base is None else suffix_number(e.name, base)
        if n is not None:
            sets.setdefault(n, []).append(e)
    return sets


def plan_layer_updates(
    existing: Sequence[ExistingLayer], wanted: Sequence[LayerDataTuple]
) -> LayerPlan:
    """Decide which layers to update, add or remove for a new result set.

    The chosen set is the first ``n`` (0, 1, 2, ...) where every wanted name
    is free or held by our unedited layer of the same slot (source, role,
    level), and no layer of set ``n`` was edited. Its layers are updated in
    place or added; its level layers the result no longer has are removed.
    Layers of other sets, edited layers and layers that are not ours are
    never touched.
    """
    bases = [kwargs["name"] for _, kwargs, _ in wanted]
    metas = [diffcut_meta(kwargs.get("metadata")) or {} for _, kwargs, _ in wanted]
    source = next((m.get("source") for m in metas if m.get("source") is not None), None)
    by_name = {e.name: e for e in existing}
    members = set_members(existing, source) if isinstance(source, str) else {}
    edited: dict[str, bool] = {}

    def is_dirty(e: ExistingLayer) -> bool:
        if e.name not in edited:
            edited[e.name] = is_edited(e.data, e.metadata)
        return edited[e.name]

    def reusable(n: int) -> bool:
        for base, meta in zip(bases, metas, strict=True):
            e = by_name.get(suffixed(base, n))
            if e is not None and not (
                e.is_labels and _slot(diffcut_meta(e.metadata)) == _slot(meta)
            ):
                return False
        return not any(is_dirty(e) for e in members.get(n, []))

    n = 0
    while not reusable(n):
        n += 1
    plan = LayerPlan()
    for base, item in zip(bases, wanted, strict=True):
        name = suffixed(base, n)
        plan.steps.append((name, name in by_name, item))
        if n > 0 and base in by_name:
            plan.protected.append((base, name))
    names = {name for name, _, _ in plan.steps}
    plan.remove = [
        e.name
        for e in members.get(n, [])
        if e.name not in names and (diffcut_meta(e.metadata) or {}).get("role") == "level"
    ]
    return plan


__all__ = [
    "ExistingLayer",
    "LayerPlan",
    "plan_layer_updates",
    "set_members",
    "suffix_number",
    "suffixed",
]
