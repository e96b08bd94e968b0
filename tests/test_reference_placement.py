"""Expert placement: balanced, and every expert survives any one rank or node."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference_engine.placement import build_placement, live_replicas


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """Valid (world_size, ranks_per_node, n_experts, replicas)."""
    world = draw(st.integers(2, 16))
    # At least two nodes: one node cannot survive its own loss.
    per_node = draw(st.sampled_from([d for d in range(1, world // 2 + 1) if world % d == 0]))
    nodes = world // per_node
    replicas = draw(st.integers(2, nodes))
    # n_experts * replicas must be a multiple of world.
    step = world // math.gcd(world, replicas)
    experts = step * draw(st.integers(1, max(1, 32 // step)))
    return world, per_node, experts, replicas


@given(layouts(), st.integers(1, 3))
def test_balanced_and_survives_any_rank_or_node(
    layout: tuple[int, int, int, int], n_layers: int
) -> None:
    world, per_node, experts, replicas = layout
    placement = build_placement(world, per_node, experts, replicas, n_layers)
    assert placement == build_placement(world, per_node, experts, replicas, n_layers)
    assert placement.version == 1
    assert placement.slots_per_rank * world == experts * replicas
    assert len(placement.layers) == n_layers
    for layer, slot_expert in enumerate(placement.layers):
        assert len(slot_expert) == experts * replicas
        assert sorted(slot_expert) == sorted(list(range(experts)) * replicas)
        for lost_rank in range(world):
            members = [r for r in range(world) if r != lost_rank]
            assert all(live_replicas(placement, layer, e, members) for e in range(experts))
        for lost_node in range(world // per_node):
            members = [r for r in range(world) if r // per_node != lost_node]
            assert all(live_replicas(placement, layer, e, members) for e in range(experts))


def test_live_replicas_lists_member_slots() -> None:
    placement = build_placement(4, 1, 8, 2, 2)
    assert placement.slots_per_rank == 4
    every = live_replicas(placement, 1, 5, range(4))
    assert len(every) == 2 and {placement.rank_of_slot(s) for s in every} == {1, 3}
    assert live_replicas(placement, 1, 5, [0, 1, 2]) == [s for s in every if s < 12]
    assert live_replicas(placement, 0, 5, [0, 2]) == []


@pytest.mark.parametrize(
    ("args", "names"),
    [
        ((3, 1, 8, 2, 2), ["n_experts", "16", "world_size (3)"]),  # 16 slots on 3 ranks
        ((4, 2, 8, 3, 2), ["replicas (3)", "nodes (2"]),  # only 2 nodes
        ((4, 4, 8, 2, 1), ["replicas (2)", "nodes (1"]),  # one node: none survives it
        ((4, 1, 8, 1, 1), ["replicas (1)"]),  # a single copy survives nothing
        ((6, 4, 8, 2, 1), ["ranks_per_node (4)", "world_size (6)"]),
        ((0, 1, 8, 2, 1), ["world_size (0)"]),
        ((4, 1, 8, 2, 0), ["n_layers (0)"]),
    ],
)
def test_invalid_layouts_raise_naming_the_numbers(
    args: tuple[int, int, int, int, int], names: list[str]
) -> None:
    with pytest.raises(ValueError) as info:
        build_placement(*args)
    assert all(name in str(info.value) for name in names), str(info.value)


@given(st.integers(2, 16), st.integers(1, 16), st.integers(2, 4))
def test_indivisible_slot_counts_raise(world: int, experts: int, replicas: int) -> None:
    if (experts * replicas) % world == 0 or replicas > world:
        return
    with pytest.raises(ValueError, match="not a multiple"):
        build_placement(world, 1, experts, replicas, 1)
