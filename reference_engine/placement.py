"""Expert placement: which logical expert each global slot holds.

Replicas of an expert sit on distinct nodes, so the loss of any one rank or any
one node leaves every expert with a live replica.
"""

from __future__ import annotations

from collections.abc import Collection

from protos.types import Placement

__all__ = ["Placement", "build_placement", "live_replicas"]


def build_placement(
    world_size: int, ranks_per_node: int, n_experts: int, replicas: int, n_layers: int
) -> Placement:
    """A balanced, node-disjoint placement (version 1, the same map on every layer)."""
    if min(world_size, ranks_per_node, n_experts, n_layers) < 1:
        raise ValueError(
            f"world_size ({world_size}), ranks_per_node ({ranks_per_node}), "
            f"n_experts ({n_experts}) and n_layers ({n_layers}) must be positive"
        )
    if world_size % ranks_per_node:
        raise ValueError(
            f"ranks_per_node ({ranks_per_node}) does not divide world_size ({world_size})"
        )
    n_nodes = world_size // ranks_per_node
    if not 2 <= replicas <= n_nodes:
        raise ValueError(
            f"replicas ({replicas}) must be at least 2 (to survive a loss) and at most "
            f"the number of nodes ({n_nodes} = {world_size} ranks / {ranks_per_node} per node)"
        )
    total = n_experts * replicas
    if total % world_size:
        raise ValueError(
            f"n_experts * replicas ({n_experts} * {replicas} = {total}) is not a multiple "
            f"of world_size ({world_size}): ranks would hold unequal slot counts"
        )
    per_rank = total // world_size

    # The replica-major sequence of experts cut into consecutive blocks, one per
    # rank. A node's ranks are consecutive, so a node holds a run of at most
    # n_experts entries (replicas <= nodes), and the replicas of one expert lie
    # exactly n_experts apart in the sequence: never twice on one node.
    slot_expert = tuple(e for _ in range(replicas) for e in range(n_experts))
    placement = Placement(1, per_rank, (slot_expert,) * n_layers)
    _verify(placement, ranks_per_node, n_experts, replicas)
    return placement


def _verify(placement: Placement, ranks_per_node: int, n_experts: int, replicas: int) -> None:
    for layer in placement.layers:
        for expert in range(n_experts):
            slots = [s for s, e in enumerate(layer) if e == expert]
            nodes = {placement.rank_of_slot(s) // ranks_per_node for s in slots}
            if len(slots) != replicas or len(nodes) != replicas:
                raise ValueError(f"placement check failed for expert {expert}: slots {slots}")


def live_replicas(
    placement: Placement, layer: int, expert: int, members: Collection[int]
) -> list[int]:
    """Global slots holding `expert` on `layer` whose rank is in `members`, ascending."""
    return [
        slot
        for slot, e in enumerate(placement.layers[layer])
        if e == expert and placement.rank_of_slot(slot) in members
    ]
