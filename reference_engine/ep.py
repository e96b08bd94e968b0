"""The expert-parallel process group of one epoch, with abortable collectives.

Every collective is issued async and polled together with the engine's abort
signal: a gloo survivor blocked on a peer that died (or on a survivor that gave
up) would otherwise wait out the whole group timeout (../shared/notes/groups.md).

On CUDA the group is NCCL. An NCCL kernel waiting on a dead peer spins on the
GPU and no poll of the host releases it: when the signal aborts the group's
epoch (the agent's thread, on the coordinator's Abort), the group's
communicator is aborted on a helper thread, which ends those kernels, also
ones replayed from a CUDA graph. A retired NCCL group is aborted the same way
(a destroy can hang when a peer is gone).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from coordinator.logs import fields
from worker_agent.adapter import GroupSpec, StepAborted
from worker_agent.groups import (
    GLOO,
    NCCL,
    CollectiveFailed,
    abort_in_background,
    build_group,
    wait_p2p,
    wait_work,
)

__all__ = ["AbortSignal", "CollectiveFailed", "EPGroup", "StepAborted"]

log = logging.getLogger(__name__)


class AbortSignal:
    """Engine-wide: collectives of every epoch <= `aborted_through` give up."""

    def __init__(self) -> None:
        self.aborted_through = 0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[int], None]] = []

    def subscribe(self, listener: Callable[[int], None]) -> None:
        """`listener(epoch)` after every abort; it must not block (it may run
        on the agent's thread)."""
        with self._lock:
            self._listeners.append(listener)

    def abort(self, epoch: int) -> None:
        # Only writers lock; the wait loops read a plain int.
        with self._lock:
            self.aborted_through = max(self.aborted_through, epoch)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(epoch)

    def aborted(self, epoch: int) -> bool:
        return self.aborted_through >= epoch


class EPGroup:
    """A standalone group (gloo, or NCCL on CUDA): group rank i is cluster rank
    `members[i]`."""

    def __init__(
        self,
        pg: dist.ProcessGroup,
        epoch: int,
        members: tuple[int, ...],
        rank: int,
        signal: AbortSignal,
        backend: str = GLOO,
        build_ms: float = 0.0,
    ) -> None:
        self.pg = pg
        self.epoch = epoch
        self.members = members
        self.group_rank = members.index(rank)
        self.backend = backend
        self.build_ms = build_ms
        self._signal = signal
        self._abort_lock = threading.Lock()
        self.abort_thread: threading.Thread | None = None
        self.abort_started = 0.0
        self.abort_ms: float | None = None
        if backend == NCCL:
            signal.subscribe(self._on_abort)

    @classmethod
    def build(
        cls,
        spec: GroupSpec,
        rank: int,
        signal: AbortSignal,
        hostname: str = "127.0.0.1",
        device: str | torch.device | None = None,
    ) -> EPGroup:
        started = time.perf_counter()
        pg = build_group(
            spec, rank, "ep", lambda: signal.aborted(spec.epoch), hostname, device=device
        )
        build_ms = (time.perf_counter() - started) * 1000.0
        return cls(pg, spec.epoch, spec.members, rank, signal, spec.backend, build_ms)

    def _on_abort(self, epoch: int) -> None:
        if epoch >= self.epoch:
            self.abort_communicator()

    def abort_communicator(self) -> None:
        """NCCL: abort the communicator on a helper thread, once (gloo: nothing).
        Never blocks; `abort_thread` is alive until the abort is over."""
        if self.backend != NCCL:
            return
        with self._abort_lock:
            if self.abort_thread is not None:
                return
            self.abort_started = time.monotonic()
            self.abort_thread = abort_in_background(self.pg, self._aborted_in)
        log.info("communicator abort started", extra=fields(epoch=self.epoch))

    def _aborted_in(self, ms: float) -> None:
        self.abort_ms = ms
        log.info(
            "communicator aborted", extra=fields(epoch=self.epoch, backend=self.backend, ms=ms)
        )

    @property
    def aborting(self) -> bool:
        thread = self.abort_thread
        return thread is not None and thread.is_alive()

    def alltoall_equal(self, out: torch.Tensor, rows: torch.Tensor) -> None:
        """Equal splits: rows [size * n, ...] out, [size * n, ...] into `out`.

        gloo: waited here, polled with the abort signal. NCCL: ordered on the
        current CUDA stream and not waited by the host (so it can be captured
        in a CUDA graph); the caller waits for the step's completion together
        with the abort signal."""
        work = self.pg.alltoall_base(out, rows, [], [], dist.AllToAllOptions())
        if self.backend == NCCL:
            work.wait()  # a stream dependency, not a host wait
        else:
            self._wait(work)

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
