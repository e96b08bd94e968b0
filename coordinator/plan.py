"""Pure planning helpers of the state machine: the expert transfer plan and the
hold target. No I/O; inputs are the coordinator's own records, never a rank's
local metadata (a joiner's view of the placement is stale by definition).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from protos.types import CheckpointLoad, Placement, Transfer, TransferPlan


class PlanError(ValueError):
    """No healthy source holds an expert that a joiner needs, or no survivor
    can take an expert that lost every replica."""


def relayout(
    placement: Placement, survivors: Iterable[int]
) -> tuple[Placement, tuple[CheckpointLoad, ...]]:
    """Give every expert that has no replica left on `survivors` a survivor's
    slot, to be loaded from the checkpoint there; `placement` itself when none
    is lost (and no loads).

    A slot given up holds a replica of an expert that keeps another live
    replica: the most replicated first, then the survivor that gave up the
    fewest slots so far, then the lowest slot (deterministic: a rollback that
    plans again with the same survivors gets the same layout). Serving goes on
    with every expert, at lower capacity. PlanError when some survivor slot
    cannot be spared for a lost expert. The result has the next version.
    """
    alive = sorted(set(survivors))
    if not alive:
        raise PlanError("no survivor to hold the experts")
    layers: list[tuple[int, ...]] = []
    loads: list[CheckpointLoad] = []
    given_up = dict.fromkeys(alive, 0)
    for layer, slot_expert in enumerate(placement.layers):
        slots = list(slot_expert)
        live = [s for r in alive for s in placement.slots_of_rank(r)]
        count: dict[int, int] = {}
        for s in live:
            count[slots[s]] = count.get(slots[s], 0) + 1
        for expert in sorted(set(slot_expert) - set(count)):
            spare = [s for s in live if count[slots[s]] >= 2]
            if not spare:
                raise PlanError(
                    f"expert {expert} of layer {layer} has no replica left and no survivor "
                    f"slot can be spared for it (survivors: {alive})"
                )
            slot = min(
                spare, key=lambda s: (-count[slots[s]], given_up[placement.rank_of_slot(s)], s)
            )
            count[slots[slot]] -= 1
            slots[slot] = expert
            count[expert] = 1
            rank = placement.rank_of_slot(slot)
            given_up[rank] += 1
            loads.append(CheckpointLoad(layer, slot, expert, rank))
        layers.append(tuple(slots))
    if not loads:
        return placement, ()
    return Placement(placement.version + 1, placement.slots_per_rank, tuple(layers)), tuple(loads)


def transfer_plan(
    placement: Placement, healthy: Iterable[int], joiners: Iterable[int]
) -> TransferPlan:
    """Every slot of every joiner gets its expert from a healthy rank holding a
    replica of the same logical expert, the load spread over the sources.

    Ordered by (layer, destination slot); every participant derives its sends
    and receives from this one order, so the plan is symmetric by construction.
    """
    healthy_ranks = sorted(set(healthy))
    joiner_ranks = sorted(set(joiners))
    if set(healthy_ranks) & set(joiner_ranks):
        raise PlanError("a rank cannot be both a source and a joiner")
    load = dict.fromkeys(healthy_ranks, 0)
    transfers: list[Transfer] = []
    for layer, slot_expert in enumerate(placement.layers):
        replicas: dict[int, list[int]] = {}
        for slot, expert in enumerate(slot_expert):
            if placement.rank_of_slot(slot) in load:
                replicas.setdefault(expert, []).append(slot)
        for dst_rank in joiner_ranks:
            for dst_slot in placement.slots_of_rank(dst_rank):
                expert = slot_expert[dst_slot]
                sources = replicas.get(expert)
                if not sources:
                    raise PlanError(
                        f"expert {expert} of layer {layer} has no replica on a healthy rank "
                        f"(healthy: {healthy_ranks})"
                    )
                src_slot = min(sources, key=lambda s: (load[placement.rank_of_slot(s)], s))
                src_rank = placement.rank_of_slot(src_slot)
                load[src_rank] += 1
                transfers.append(Transfer(layer, dst_slot, src_slot, src_rank, dst_rank))
    return TransferPlan(placement.version, tuple(sorted(transfers)))


@dataclass(frozen=True)
class ProgressSample:
    iteration: int
    at: float  # the coordinator's clock when the report arrived
    rate: float  # iterations per second, 0 while unknown
    rank_clock: float | None = None  # the rank's clock when it read `iteration`


def next_sample(
    previous: ProgressSample | None, iteration: int, at: float, rank_clock: float | None = None
) -> ProgressSample:
    """The rank's progress after one more report. The rate is measured on the
    rank's clock: reports that queued up in transit (a loaded host, a slow
    network) arrive microseconds apart, and their arrival times would give a
    rate thousands of times too high, and a hold target the ranks take minutes
    to reach. A report without the rank's clock (a PastTarget answer) keeps
    the rate it had."""
    rate = previous.rate if previous else 0.0
    if (
        previous is not None
        and rank_clock is not None
        and previous.rank_clock is not None
        and rank_clock > previous.rank_clock
        and iteration >= previous.iteration
    ):
        instant = (iteration - previous.iteration) / (rank_clock - previous.rank_clock)
        rate = instant if rate == 0.0 else 0.5 * rate + 0.5 * instant
    return ProgressSample(iteration, at, rate, rank_clock)


def hold_target(
    samples: Mapping[int, ProgressSample], now: float, lead_s: float, attempt: int = 0
) -> int:
    """An iteration every rank is predicted to reach only after the hold order
    arrives: past every reported iteration by the iterations expected to run
    while the order travels. `attempt` widens the margin on each retarget.
    """
    if not samples:
        raise ValueError("no progress samples")
    predicted = max(s.iteration + s.rate * max(0.0, now - s.at) for s in samples.values())
    rate = max(s.rate for s in samples.values())
    margin = max(2, math.ceil(rate * lead_s)) * (2**attempt)
    reported = max(s.iteration for s in samples.values())
    return max(reported, math.ceil(predicted)) + margin
