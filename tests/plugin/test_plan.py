"""Which layers a new result set updates, adds or removes (pure: no viewer, no Qt)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_diffcut.pipeline.segmentation import Segmentation
from napari_diffcut.plugin.layers import result_layer_data
from napari_diffcut.plugin.plan import ExistingLayer, plan_layer_updates


@pytest.fixture(scope="module")
def seg(pixels_seg: Segmentation) -> Segmentation:
    """The shared three-level result of the weight-free backbone (conftest)."""
    return pixels_seg


def existing_from(tuples: list, **overrides: object) -> list[ExistingLayer]:
    """ExistingLayer records of tuples as if they had been added unchanged."""
    return [ExistingLayer(kw["name"], data, kw["metadata"]) for data, kw, _ in tuples]


def test_plan_adds_then_updates_in_place(seg: Segmentation) -> None:
    tuples = result_layer_data(seg, "img")
    first = plan_layer_updates([ExistingLayer("img", None, {}, False)], tuples)
    assert [(n, upd) for n, upd, _ in first.steps] == [(kw["name"], False) for _, kw, _ in tuples]
    assert first.remove == [] and first.protected == []
    again = plan_layer_updates(existing_from(tuples), tuples)
    assert [(n, upd) for n, upd, _ in again.steps] == [(kw["name"], True) for _, kw, _ in tuples]


def test_plan_moves_the_whole_set_when_its_main_layer_was_painted(seg: Segmentation) -> None:
    """Issue 13 point 7: the levels go with their main layer, never overwritten under it."""
    tuples = result_layer_data(seg, "img")
    existing = existing_from(tuples)
    painted = tuples[0][0].copy()
    painted[:3, :3] = 99
    existing[0] = ExistingLayer(existing[0].name, painted, existing[0].metadata)
    plan = plan_layer_updates(existing, tuples)
    wanted = [f"{kw['name']} [1]" for _, kw, _ in tuples]
    assert [(n, upd) for n, upd, _ in plan.steps] == [(n, False) for n in wanted]
    assert plan.protected == [(kw["name"], f"{kw['name']} [1]") for _, kw, _ in tuples]
    assert plan.remove == []
    # Next time, the unedited set "[1]" is updated in place; the painted set stays.
    existing += [
        ExistingLayer(n, d, kw["metadata"]) for n, (d, kw, _) in zip(wanted, tuples, strict=True)
    ]
    plan = plan_layer_updates(existing, tuples)
    assert [(n, upd) for n, upd, _ in plan.steps] == [(n, True) for n in wanted]


def test_plan_moves_the_whole_set_when_a_level_was_painted(seg: Segmentation) -> None:
    tuples = result_layer_data(seg, "img")
    existing = existing_from(tuples)
    painted = np.asarray(tuples[-1][0]).copy()
    painted[0, 0] = 4321
    existing[-1] = ExistingLayer(existing[-1].name, painted, existing[-1].metadata)
    plan = plan_layer_updates(existing, tuples)
    assert all(n.endswith(" [1]") and not upd for n, upd, _ in plan.steps)


def test_plan_never_takes_foreign_layer(seg: Segmentation) -> None:
    tuples = result_layer_data(seg, "img")
    foreign = ExistingLayer("img diffcut", np.zeros(seg.shape, np.uint32), {"other": 1})
    plan = plan_layer_updates([foreign], tuples)
    assert plan.steps[0][:2] == ("img diffcut [1]", False)
    # A result of another source with the same layer name is not ours either.
    other = result_layer_data(seg, "other image")[0]
    renamed = ExistingLayer("img diffcut", other[0], other[1]["metadata"])
    assert plan_layer_updates([renamed], tuples).steps[0][:2] == ("img diffcut [1]", False)


def test_plan_removes_stale_unedited_levels(seg: Segmentation) -> None:
    many = result_layer_data(seg, "img", threshold=1.0)
    few = result_layer_data(seg, "img", threshold=1e-6)
    assert len(many) > len(few)
    existing = existing_from(many)
    plan = plan_layer_updates(existing, few)
    assert plan.remove == [kw["name"] for _, kw, _ in many[len(few) :]]
    assert all(upd for _, upd, _ in plan.steps)
    # The user painted on the deepest level: the set is kept whole, nothing removed.
    deep = existing[-1]
    edited = np.asarray(deep.data).copy()
    edited[0, 0] = 12345
    existing[-1] = ExistingLayer(deep.name, edited, deep.metadata)
    plan = plan_layer_updates(existing, few)
    assert plan.remove == []
    assert all(n.endswith(" [1]") for n, _, _ in plan.steps)


def test_plan_leaves_other_sets_alone(seg: Segmentation) -> None:
    """A stale level of another set (or a renamed layer) is never removed."""
    many = result_layer_data(seg, "img", threshold=1.0)
    few = result_layer_data(seg, "img", threshold=1e-6)
    other_set = [ExistingLayer(f"{kw['name']} [1]", d, kw["metadata"]) for d, kw, _ in many]
    renamed = ExistingLayer("my cells", many[-1][0], many[-1][1]["metadata"])
    plan = plan_layer_updates([*existing_from(few), *other_set, renamed], few)
    assert plan.remove == [] and all(upd for _, upd, _ in plan.steps)
