"""Simulated ranks for `epctl bench fanout`: many per process, no engine.

`python -m bench.fanout_ranks --first F --count N ...` runs ranks F..F+N-1 in
one asyncio loop. Each rank holds what a real rank holds on the control
plane: an etcd lease with its rank key on it, and its own gRPC channel with a
`WorkerService.Session` to the coordinator. It speaks the protocol with the
generated stubs and answers commands as `worker_agent.agent.WorkerAgent`
does, without an engine behind it:

- an iteration counter stands in for the engine: it advances by one every
  `--step-ms` while the rank serves, and stops where the rank is held;
- Hold(T): PastTarget(iteration) when already at or past T, else Held(T) once
  the counter reaches T (a retarget above a held rank releases it first);
- Abort: Halted(iteration); Resume(i): Resumed(stall since the hold), serving
  again from i; Retry: JoinerReady again; Leave: the rank stops;
- Rebuild: GroupsReady at once. **No gloo groups are built** and nothing is
  read from the coordinator's rendezvous store; Resync: Resynced with 0 bytes,
  no weights move. What is measured is the control plane's fan-out and the
  coordinator's own cost, not group builds or transfers (see `bench stall`);
- Progress every interval the coordinator's Welcome names, with the rank's
  clock, when the iteration moved.

A command re-sent with the id of the last one is answered with the same ack,
never run twice, as the agent does.

The leases: one etcd client per process, on a thread of its own, and one
LeaseKeepAlive stream on it carrying every rank's keepalive, each lease
refreshed every TTL/3 (etcd's own Go client multiplexes keepalives the same
way). A real rank has its own etcd client; etcd sees the same leases and the
same keepalives per second, over fewer connections.

Control: one JSON request per line on stdin, one JSON answer per line on
stdout, in order (`start`, `kill`, `join`, `holds`, `stats`, `stop`). Logs go
to stderr. End of stdin stops every rank: a bench that dies takes its hosts
with it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from coordinator import etcd_keys
from coordinator.logs import configure_logging, fields
from protos.ep_recovery.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger("bench.fanout_ranks")
_T = TypeVar("_T")

FINGERPRINT = "bench-fanout"
# Ranks registering at once per process: enough to fill the coordinator's
# queue, few enough that etcd grants and TCP connects do not time out.
START_CONCURRENCY = 64
# How often the keepalive loop looks for leases due (their refresh is every TTL/3).
KEEPALIVE_TICK_S = 0.05


def placement(world_size: int) -> common_pb2.Placement:
    """One layer, one slot per rank, every expert on two ranks half a world
    apart: any single rank can be lost and re-admitted (the plan finds a
    healthy replica for each of its slots)."""
    if world_size < 2 or world_size % 2:
        raise ValueError(f"world size must be even and at least 2, got {world_size}")
    experts = world_size // 2
    return common_pb2.Placement(
        version=1,
        slots_per_rank=1,
        layers=[common_pb2.LayerPlacement(slot_expert=[s % experts for s in range(world_size)])],
    )


def wall_ms() -> float:
    return time.time() * 1000.0


# --- leases --------------------------------------------------------------------


class LeaseKeeper:
    """Every lease of this process: granted, keyed and kept alive over one
    keepalive stream, on a thread and event loop of their own.

    A real rank's lease shares nothing with 255 other ranks' sessions. Here
    one process carries hundreds of sessions, and a burst of their messages
    must not delay the keepalives past the TTL: a lease lost to the harness's
    own load would read as a rank failure.
    """

    def __init__(self, etcd: str, ttl: int) -> None:
        self.ttl = ttl
        self.lost: set[int] = set()
        host, _, port = etcd.rpartition(":")
        self._client = etcd_keys.new_client(host, int(port))
        self._due: dict[int, float] = {}  # lease id -> next refresh (this loop's time)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="leases", daemon=True)
        self._task: concurrent.futures.Future[None] | None = None

    def start(self) -> None:
        self._thread.start()
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self._loop)

    async def grant(self, key: bytes, value: dict[str, Any]) -> int:
        """A new lease with `key` on it (`value` gets its lease_id)."""
        return await self._call(self._grant(key, value))

    async def revoke(self, lease_id: int) -> None:
        await self._call(self._revoke(lease_id))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(Exception):
            await self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 5.0)

    async def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def _grant(self, key: bytes, value: dict[str, Any]) -> int:
        lease = await self._client.lease(self.ttl)
        lease_id = int(lease.id)
        if int(lease.ttl) != self.ttl:
            raise RuntimeError(f"etcd granted a {lease.ttl} s lease for {self.ttl} s")
        value = {**value, "lease_id": lease_id}
        await self._client.put(key, etcd_keys.encode_rank_value(value), lease=lease_id)
        self._due[lease_id] = self._loop.time() + self.ttl / 3
        return lease_id

    async def _revoke(self, lease_id: int) -> None:
        self._due.pop(lease_id, None)
        with contextlib.suppress(Exception):  # expired already: the key is gone either way
            await self._client.revoke_lease(lease_id)

    async def _run(self) -> None:
        from aetcd import rpc

        await self._client.connect()
        interval = self.ttl / 3
        while True:
            call = self._client.leasestub.LeaseKeepAlive(metadata=self._client.metadata)
            reader = asyncio.create_task(self._read(call))
            try:
                while not reader.done():
                    now = self._loop.time()
                    for lease_id, due in list(self._due.items()):
                        if due <= now:
                            self._due[lease_id] = now + interval
                            await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                    await asyncio.sleep(KEEPALIVE_TICK_S)
                reader.result()
            except asyncio.CancelledError:
                call.cancel()
                reader.cancel()
                raise
            except Exception as exc:
                # The stream broke (etcd busy or restarting): open another one;
                # a lease survives a gap shorter than its TTL.
                log.warning("keepalive stream failed, reopening", extra=fields(error=repr(exc)))
                call.cancel()
                reader.cancel()
                await asyncio.sleep(0.1)

    async def _read(self, call: Any) -> None:
        async for reply in call:
            if reply.TTL <= 0 and reply.ID in self._due:
                self.lost.add(int(reply.ID))
                self._due.pop(reply.ID, None)
                log.error("lease lost", extra=fields(lease_id=reply.ID))
        raise ConnectionError("keepalive stream ended")


# --- one simulated rank --------------------------------------------------------


@dataclass
class HostConfig:
    cluster: str
    coordinator: str
    world_size: int
    step_s: float
    placement: common_pb2.Placement
    keeper: LeaseKeeper
    counters: dict[str, int] = field(default_factory=lambda: {"progress": 0, "acks": 0})


@dataclass
class HoldSeen:
    """The last hold order of one operation, as this rank saw it (wall ms)."""

    command_id: int
    received_unix_ms: float
    # How far ahead of this rank the target was when the order arrived.
    ahead_iterations: int
    held_unix_ms: float = 0.0


class SimRank:
    def __init__(self, host: HostConfig, rank: int, rejoin: bool) -> None:
        self.host = host
        self.rank = rank
        self.rejoin = rejoin
        self.incarnation = uuid.uuid4().hex
        self.lease_id = 0
        self.epoch = 0
        self.admitted = False
        # The engine stand-in: the iteration is base_it while frozen, else
        # base_it plus the steps since base_t (loop time).
        self._base_it = 0
        self._base_t = 0.0
        self._frozen = True  # a fresh rank waits for its first Resume
        self._held_since: float | None = None
        self._hold_timer: asyncio.TimerHandle | None = None
        self._last_key: tuple[str, int] | None = None
        self._last_ack: tuple[int, worker_pb2.WorkerMessage] | None = None
        self.holds: dict[str, HoldSeen] = {}
        self._outbox: asyncio.Queue[worker_pb2.WorkerMessage] = asyncio.Queue()
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._progress_s = 0.05
        self.ended = ""  # why the session ended, when the coordinator ended it

    # --- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Lease and key, then the session; returns once welcomed."""
        host = self.host
        proof = secrets.token_hex(32)
        value = {
            "rank": self.rank,
            "incarnation": self.incarnation,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "proof_sha256": etcd_keys.proof_digest(proof),
        }
        self.lease_id = await host.keeper.grant(etcd_keys.rank_key(host.cluster, self.rank), value)
        self._channel = grpc.aio.insecure_channel(host.coordinator)
        stub = worker_pb2_grpc.WorkerServiceStub(self._channel)
        self._call = stub.Session()
        hello = worker_pb2.Hello(
            cluster=host.cluster,
            rank=self.rank,
            fingerprint=FINGERPRINT,
            lease_id=self.lease_id,
            rejoin=self.rejoin,
            incarnation=self.incarnation,
            placement=host.placement,
            proof=proof,
        )
        await self._call.write(worker_pb2.WorkerMessage(hello=hello))
        first = await self._call.read()
        if first is grpc.aio.EOF or not first.HasField("welcome"):
            raise RuntimeError(f"rank {self.rank}: not welcomed ({first!r})")
        self._progress_s = first.welcome.progress_interval_ms / 1000.0
        self._tasks = [
            asyncio.create_task(self._read(), name=f"read-{self.rank}"),
            asyncio.create_task(self._write(), name=f"write-{self.rank}"),
            asyncio.create_task(self._report_progress(), name=f"progress-{self.rank}"),
        ]
        if first.welcome.role == worker_pb2.ROLE_JOINER:
            # The agent announces readiness at its engine's first boundary;
            # this rank has nothing to load.
            self._send(worker_pb2.WorkerMessage(ready=worker_pb2.JoinerReady(epoch=self.epoch)))

    async def stop(self) -> None:
        """Close the session and revoke the lease (a kill, or the end of the run)."""
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close()
        if self.lease_id:
            await self.host.keeper.revoke(self.lease_id)

    # --- the engine stand-in ---------------------------------------------------

    def iteration(self, now: float) -> int:
        if self._frozen:
            return self._base_it
        return self._base_it + int((now - self._base_t) / self.host.step_s)

    def _freeze(self, iteration: int, now: float) -> None:
        self._base_it = iteration
        self._frozen = True
        self._held_since = now

    # --- the session --------------------------------------------------------

    def _send(self, message: worker_pb2.WorkerMessage) -> None:
        self._outbox.put_nowait(message)

    async def _write(self) -> None:
        # One writer: a gRPC stream takes one write at a time.
        while True:
            await self._call.write(await self._outbox.get())

    def _progress(self, now: float) -> worker_pb2.Progress:
        return worker_pb2.Progress(iteration=self.iteration(now), rank_clock_ms=now * 1e3)

    async def _report_progress(self) -> None:
        loop = asyncio.get_running_loop()
        # From the welcome on, as the agent does: ranks welcomed at different
        # moments report at different moments.
        last = None
        while True:
            progress = self._progress(loop.time())
            if progress.iteration != last:
                last = progress.iteration
                self._send(worker_pb2.WorkerMessage(progress=progress))
                self.host.counters["progress"] += 1
            await asyncio.sleep(self._progress_s)

    async def _read(self) -> None:
        try:
            while True:
                msg = await self._call.read()
                if msg is grpc.aio.EOF:
                    self.ended = "coordinator ended the session"
                    break
                if msg.HasField("command"):
                    self._on_command(msg.command)
        except grpc.aio.AioRpcError as exc:
            self.ended = f"{exc.code().name}: {exc.details()}"
        if self.ended:
            log.warning("session ended", extra=fields(rank=self.rank, why=self.ended))

    def _ack(self, cmd: worker_pb2.Command, **body: Any) -> None:
        ack = worker_pb2.Ack(epoch=cmd.epoch, op_id=cmd.op_id, command_id=cmd.command_id, **body)
        message = worker_pb2.WorkerMessage(ack=ack)
        self._last_ack = (cmd.command_id, message)
        self.host.counters["acks"] += 1
        self._send(message)

    def _on_command(self, cmd: worker_pb2.Command) -> None:
        key = (cmd.op_id, cmd.command_id)
        if key == self._last_key:
            # Re-sent after a reconnect: the same answer, never run twice.
            if self._last_ack is not None and self._last_ack[0] == cmd.command_id:
                self._send(self._last_ack[1])
            return
        self._last_key = key
        loop = asyncio.get_running_loop()
        now = loop.time()
        kind = cmd.WhichOneof("body")
        if kind == "hold":
            return self._on_hold(cmd, now)
        if kind == "leave":
            self.ended = "drained"
            return
        if cmd.epoch < self.epoch and cmd.op_id:
            return  # stale, as the agent ignores it
        match kind:
            case "abort":
                self._cancel_hold()
                iteration = self.iteration(now)
                self._freeze(iteration, now)
                self._ack(cmd, halted=worker_pb2.Halted(last_completed=iteration))
            case "rebuild":
                # No groups are built here (see the module doc). Where the
                # engine is, as the agent reports it with this ack.
                groups_ready = worker_pb2.GroupsReady(build_ms=0.0, progress=self._progress(now))
                self._ack(cmd, groups_ready=groups_ready)
            case "prefetch" | "resync":
                # No experts move here either: a prefetch (while serving) and
                # the pause's resync are answered at once.
                self._ack(cmd, resynced=worker_pb2.Resynced())
            case "resume":
                self._cancel_hold()
                stall_ms = 0.0
                if self.admitted and self._held_since is not None:
                    stall_ms = (now - self._held_since) * 1000.0
                self._base_it, self._base_t, self._frozen = cmd.resume.iteration, now, False
                self._held_since = None
                self.epoch = cmd.epoch
                self.admitted = True
                self._ack(cmd, resumed=worker_pb2.Resumed(stall_ms=stall_ms))
            case "retry":
                self._send(worker_pb2.WorkerMessage(ready=worker_pb2.JoinerReady(epoch=self.epoch)))

    def _cancel_hold(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None

    def _on_hold(self, cmd: worker_pb2.Command, now: float) -> None:
        target = cmd.hold.iteration
        self._cancel_hold()
        reached = self.iteration(now)
        self.holds[cmd.op_id] = HoldSeen(cmd.command_id, wall_ms(), target - reached)
        if reached >= target:
            self._ack(cmd, past_target=worker_pb2.PastTarget(iteration=reached))
            return
        if self._frozen and self.admitted:
            # Held at an earlier target: a later one releases the rank, which
            # runs on to it (the agent's _released).
            self._base_t, self._frozen = now, False
        at = self._base_t + (target - self._base_it) * self.host.step_s
        self._hold_timer = asyncio.get_running_loop().call_at(at, self._reach, cmd, target)

    def _reach(self, cmd: worker_pb2.Command, target: int) -> None:
        self._hold_timer = None
        self._freeze(target, asyncio.get_running_loop().time())
        seen = self.holds.get(cmd.op_id)
        if seen is not None and seen.command_id == cmd.command_id:
            seen.held_unix_ms = wall_ms()
        self._ack(cmd, held=worker_pb2.Held(iteration=target))


# --- the host process ------------------------------------------------------------


class Host:
    """This process's ranks, and the bench's requests about them."""

    def __init__(self, config: HostConfig, first: int, count: int) -> None:
        self.config = config
        self.first = first
        self.count = count
        self.ranks: dict[int, SimRank] = {}

    async def start_ranks(self, ranks: list[int], rejoin: bool) -> None:
        limit = asyncio.Semaphore(START_CONCURRENCY)

        async def one(rank: int) -> None:
            async with limit:
                sim = SimRank(self.config, rank, rejoin)
                self.ranks[rank] = sim
                await sim.start()

        await asyncio.gather(*(one(r) for r in ranks))

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "start":
            started = time.perf_counter()
            await self.start_ranks(list(range(self.first, self.first + self.count)), False)
            return {"welcomed": self.count, "ms": (time.perf_counter() - started) * 1e3}
        if op == "kill":
            sim = self.ranks.pop(int(request["rank"]))
            await sim.stop()
            return {}
        if op == "join":
            await self.start_ranks([int(request["rank"])], True)
            return {}
        if op == "holds":
            op_id = str(request["op_id"])
            seen = {
                str(rank): [s.command_id, s.received_unix_ms, s.held_unix_ms, s.ahead_iterations]
                for rank, sim in self.ranks.items()
                if (s := sim.holds.get(op_id)) is not None
            }
            return {"holds": seen}
        if op == "stats":
            ended = {str(r): s.ended for r, s in self.ranks.items() if s.ended}
            return {
                **self.config.counters,
                "lost_leases": len(self.config.keeper.lost),
                "sessions_ended": ended,
            }
        raise ValueError(f"unknown request {op!r}")

    async def stop(self) -> None:
        await asyncio.gather(*(sim.stop() for sim in self.ranks.values()), return_exceptions=True)
        self.ranks.clear()


async def _serve(args: argparse.Namespace) -> None:
    keeper = LeaseKeeper(args.etcd, args.lease_ttl)
    keeper.start()
    config = HostConfig(
        cluster=args.cluster,
        coordinator=args.coordinator,
        world_size=args.world_size,
        step_s=args.step_ms / 1000.0,
        placement=placement(args.world_size),
        keeper=keeper,
    )
    host = Host(config, args.first, args.count)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    answer: Callable[[dict[str, Any]], None] = _answer
    try:
        while line := await reader.readline():
            request = json.loads(line)
            if request.get("op") == "stop":
                break
            try:
                answer({"ok": True, **await host.handle(request)})
            except Exception as exc:
                log.exception("request failed", extra=fields(request=request))
                answer({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        await _quietly(host.stop())
        await _quietly(keeper.stop())
        answer({"ok": True, "stopped": True})


async def _quietly(awaitable: Awaitable[object]) -> None:
    with contextlib.suppress(Exception):
        await awaitable


def _answer(doc: dict[str, Any]) -> None:
    # stdout is the control channel to the bench (the answer to one request).
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout_ranks", description=__doc__)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--coordinator", required=True, help="host:port of its WorkerService")
    parser.add_argument("--etcd", required=True, help="host:port")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--first", type=int, required=True, help="first rank of this process")
    parser.add_argument("--count", type=int, required=True, help="ranks in this process")
    parser.add_argument("--lease-ttl", type=int, default=5, help="seconds")
    parser.add_argument("--step-ms", type=float, default=20.0, help="one simulated iteration")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
