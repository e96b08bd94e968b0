"""Plain Python forms of the contract's shared types, and their wire forms.

The coordinator and the agent both use these; neither imports the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from protos.ep_recovery.v1 import common_pb2, worker_pb2


@dataclass(frozen=True)
class Placement:
    """For every layer, the logical expert held by each global slot.

    Global slot s lives on rank s // slots_per_rank.
    """

    version: int
    slots_per_rank: int
    layers: tuple[tuple[int, ...], ...]

    def rank_of_slot(self, slot: int) -> int:
        return slot // self.slots_per_rank

    def slots_of_rank(self, rank: int) -> range:
        return range(rank * self.slots_per_rank, (rank + 1) * self.slots_per_rank)

    def to_proto(self) -> common_pb2.Placement:
        return common_pb2.Placement(
            version=self.version,
            slots_per_rank=self.slots_per_rank,
            layers=[common_pb2.LayerPlacement(slot_expert=list(layer)) for layer in self.layers],
        )

    @classmethod
    def from_proto(cls, msg: common_pb2.Placement) -> Placement:
        return cls(
            version=msg.version,
            slots_per_rank=msg.slots_per_rank,
            layers=tuple(tuple(layer.slot_expert) for layer in msg.layers),
        )


@dataclass(frozen=True, order=True)
class CheckpointLoad:
    """One expert slot filled from the checkpoint (the engine's weights on
    disk) on its own rank, because no live rank holds that expert any more."""

    layer: int
    slot: int
    expert: int
    rank: int


def loads_to_proto(loads: tuple[CheckpointLoad, ...]) -> list[worker_pb2.CheckpointLoad]:
    return [
        worker_pb2.CheckpointLoad(layer=x.layer, slot=x.slot, expert=x.expert, rank=x.rank)
        for x in loads
    ]


def loads_from_proto(msgs: Iterable[worker_pb2.CheckpointLoad]) -> tuple[CheckpointLoad, ...]:
    return tuple(CheckpointLoad(m.layer, m.slot, m.expert, m.rank) for m in msgs)


@dataclass(frozen=True, order=True)
class Transfer:
    """One expert slot copied from a healthy source to a destination."""

    layer: int
    dst_slot: int
    src_slot: int
    src_rank: int
    dst_rank: int


@dataclass(frozen=True)
class TransferPlan:
    placement_version: int
    transfers: tuple[Transfer, ...]

    def sends_of(self, rank: int) -> list[Transfer]:
        return [t for t in self.transfers if t.src_rank == rank]

    def receives_of(self, rank: int) -> list[Transfer]:
        return [t for t in self.transfers if t.dst_rank == rank]

    def to_proto(self) -> worker_pb2.TransferPlan:
        return worker_pb2.TransferPlan(
            placement_version=self.placement_version,
            transfers=[
                worker_pb2.Transfer(
                    layer=t.layer,
                    src_rank=t.src_rank,
                    src_slot=t.src_slot,
                    dst_rank=t.dst_rank,
                    dst_slot=t.dst_slot,
                )
                for t in self.transfers
            ],
        )

    @classmethod
    def from_proto(cls, msg: worker_pb2.TransferPlan) -> TransferPlan:
        return cls(
            placement_version=msg.placement_version,
            transfers=tuple(
                Transfer(t.layer, t.dst_slot, t.src_slot, t.src_rank, t.dst_rank)
                for t in msg.transfers
            ),
        )
