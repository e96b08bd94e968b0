"""The expert-parallel process group of one epoch, with abortable collectives.

Every collective is issued async and polled together with the engine's abort
signal: a gloo survivor blocked on a peer that died (or on a survivor that gave
up) would otherwise wait out the whole group timeout (../shared/notes/groups.md).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import torch.distributed as dist

from worker_agent.adapter import GroupSpec, StepAborted
from worker_agent.groups import CollectiveFailed, build_gloo_group, wait_p2p, wait_work

__all__ = ["AbortSignal", "CollectiveFailed", "EPGroup", "StepAborted"]


class AbortSignal:
    """Engine-wide: collectives of every epoch <= `aborted_through` give up."""

    def __init__(self) -> None:
        self.aborted_through = 0
        self._lock = threading.Lock()

    def abort(self, epoch: int) -> None:
        # Only writers lock; the wait loops read a plain int.
        with self._lock:
            self.aborted_through = max(self.aborted_through, epoch)

    def aborted(self, epoch: int) -> bool:
        return self.aborted_through >= epoch


class EPGroup:
    """A standalone gloo group: group rank i is cluster rank `members[i]`."""

    def __init__(
        self,
        pg: dist.ProcessGroup,
        epoch: int,
        members: tuple[int, ...],
        rank: int,
        signal: AbortSignal,
    ) -> None:
        self.pg = pg
        self.epoch = epoch
        self.members = members
        self.group_rank = members.index(rank)
        self._signal = signal

    @classmethod
    def build(
        cls, spec: GroupSpec, rank: int, signal: AbortSignal, hostname: str = "127.0.0.1"
    ) -> EPGroup:
        pg = build_gloo_group(spec, rank, "ep", lambda: signal.aborted(spec.epoch), hostname)
        return cls(pg, spec.epoch, spec.members, rank, signal)

    @property
    def size(self) -> int:
        return len(self.members)

    def _aborted(self) -> bool:
        return self._signal.aborted(self.epoch)

    def _wait(self, work: dist.Work) -> None:
        """Raises StepAborted (epoch aborted) or CollectiveFailed (transport error)."""
        wait_work(work, self._aborted)

    def alltoall(
        self, rows: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]
    ) -> torch.Tensor:
        """Rows [sum(send_counts), ...] out in group-rank order; the rows received,
        [sum(recv_counts), ...] in group-rank order, come back."""
        out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
        work = self.pg.alltoall_base(
            out, rows, list(recv_counts), list(send_counts), dist.AllToAllOptions()
        )
        self._wait(work)
        return out

    def broadcast_bytes(self, blob: bytes, src_group_rank: int) -> bytes:
        opts = dist.BroadcastOptions()
        opts.rootRank = src_group_rank
        size = torch.tensor([len(blob)], dtype=torch.int64)
        self._wait(self.pg.broadcast([size], opts))
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        if self.group_rank == src_group_rank and blob:
            payload.copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
        self._wait(self.pg.broadcast([payload], opts))
        return payload.numpy().tobytes()

    def send(self, tensors: Sequence[torch.Tensor], dst_group_rank: int, tag: int = 0) -> None:
        """Tensor i travels under tag `tag + i`; the receiver names the same tag."""
        works = [self.pg.send([t], dst_group_rank, tag + i) for i, t in enumerate(tensors)]
        self._wait_p2p(works)

    def recv(self, tensors: Sequence[torch.Tensor], src_group_rank: int, tag: int = 0) -> None:
        """Receives into `tensors` in place (see `send` for the tags)."""
        works = [self.pg.recv([t], src_group_rank, tag + i) for i, t in enumerate(tensors)]
        self._wait_p2p(works)

    def _wait_p2p(self, works: Sequence[dist.Work]) -> None:
        wait_p2p(list(works), self._aborted)
