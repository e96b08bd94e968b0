"""Executes the coordinator's one transfer plan on a rank.

Every participant walks the same plan in the same order and derives its own
sends and receives from it; no rank consults its local placement metadata.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from protos.types import Placement, TransferPlan
from worker_agent.adapter import EngineAdapter
from worker_agent.groups import wait_p2p, wait_work

# Tensors of one expert slot are tagged plan_index * TAG_STRIDE + tensor_index.
TAG_STRIDE = 64


@dataclass(frozen=True)
class ResyncResult:
    bytes_received: int
    bytes_sent: int
    transfer_ms: float


def broadcast_bytes(
    group: dist.ProcessGroup, blob: bytes, root: int, aborted: Callable[[], bool]
) -> bytes:
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    size = torch.tensor([len(blob)], dtype=torch.int64)
    wait_work(group.broadcast([size], opts), aborted)
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    if blob:
        payload.copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
    wait_work(group.broadcast([payload], opts), aborted)
    return payload.numpy().tobytes()


def execute_resync(
    *,
    group: dist.ProcessGroup,
    rank: int,
    members: tuple[int, ...],
    plan: TransferPlan,
    metadata_source: int,
    placement: Placement,
    adapter: EngineAdapter,
    aborted: Callable[[], bool],
    prefetched: bool = False,
) -> ResyncResult:
    """The pause's resync: the metadata hand-off, then the plan's transfers,
    unless `prefetched` (this rank carried out this very plan already while
    serving; every participant of it did, or the operation would not be here)."""
    started = time.perf_counter()
    blob = adapter.export_metadata() if rank == metadata_source else b""
    blob = broadcast_bytes(group, blob, members.index(metadata_source), aborted)
    adapter.apply_metadata(blob, placement)
    received = sent = 0
    if not prefetched:
        received, sent = execute_transfers(
            group=group, rank=rank, members=members, plan=plan, adapter=adapter, aborted=aborted
        )
    return ResyncResult(received, sent, (time.perf_counter() - started) * 1000.0)


def execute_transfers(
    *,
    group: dist.ProcessGroup,
    rank: int,
    members: tuple[int, ...],
    plan: TransferPlan,
    adapter: EngineAdapter,
    aborted: Callable[[], bool],
) -> tuple[int, int]:
    """This rank's sends and receives of `plan` over `group`; (received, sent) bytes."""
    works: list[dist.Work] = []
    sent = received = 0
    for index, t in enumerate(plan.transfers):
        if t.src_rank == rank:
            for j, tensor in enumerate(adapter.expert_tensors(t.layer, t.src_slot)):
                tag = index * TAG_STRIDE + j
                works.append(group.send([tensor], members.index(t.dst_rank), tag))
                sent += tensor.numel() * tensor.element_size()
        elif t.dst_rank == rank:
            for j, tensor in enumerate(adapter.expert_tensors(t.layer, t.dst_slot)):
                tag = index * TAG_STRIDE + j
                works.append(group.recv([tensor], members.index(t.src_rank), tag))
                received += tensor.numel() * tensor.element_size()
    wait_p2p(works, aborted)
    return received, sent
