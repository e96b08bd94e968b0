"""`epctl bench resync`: the expert weight transfer path against its loopback bound.

Two fresh processes on this machine build the agent's gloo group of an epoch
exactly as the agent does (`build_gloo_group` on a store hosted by the parent,
as the coordinator hosts it), then move the same bytes from rank 0 to rank 1
three ways, taking turns repeat by repeat:
- `execute_resync`: the agent's resync, with a one-source plan whose slots
  carry the bytes (experts of up to 64 MiB, one tensor each), metadata
  broadcast included;
- `gloo_send_recv`: the same tensors through plain `pg.send`/`pg.recv` on the
  same group, without the plan, the metadata and the abort polling;
- `tcp_socket`: one TCP connection between the same two processes, `sendall`
  from the tensors' memory and `recv_into` the receiver's tensors.

The bound is `tcp_socket`: gloo's CPU transport is TCP over loopback, and one
connection moving the bytes with no framing is the most any transfer between
these two processes over it can achieve (gloo may spread a message over more
than one connection, so a ratio a little above 1 is possible). `memcpy` (the
receiver copying the bytes within its own memory) is reported as the ceiling
of moving bytes at all, which no socket reaches.

Every transfer is timed on the receiver, from the moment it tells the sender
to go until its last byte is in; the receiver's bytes are checked against the
sender's pattern after each method's first transfer of each size.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Sequence
from typing import TextIO

import torch
import torch.distributed as dist

from bench.common import BenchError, BenchResult, median, progress, run_peers
from protos.types import Placement, Transfer, TransferPlan
from worker_agent.adapter import GroupSpec
from worker_agent.groups import build_gloo_group
from worker_agent.resync import execute_resync

MIB = 1 << 20
EXPERT_BYTES = 64 * MIB  # the largest slot tensor: bigger sizes are several experts
GO_TAG = 1 << 24  # far above the plan's tags (plan index * 64 + tensor index)
METHODS = ("execute_resync", "gloo_send_recv", "tcp_socket", "memcpy")
BOUND = "tcp_socket"


def run(quick: bool, log: TextIO | None = None) -> BenchResult:
    sizes = [(MIB, 10), (64 * MIB, 3)] if quick else [(MIB, 30), (64 * MIB, 10), (1024 * MIB, 3)]
    progress(log, f"resync: sizes {[s // MIB for s, _ in sizes]} MiB between 2 processes")
    # Hosted here, as the coordinator hosts an epoch's store: neither peer is special.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    budget_s = 180.0 + sum(repeats * size / (20 * MIB) for size, repeats in sizes)
    answers = run_peers(_peer, [(store.port, sizes)] * 2, timeout_s=budget_s)
    timings: dict[str, dict[int, list[float]]] = answers[1]

    result = BenchResult()
    for size, _ in sizes:
        bound_p50 = size / median(timings[BOUND][size])
        for method in METHODS:
            seconds = timings[method][size]
            rates = [size / s for s in seconds]
            # The rate of the median time, so that the bound's own ratio is exactly 1.
            p50 = size / median(seconds)
            result.results.append(
                {
                    "method": method,
                    "size_bytes": size,
                    "size_mib": size // MIB,
                    "repeats": len(seconds),
                    "bytes_per_s_p50": round(p50),
                    "bytes_per_s_max": round(max(rates)),
                    "gib_per_s_p50": round(p50 / (1024 * MIB), 3),
                    "ms_p50": round(median(seconds) * 1000.0, 3),
                    "of_bound_p50": round(p50 / bound_p50, 3),
                }
            )
            progress(log, f"resync: {size // MIB} MiB {method}: {p50 / (1024 * MIB):.2f} GiB/s")
    result.notes += [
        f"bound: {BOUND} (one TCP connection between the same 2 processes, same bytes, "
        "same run); of_bound_p50 = method p50 / bound p50",
        "execute_resync: worker_agent.resync.execute_resync over build_gloo_group's group; "
        f"the plan moves the size as slots of up to {EXPERT_BYTES // MIB} MiB, one tensor each",
        "gloo_send_recv: the same tensors with pg.send/pg.recv on the same group",
        "memcpy: the receiver's own in-memory copy of the same bytes (torch copy_), the "
        "ceiling of moving bytes at all; not reachable over a socket",
        "timed on the receiver, from its go signal to its last byte; sizes in MiB (2^20)",
    ]
    return result


# --- the two peers --------------------------------------------------------------

_Timings = dict[str, dict[int, list[float]]]


def _peer(rank: int, store_port: int, sizes: Sequence[tuple[int, int]]) -> _Timings:
    # One thread, like the socket path: an intra-op pool waking on a busy machine
    # would make memcpy measure the scheduler, not the copy.
    torch.set_num_threads(1)
    spec = GroupSpec(
        epoch=1,
        store_host="127.0.0.1",
        store_port=store_port,
        store_prefix="bench-resync/",
        members=(0, 1),
        timeout_s=300.0,
    )
    group = build_gloo_group(spec, rank, "agent", lambda: False)
    sock = _connect(rank, store_port)
    try:
        timings: _Timings = {m: {} for m in METHODS}
        # An untimed round first: the first transfer of each path pays for setup.
        _measure(rank, group, sock, MIB, 1, {m: {} for m in METHODS})
        for size, repeats in sizes:
            _measure(rank, group, sock, size, repeats, timings)
        return timings
    finally:
        sock.close()


def _connect(rank: int, store_port: int) -> socket.socket:
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, wait_for_workers=False)
    if rank == 1:
        with socket.create_server(("127.0.0.1", 0)) as server:
            store.set("bench-resync/socket-port", str(server.getsockname()[1]))
            conn, _ = server.accept()
            return conn
    port = int(store.get("bench-resync/socket-port"))
    return socket.create_connection(("127.0.0.1", port))


def _chunks(size: int, fill: bool) -> list[torch.Tensor]:
    out = []
    for index, offset in enumerate(range(0, size, EXPERT_BYTES)):
        n = min(EXPERT_BYTES, size - offset)
        if fill:
            # A pattern that differs per chunk and per byte: a misplaced chunk shows.
            t = (torch.arange(n, dtype=torch.int32) + index * 7) % 251
            out.append(t.to(torch.uint8))
        else:
            out.append(torch.zeros(n, dtype=torch.uint8))
    return out


def _measure(
    rank: int,
    group: dist.ProcessGroup,
    sock: socket.socket,
    size: int,
    repeats: int,
    timings: _Timings,
) -> None:
    sending = rank == 0
    tensors = _chunks(size, fill=sending)
    expected = None if sending else _chunks(size, fill=True)
    adapter = _SlotsAdapter(rank, tensors)
    plan, placement = adapter.plan()
    go = torch.zeros(1, dtype=torch.uint8)

    def wait_go() -> None:
        if sending:
            group.recv([go], 1, GO_TAG).wait()
        else:
            group.send([go], 0, GO_TAG).wait()

    def resync() -> None:
        wait_go()
        execute_resync(
            group=group,
            rank=rank,
            members=(0, 1),
            plan=plan,
            metadata_source=0,
            placement=placement,
            adapter=adapter,
            aborted=lambda: False,
        )

    def send_recv() -> None:
        wait_go()
        if sending:
            works = [group.send([t], 1, k) for k, t in enumerate(tensors)]
        else:
            works = [group.recv([t], 0, k) for k, t in enumerate(tensors)]
        for work in works:
            work.wait()

    def tcp() -> None:
        if sending:
            if sock.recv(1) != b"g":
                raise BenchError("socket peer sent no go signal")
            for t in tensors:
                sock.sendall(t.numpy().data)
            return
        sock.sendall(b"g")
        for t in tensors:
            view = t.numpy().data
            got = 0
            while got < len(view):
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise BenchError("socket peer closed mid-transfer")
                got += n

    source = torch.ones(min(size, EXPERT_BYTES), dtype=torch.uint8)  # touched: no page faults

    def memcpy() -> None:
        if not sending:
            for t in tensors:
                t.copy_(source[: t.numel()])

    paths: dict[str, Callable[[], None]] = {
        "execute_resync": resync,
        "gloo_send_recv": send_recv,
        "tcp_socket": tcp,
    }
    for repeat in range(repeats):
        for method, path in paths.items():
            if repeat == 0 and expected is not None:
                for t in tensors:
                    t.zero_()
            started = time.perf_counter()
            path()
            elapsed = time.perf_counter() - started
            timings[method].setdefault(size, []).append(elapsed)
            if repeat == 0 and expected is not None:
                _check(method, tensors, expected)
        started = time.perf_counter()
        memcpy()
        timings["memcpy"].setdefault(size, []).append(time.perf_counter() - started)
        # Keep the peers in step: the next repeat's go must not meet a late memcpy.
        group.barrier().wait()


def _check(method: str, got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> None:
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        if not torch.equal(a, b):
            raise BenchError(f"{method}: chunk {index} arrived with the wrong bytes")


class _SlotsAdapter:
    """An engine whose expert slots are the transfer's chunks: rank 0 holds them
    in slots 0..n-1, rank 1 receives them into slots n..2n-1."""

    def __init__(self, rank: int, tensors: Sequence[torch.Tensor]) -> None:
        self.rank = rank
        self.tensors = list(tensors)
        self.n = len(self.tensors)

    def plan(self) -> tuple[TransferPlan, Placement]:
        experts = tuple(range(self.n))
        placement = Placement(1, self.n, (experts + experts,))
        transfers = tuple(
            Transfer(layer=0, dst_slot=self.n + k, src_slot=k, src_rank=0, dst_rank=1)
            for k in range(self.n)
        )
        return TransferPlan(placement_version=1, transfers=transfers), placement

    def fingerprint(self) -> str:
        return "bench-resync"

    def placement(self) -> Placement:
        return self.plan()[1]

    def abort_collectives(self, epoch: int) -> None:
        pass

    def rebuild_groups(self, spec: GroupSpec) -> None:
        pass

    def expert_tensors(self, layer: int, slot: int) -> Sequence[torch.Tensor]:
        return [self.tensors[slot - self.rank * self.n]]

    def export_metadata(self) -> bytes:
        return json.dumps({"source": self.rank, "slots": self.n}).encode()

    def apply_metadata(self, blob: bytes, placement: Placement) -> None:
        pass

    def reload_experts(self, placement: Placement) -> int:
        return 0  # the bench's shrinks never lose an expert

    def reset_state(self, epoch: int, iteration: int, members: Sequence[int]) -> None:
        pass
