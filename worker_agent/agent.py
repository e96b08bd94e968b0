"""`WorkerAgent`: the engine's whole integration surface.

    agent = WorkerAgent(config, adapter)
    agent.start()                        # register; returns once welcomed
    while serving:
        agent.at_boundary(engine.iteration)   # a comparison when nothing is pending
        try:
            engine.step()
        except (StepAborted, CollectiveFailed) as exc:
            agent.on_step_failed(engine.iteration, exc)   # held until rebuilt
    agent.stop()

`AgentStopped` from `at_boundary`/`on_step_failed` means stop serving (relaunch
with --rejoin); `AgentDrained`, its subclass, that an operator drained the rank
(exit cleanly, do not relaunch).

A background thread runs an asyncio loop that keeps the etcd lease alive and
holds the gRPC session. Neither is needed to serve: with etcd or the
coordinator away the engine goes on serving its epoch, and the agent keeps
trying (a new lease where etcd dropped the old one, a new session with
whichever coordinator the leader key names). Only the coordinator ends a rank:
a refused reconnect, a failed step it never rebuilds, a drain. Commands that
need the engine (rebuild, resync, resume) run on the engine's thread while it
is held inside `at_boundary` or `on_step_failed`, so the engine never sees a concurrent call.

The first `at_boundary` call is the rank's "ready": a founder then waits for
the cluster to form, a joiner is admitted; either returns once resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

import aetcd
import grpc
import torch.distributed as dist

from coordinator import etcd_keys, keepalive
from coordinator.election import decode_leader, read_leader
from coordinator.logs import fields
from coordinator.security import ClientTls, EtcdAccess
from protos.ep_recovery.v1 import worker_pb2, worker_pb2_grpc
from protos.limits import MESSAGE_SIZE_OPTIONS
from protos.types import Placement, TransferPlan
from worker_agent.adapter import EngineAdapter, GroupSpec, StepAborted
from worker_agent.groups import build_gloo_group, drop_in_background, release_in_background
from worker_agent.lease import RankLease
from worker_agent.resync import execute_resync, execute_transfers

log = logging.getLogger(__name__)

# `_hold_at` when nothing is pending: no iteration reaches it.
NEVER = 1 << 62
# Before admission every boundary takes the slow path.
ALWAYS = -(1 << 62)
# `abort_collectives` of every epoch, once the agent is done for.
EVERY_EPOCH = 1 << 62
# aetcd calls have no deadline of their own; an etcd that drops packets must
# not hang the session's (re)connect.
ETCD_READ_TIMEOUT_S = 5.0

REFUSAL_CODES = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
)


class RegistrationRefused(RuntimeError):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class AgentStopped(RuntimeError):
    """The agent was stopped, or lost its lease: the engine must stop serving."""


class AgentDrained(AgentStopped):
    """An operator drained this rank: the cluster goes on without it. The
    engine stops serving and exits cleanly; its supervisor must not relaunch
    it (a relaunch with --rejoin waits for an operator's Admit)."""


@dataclass(frozen=True)
class AgentConfig:
    cluster: str
    rank: int
    # host:port of the coordinator; empty: the leader named in etcd, looked up
    # again on every reconnect (so a standby that took over is found).
    coordinator: str
    etcd: str
    rejoin: bool = False
    lease_ttl_s: int = 1
    connect_timeout_s: float = 60.0
    group_hostname: str = "127.0.0.1"
    # TLS to the coordinator: the CA that verifies it and, under mutual TLS,
    # this rank's certificate and key (empty: plaintext).
    tls: ClientTls = field(default_factory=ClientTls)
    # TLS and/or a user for etcd (the rank's lease client).
    etcd_access: EtcdAccess = field(default_factory=EtcdAccess)


@dataclass(frozen=True)
class _Order:
    """A command the coordinator sent, as the engine thread executes it."""

    epoch: int
    op_id: str
    command_id: int
    command: worker_pb2.Command


_WAKE = object()  # the hold target changed


class WorkerAgent:
    def __init__(self, config: AgentConfig, adapter: EngineAdapter) -> None:
        self.config = config
        self.adapter = adapter
        self.incarnation = uuid.uuid4().hex
        # This process's proof (see Hello.proof): its key in etcd holds only
        # the digest; nothing outside this process ever sees the secret.
        self._proof = secrets.token_hex(32)
        self.epoch = 0
        self.stall_ms: list[float] = []
        # Written by the engine at every boundary, read by the agent thread.
        self._iteration = -1
        # The only thing the hot path reads: the next iteration to stop at.
        self._hold_at = ALWAYS
        self._hold: _Order | None = None
        self._hold_lock = threading.Lock()
        self._admitted = False
        self._inbox: queue.Queue[_Order | object] = queue.Queue()
        self._last_command_id = 0
        # The last ack sent: a command re-sent after a reconnect (its ack was
        # lost with the old session) is answered again, never run twice.
        self._last_ack: tuple[int, worker_pb2.WorkerMessage] | None = None
        self._last_command_key: tuple[str, int] | None = None
        self._ready_announced = False
        self._group: dist.ProcessGroup | None = None
        self._group_lock = threading.Lock()  # the rebuild thread and the engine's
        # The staging group of a prefetch, and what was prefetched: (op id, plan).
        self._staging: dist.ProcessGroup | None = None
        self._prefetched: tuple[str, TransferPlan] | None = None
        self._members: tuple[int, ...] = ()
        self._progress_interval_s = 0.05
        self._loop: asyncio.AbstractEventLoop | None = None
        self._credentials: grpc.ChannelCredentials | None = None
        self._outbox: asyncio.Queue[worker_pb2.WorkerMessage] | None = None
        self._thread: threading.Thread | None = None
        self._welcomed = threading.Event()
        self._start_error: BaseException | None = None
        self._stopping = threading.Event()
        # Set in the agent's loop: drop the session and open a new one now (the
        # leader key names another coordinator).
        self._reconnect: asyncio.Event | None = None
        # The leader the session was opened to (its key's `id`), when found in etcd.
        self._leader_id: str | None = None
        self._lease: RankLease | None = None
        # The lease the last hello named (see _stale_hello).
        self._hello_lease: int | None = None
        self._fatal: str | None = None
        self._drained: str | None = None  # the reason, once told to leave
        # Welcomed first as a member: this process founds the cluster's
        # formation (None until welcomed).
        self._founder: bool | None = None

    # --- engine surface -------------------------------------------------------

    def start(self) -> None:
        """Take the lease and register with the coordinator; raises
        RegistrationRefused with the coordinator's reason when refused."""
        self._thread = threading.Thread(target=self._run_loop, name="ep-agent", daemon=True)
        self._thread.start()
        if not self._welcomed.wait(self.config.connect_timeout_s):
            self.stop()
            raise TimeoutError(
                f"no answer from coordinator {self.config.coordinator or '(leader in etcd)'} "
                f"within {self.config.connect_timeout_s} s"
            )
        if self._start_error is not None:
            error = self._start_error
            self.stop()
            raise error

    def at_boundary(self, iteration: int) -> None:
        self._iteration = iteration
        if iteration >= self._hold_at:
            self._on_target(iteration)

    def on_step_failed(self, last_completed: int, error: BaseException) -> None:
        """The engine's step raised; hold until the coordinator has rebuilt the
        groups. On return the engine's state was reset through the adapter."""
        log.warning(
            "step failed",
            extra=fields(rank=self.config.rank, epoch=self.epoch, error=str(error)[:200]),
        )
        self._send(
            worker_pb2.WorkerMessage(
                step_failed=worker_pb2.StepFailed(
                    epoch=self.epoch, last_completed=last_completed, message=str(error)[:500]
                )
            )
        )
        self._serve(last_completed, time.perf_counter(), failed=True)

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(_WAKE)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # --- held: the engine's thread executes commands -----------------------------

    def _on_target(self, iteration: int) -> None:
        self._check_alive()
        if not self._admitted:
            if self.config.rejoin:
                self._announce_ready()
            self._serve(iteration, time.perf_counter(), failed=False)
            return
        with self._hold_lock:
            hold = self._hold
            if hold is None or iteration != hold.command.hold.iteration:
                if hold is None or iteration > hold.command.hold.iteration:
                    # Passed it (the agent thread said so) or nothing pending.
                    self._hold_at = NEVER if hold is None else self._hold_at
                return
        self._ack(hold, held=worker_pb2.Held(iteration=iteration))
        self._serve(iteration, time.perf_counter(), failed=False)

    def _serve(self, iteration: int, held_since: float, failed: bool) -> None:
        while True:
            item = self._inbox.get()
            self._check_alive()
            if item is _WAKE:
                if self._admitted and not failed and self._released(iteration):
                    return
                continue
            assert isinstance(item, _Order)
            if self._stale(item):
                continue
            try:
                if self._execute(item, iteration, held_since):
                    return
            except AgentStopped:
                raise
            except Exception as exc:
                log.exception("command failed", extra=fields(op_id=item.op_id))
                self._ack(item, failed=worker_pb2.CommandFailed(message=str(exc)[:500]))

    def _released(self, iteration: int) -> bool:
        with self._hold_lock:
            hold = self._hold
            return hold is None or hold.command.hold.iteration > iteration

    def _execute(self, order: _Order, iteration: int, held_since: float) -> bool:
        """Run one command; True when the engine may serve again."""
        cmd = order.command
        superseded = self._superseded_by_newer(order)
        match cmd.WhichOneof("body"):
            case "abort":
                self._ack(order, halted=worker_pb2.Halted(last_completed=iteration))
            case "prefetch":
                self._prefetch(order)
            case "resync":
                if self._group is None:
                    raise RuntimeError("resync before the groups of the epoch were built")
                plan = TransferPlan.from_proto(cmd.resync.plan)
                result = execute_resync(
                    group=self._group,
                    rank=self.config.rank,
                    members=self._members,
                    plan=plan,
                    metadata_source=cmd.resync.metadata_source,
                    placement=Placement.from_proto(cmd.resync.placement),
                    adapter=self.adapter,
                    aborted=superseded,
                    prefetched=self._prefetched == (order.op_id, plan),
                )
                self._ack(
                    order,
                    resynced=worker_pb2.Resynced(
                        bytes_received=result.bytes_received,
                        bytes_sent=result.bytes_sent,
                        transfer_ms=result.transfer_ms,
                    ),
                )
            case "reload":
                started = time.perf_counter()
                loaded = self.adapter.reload_experts(Placement.from_proto(cmd.reload.placement))
                load_ms = (time.perf_counter() - started) * 1000.0
                log.info(
                    "experts reloaded from the checkpoint",
                    extra=fields(rank=self.config.rank, slots=loaded, ms=round(load_ms, 2)),
                )
                self._ack(order, reloaded=worker_pb2.Reloaded(slots_loaded=loaded, load_ms=load_ms))
            case "resume":
                members = tuple(cmd.resume.members)
                self.adapter.reset_state(order.epoch, cmd.resume.iteration, members)
                self.epoch = order.epoch
                with self._hold_lock:
                    self._hold = None
                    self._hold_at = NEVER
                was_admitted, self._admitted = self._admitted, True
                stall_ms = (time.perf_counter() - held_since) * 1000.0 if was_admitted else 0.0
                if was_admitted:
                    self.stall_ms.append(stall_ms)
                self._ack(order, resumed=worker_pb2.Resumed(stall_ms=stall_ms))
                log.info(
                    "resumed",
                    extra=fields(
                        rank=self.config.rank,
                        epoch=self.epoch,
                        iteration=cmd.resume.iteration,
                        stall_ms=round(stall_ms, 2),
                    ),
                )
                return True
            case "retry":
                log.warning("admission rolled back", extra=fields(reason=cmd.retry.reason))
                with self._group_lock:
                    release_in_background(self, "_group")
                self._announce_ready()
            case "hold" | "rebuild":
                pass  # handled off the engine's thread (_on_command)
        return False

    def _rebuild(self, order: _Order) -> None:
        """Build the epoch's groups, the agent's and (through the adapter) the
        engine's, on a thread of its own. In an admission the survivors serve on
        meanwhile: the groups are built before the pause and the engine switches
        to them at Resume. A halted or joining rank waits for the next command."""
        if self._stale(order):
            return
        spec = _group_spec(order.command.rebuild.groups)
        superseded = self._superseded_by_newer(order)
        started = time.perf_counter()
        holder: list[dist.ProcessGroup] = []
        try:
            holder.append(
                build_gloo_group(
                    spec, self.config.rank, "agent", superseded, self.config.group_hostname
                )
            )
            self.adapter.rebuild_groups(replace(spec, store_prefix=spec.store_prefix + "engine/"))
        except Exception as exc:
            if not superseded():
                log.exception("rebuild failed", extra=fields(op_id=order.op_id))
                self._ack(order, failed=worker_pb2.CommandFailed(message=str(exc)[:500]))
            drop_in_background(holder)
            return
        with self._group_lock:
            if superseded():  # the operation was abandoned meanwhile
                drop_in_background(holder)
                return
            release_in_background(self, "_group")
            self._group, self._members = holder.pop(), spec.members
        build_ms = (time.perf_counter() - started) * 1000.0
        self._ack(
            order,
            groups_ready=worker_pb2.GroupsReady(build_ms=build_ms, progress=self._progress()),
        )

    def _stale(self, order: _Order) -> bool:
        """An operation's command from an epoch this rank has left: ignored."""
        if order.epoch < self.epoch and order.op_id:
            log.info("stale command ignored", extra=fields(epoch=order.epoch, op=order.op_id))
            return True
        return False

    def _prefetch(self, order: _Order) -> None:
        """Carry out a Prefetch: this rank's part of the plan on the staging group."""
        cmd = order.command.prefetch
        spec = _group_spec(cmd.groups)
        plan = TransferPlan.from_proto(cmd.plan)
        superseded = self._superseded_by_newer(order)
        started = time.perf_counter()
        self._staging = build_gloo_group(
            spec, self.config.rank, "staging", superseded, self.config.group_hostname
        )
        try:
            received, sent = execute_transfers(
                group=self._staging,
                rank=self.config.rank,
                members=spec.members,
                plan=plan,
                adapter=self.adapter,
                aborted=superseded,
            )
        finally:
            release_in_background(self, "_staging")
        self._prefetched = (order.op_id, plan)
        self._ack(
            order,
            resynced=worker_pb2.Resynced(
                bytes_received=received,
                bytes_sent=sent,
                transfer_ms=(time.perf_counter() - started) * 1000.0,
            ),
        )

    def _prefetch_while_serving(self, order: _Order) -> None:
        """A source's prefetch, on a thread of its own: the engine serves on.
        Expert weights do not change while serving, so reading them here races
        with nothing."""
        try:
            self._prefetch(order)
        except Exception as exc:
            log.exception("prefetch failed", extra=fields(op_id=order.op_id))
            self._ack(order, failed=worker_pb2.CommandFailed(message=str(exc)[:500]))

    def _superseded_by_newer(self, order: _Order) -> _Superseded:
        return _Superseded(self, order.command_id)

    @property
    def founder(self) -> bool:
        """Whether this process founds a formation (welcomed as a member), as
        opposed to joining a running cluster. A rank relaunched with --rejoin
        is a founder when the cluster it comes back to was lost: it loads its
        experts itself (from its checkpoint) before its first boundary, since
        no peer has them. Valid once start() returned."""
        return bool(self._founder)

    @property
    def drained(self) -> bool:
        """Whether the coordinator told this rank to leave (see AgentDrained)."""
        return self._drained is not None

    def _check_alive(self) -> None:
        if self._drained is not None:
            raise AgentDrained(self._drained)
        if self._fatal is not None:
            raise AgentStopped(self._fatal)
        if self._stopping.is_set():
            raise AgentStopped("agent stopped")

    def _ack(self, order: _Order, **body: object) -> None:
        ack = worker_pb2.Ack(epoch=order.epoch, op_id=order.op_id, command_id=order.command_id)
        for name, value in body.items():
            getattr(ack, name).CopyFrom(value)
        message = worker_pb2.WorkerMessage(ack=ack)
        self._last_ack = (order.command_id, message)
        self._send(message)

    def _announce_ready(self) -> None:
        self._ready_announced = True
        self._send(worker_pb2.WorkerMessage(ready=worker_pb2.JoinerReady(epoch=self.epoch)))

    def _die(self, reason: str) -> None:
        """The agent can no longer speak for this rank: the engine's next
        boundary (or wait) raises AgentStopped, and its supervisor relaunches it."""
        first = self._fatal is None
        self._fatal = self._fatal or reason
        self._hold_at = ALWAYS
        self._inbox.put(_WAKE)
        if first:
            # Nobody waits for this rank any more: release the engine from a
            # collective it may be blocked in (a SIGSTOPped rank, thawed after
            # its peers moved on), or it sits there for the group timeout.
            try:
                self.adapter.abort_collectives(EVERY_EPOCH)
            except Exception:
                log.exception("abort of the engine's collectives failed")

    def _send(self, message: worker_pb2.WorkerMessage) -> None:
        loop, outbox = self._loop, self._outbox
        if loop is None or outbox is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(outbox.put_nowait, message)

    # --- the agent's thread: lease and session ---------------------------------

    def _run_loop(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced to the engine via start()/_check_alive
            self._start_error = self._start_error or exc
            self._fatal = self._fatal or f"agent thread died: {exc}"
            log.exception("agent thread died")
        finally:
            self._welcomed.set()
            self._inbox.put(_WAKE)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._outbox = asyncio.Queue()
        # Read once: a file that cannot be read fails start() with its name.
        if self.config.tls.enabled:
            self._credentials = self.config.tls.credentials()
        host, _, port = self.config.etcd.rpartition(":")
        lease = RankLease(
            host=host,
            port=int(port),
            cluster=self.config.cluster,
            rank=self.config.rank,
            ttl=self.config.lease_ttl_s,
            value={
                "rank": self.config.rank,
                "incarnation": self.incarnation,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "proof_sha256": etcd_keys.proof_digest(self._proof),
            },
            on_lost=self._on_lease_lost,
            on_renewed=self._on_lease_renewed,
            access=self.config.etcd_access,
        )
        await self._take_lease(lease)
        self._lease = lease
        self._reconnect = asyncio.Event()
        stop = asyncio.create_task(asyncio.to_thread(self._stopping.wait))
        follow = (
            asyncio.create_task(self._follow_leader(lease), name="ep-agent-leader-watch")
            if not self.config.coordinator
            else None
        )
        try:
            attempt = 0
            while not self._stopping.is_set():
                self._reconnect.clear()
                session = asyncio.create_task(self._session(lease))
                moved = asyncio.create_task(self._reconnect.wait())
                done, _ = await asyncio.wait(
                    {session, stop, moved}, return_when=asyncio.FIRST_COMPLETED
                )
                moved.cancel()
                if stop in done or (moved in done and session not in done):
                    session.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await session
                    if stop in done:
                        break
                    log.warning(
                        "the leader changed: moving the session",
                        extra=fields(rank=self.config.rank, old_leader=self._leader_id),
                    )
                    attempt = 0
                    continue
                try:
                    session.result()
                    attempt = 0
                except grpc.aio.AioRpcError as exc:
                    if await self._stale_hello(exc, lease):
                        # Our hello named the lease we held when the attempt
                        # began; the keepalive has replaced it since (etcd
                        # dropped it), or is about to (the key is gone): a
                        # refusal of that hello, not of this rank.
                        log.warning(
                            "hello named a replaced lease; reconnecting with the new one",
                            extra=fields(rank=self.config.rank, details=exc.details() or ""),
                        )
                    elif exc.code() in REFUSAL_CODES:
                        refused = RegistrationRefused(exc.code(), exc.details() or "")
                        if not self._welcomed.is_set():
                            self._start_error = refused
                            self._welcomed.set()
                        else:
                            # The coordinator removed this rank (or another
                            # process took it): it must stop serving.
                            log.error(
                                "removed by the coordinator; stopping",
                                extra=fields(rank=self.config.rank, reason=str(refused)[:300]),
                            )
                            self._die(f"the coordinator ended this rank's session: {refused}")
                        break
                    else:
                        log.log(
                            logging.WARNING if attempt == 0 else logging.DEBUG,
                            "session lost, reconnecting",
                            # The details tell a refused TLS handshake from a dead peer.
                            extra=fields(
                                rank=self.config.rank,
                                code=exc.code().name,
                                details=(exc.details() or "")[:300],
                                attempt=attempt,
                            ),
                        )
                except (aetcd.ClientError, TimeoutError, OSError, RuntimeError) as exc:
                    # etcd away (no leader to read), or a coordinator that did
                    # not welcome: the engine serves on; try again.
                    log.log(
                        logging.WARNING if attempt == 0 else logging.DEBUG,
                        "no session, retrying",
                        extra=fields(rank=self.config.rank, error=repr(exc)[:300], attempt=attempt),
                    )
                attempt += 1
                await asyncio.sleep(min(1.0, 0.05 * 2**attempt))
        finally:
            stop.cancel()
            if follow is not None:
                follow.cancel()
            self._stopping.set()
            with contextlib.suppress(Exception):
                await lease.stop()

    async def _stale_hello(self, exc: grpc.aio.AioRpcError, lease: RankLease) -> bool:
        """A hello refused for its lease rather than for this rank: the lease
        this agent holds now is another one (renewed since), or the rank key is
        gone (the lease expired under a starved keepalive, and the renewal
        that puts the key back is on its way). A key held by a lease that is
        not ours is another process's: no retry then."""
        if (
            exc.code()
            not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION)
            or self._hello_lease is None
            or lease.lost.is_set()  # not renewed: another process holds the key
        ):
            return False
        if lease.lease_id != self._hello_lease:
            return exc.code() == grpc.StatusCode.PERMISSION_DENIED or await self._key_gone(lease)
        return await self._key_gone(lease)

    async def _key_gone(self, lease: RankLease) -> bool:
        """Whether this rank's key is absent from etcd now (False when etcd
        does not answer: then the refusal stands)."""
        key = etcd_keys.rank_key(self.config.cluster, self.config.rank)
        try:
            got = await asyncio.wait_for(lease.client.get(key), ETCD_READ_TIMEOUT_S)
        except (aetcd.ClientError, TimeoutError):
            return False
        return got is None

    async def _take_lease(self, lease: RankLease) -> None:
        """Start the lease, waiting for an etcd that is down or does not answer
        (a rank relaunched during an etcd outage) for as long as start() waits
        for the coordinator; anything else fails start() at once."""
        give_up_at = time.monotonic() + self.config.connect_timeout_s
        backoff = 0.1
        while True:
            try:
                await lease.start()
                return
            except (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, TimeoutError) as exc:
                if self._stopping.is_set() or time.monotonic() + backoff > give_up_at:
                    raise
                log.warning(
                    "etcd unavailable, retrying the lease",
                    extra=fields(rank=self.config.rank, error=repr(exc)[:200]),
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _on_lease_lost(self) -> None:
        # A rank's lease is renewed, never given up, unless another process
        # holds the rank's key (a relaunch of this rank, while this one was
        # cut off), or the keepalive crashed. Serving goes on: the
        # coordinator decides (it refuses this process's next hello).
        reason = self._lease.lost_reason if self._lease is not None else ""
        log.error("lease lost; serving on", extra=fields(rank=self.config.rank, reason=reason))

    def _on_lease_renewed(self, lease_id: int) -> None:
        """etcd dropped the lease and the keepalive took a new one: bind the
        session to it (a new session's hello carries it anyway)."""
        self._send(
            worker_pb2.WorkerMessage(lease_renewed=worker_pb2.LeaseRenewed(lease_id=lease_id))
        )

    async def _follow_leader(self, lease: RankLease) -> None:
        """Move the session when the leader key names another coordinator: a
        leader frozen with its sockets open would otherwise keep this rank
        for as long as it is frozen, while a standby leads without it."""
        key = etcd_keys.leader_key(self.config.cluster)
        backoff = 0.05
        while True:
            try:
                got = await asyncio.wait_for(lease.client.get(key), ETCD_READ_TIMEOUT_S)
                revision = int(got.mod_revision) if got is not None else 0
                if got is not None:
                    self._leader_seen(decode_leader(bytes(got.value)))
                watch = await lease.client.watch(key, start_revision=revision + 1 or None)
                try:
                    backoff = 0.05
                    async for event in watch:
                        if event.kind == aetcd.EventKind.PUT:
                            self._leader_seen(decode_leader(bytes(event.kv.value)))
                finally:
                    with contextlib.suppress(Exception):
                        await watch.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # etcd away: the session, if any, goes on; try again later.
                log.debug("leader watch failed", extra=fields(error=repr(exc)))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _leader_seen(self, leader: dict[str, object] | None) -> None:
        leader_id = str((leader or {}).get("id", ""))
        if (
            leader_id
            and (leader or {}).get("endpoint")
            and self._leader_id is not None
            and leader_id != self._leader_id
            and self._reconnect is not None
        ):
            self._reconnect.set()

    async def _coordinator_endpoint(self, lease: RankLease) -> str:
        if self.config.coordinator:
            return self.config.coordinator
        leader = await asyncio.wait_for(
            read_leader(lease.client, self.config.cluster), ETCD_READ_TIMEOUT_S
        )
        self._leader_id = str((leader or {}).get("id", "")) or None
        endpoint = str((leader or {}).get("endpoint", ""))
        if not endpoint:
            # Retried like a lost session: a leader is being elected.
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                "no coordinator leads this cluster in etcd yet",
            )
        return endpoint

    async def _session(self, lease: RankLease) -> None:
        assert self._outbox is not None
        endpoint = await self._coordinator_endpoint(lease)
        lease_id = lease.lease_id
        self._hello_lease = lease_id
        placement = self.adapter.placement()
        hello = worker_pb2.Hello(
            cluster=self.config.cluster,
            rank=self.config.rank,
            fingerprint=self.adapter.fingerprint(),
            lease_id=lease_id,
            rejoin=self.config.rejoin,
            incarnation=self.incarnation,
            placement=placement.to_proto(),
            proof=self._proof,
        )
        async with self._channel(endpoint) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            call = stub.Session()
            await call.write(worker_pb2.WorkerMessage(hello=hello))
            first = await call.read()
            if first is grpc.aio.EOF or not first.HasField("welcome"):
                raise RuntimeError("coordinator did not welcome the session")
            self._progress_interval_s = first.welcome.progress_interval_ms / 1000.0
            if self._founder is None:
                self._founder = first.welcome.role == worker_pb2.ROLE_MEMBER
            log.info(
                "registered",
                extra=fields(
                    rank=self.config.rank,
                    role=worker_pb2.Role.Name(first.welcome.role),
                    epoch=first.welcome.epoch,
                ),
            )
            self._welcomed.set()
            if first.welcome.role == worker_pb2.ROLE_JOINER and self._ready_announced:
                # Welcomed again after a reconnect: the coordinator forgot the
                # readiness this joiner announced on the old session.
                self._announce_ready()
            writer = asyncio.create_task(self._write(call))
            progress = asyncio.create_task(self._report_progress())
            try:
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        raise grpc.aio.AioRpcError(
                            grpc.StatusCode.UNAVAILABLE,
                            grpc.aio.Metadata(),
                            grpc.aio.Metadata(),
                            "coordinator ended the session",
                        )
                    if msg.HasField("command"):
                        self._on_command(msg.command)
                    elif msg.HasField("refusal"):
                        log.warning(
                            "coordinator refused a message",
                            extra=fields(
                                code=msg.refusal.code,
                                message=msg.refusal.message,
                                op_id=msg.refusal.op_id,
                            ),
                        )
            finally:
                writer.cancel()
                progress.cancel()

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        # A Resync carries the whole placement: a large cluster's is over
        # gRPC's default 4 MiB (protos/limits.py sizes the limit). Keepalive
        # pings: a session whose coordinator went silent (its host vanished, a
        # partition) is dropped and reopened (coordinator.keepalive).
        options = [*MESSAGE_SIZE_OPTIONS, *keepalive.client_options(self.config.lease_ttl_s)]
        if self._credentials is not None:
            return grpc.aio.secure_channel(endpoint, self._credentials, options=options)
        return grpc.aio.insecure_channel(endpoint, options=options)

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        assert self._outbox is not None
        while True:
            await call.write(await self._outbox.get())

    def _progress(self) -> worker_pb2.Progress:
        return worker_pb2.Progress(
            iteration=self._iteration, rank_clock_ms=time.monotonic() * 1000.0
        )

    async def _report_progress(self) -> None:
        last = None
        while True:
            progress = self._progress()
            if progress.iteration != last:
                last = progress.iteration
                self._send(worker_pb2.WorkerMessage(progress=progress))
            await asyncio.sleep(self._progress_interval_s)

    def _on_command(self, cmd: worker_pb2.Command) -> None:
        key = (cmd.op_id, cmd.command_id)
        if key == self._last_command_key:
            # Re-sent after a reconnect: answer again if it was done, else the
            # ack follows when it is.
            last = self._last_ack
            if last is not None and last[0] == cmd.command_id:
                self._send(last[1])
            return
        order = _Order(cmd.epoch, cmd.op_id, cmd.command_id, cmd)
        self._last_command_key = key
        self._last_command_id = max(self._last_command_id, cmd.command_id)
        kind = cmd.WhichOneof("body")
        if kind == "hold":
            self._on_hold(order)
            return
        if kind == "rebuild":
            threading.Thread(
                target=self._rebuild, args=(order,), name="ep-rebuild", daemon=True
            ).start()
            return
        if kind == "prefetch" and self._admitted:
            threading.Thread(
                target=self._prefetch_while_serving, args=(order,), name="ep-prefetch", daemon=True
            ).start()
            return
        if kind == "leave":
            self._on_leave(cmd.leave.reason)
            return
        if kind == "abort":
            # Releases a step blocked on a dead peer; the engine then holds.
            self.adapter.abort_collectives(cmd.abort.epoch)
        self._inbox.put(order)

    def _on_leave(self, reason: str) -> None:
        """Drained: stop for good. The session ends and the lease is revoked
        (the coordinator expects both and counts neither as a failure); the
        engine, held at the cut, raises AgentDrained."""
        log.info("drained", extra=fields(rank=self.config.rank, reason=reason))
        self._drained = f"rank {self.config.rank} drained: {reason}"
        self._die(self._drained)
        self._stopping.set()

    def _on_hold(self, order: _Order) -> None:
        target = order.command.hold.iteration
        with self._hold_lock:
            self._hold = order
            self._hold_at = target
            # Written after `_hold_at`, read after the engine wrote `_iteration`:
            # if it is below the target, the engine's check at the target sees it.
            reached = self._iteration
        if reached >= target:
            self._ack(order, past_target=worker_pb2.PastTarget(iteration=reached))
        self._inbox.put(_WAKE)


def _group_spec(g: worker_pb2.GroupSpec) -> GroupSpec:
    return GroupSpec(
        epoch=g.epoch,
        store_host=g.store_host,
        store_port=g.store_port,
        store_prefix=g.store_prefix,
        members=tuple(g.members),
        timeout_s=g.timeout_ms / 1000.0,
    )


@dataclass(frozen=True)
class _Superseded:
    """True once a command newer than `command_id` arrived (the coordinator has
    moved on, abandoning the operation) or the agent is stopping: a blocking
    step gives up."""

    agent: WorkerAgent
    command_id: int

    def __call__(self) -> bool:
        agent = self.agent
        return (
            agent._last_command_id > self.command_id
            or agent._fatal is not None
            or agent._stopping.is_set()
        )


__all__ = [
    "AgentConfig",
    "AgentDrained",
    "AgentStopped",
    "ClientTls",
    "EtcdAccess",
    "RegistrationRefused",
    "StepAborted",
    "WorkerAgent",
]
