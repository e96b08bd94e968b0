"""The daemon around the pure state machine: etcd, the rendezvous store, gRPC.

All state changes go through one dispatch task: it takes an event, lets the
machine decide, writes the new record to etcd, and only then hands commands to
the sessions (write-ahead: what a rank is told is never ahead of what etcd says).

Only the leader runs a Coordinator (coordinator.election). Each record write is
fenced by the leader key; a write the fence refuses, or etcd unreachable for
longer than the leader lease, deposes this coordinator: it stops dispatching,
its Coordinator is torn down (sessions, gRPC server, store), and `serve` stands
by again in the same process.

The operation history (coordinator.history) lives in etcd too
(coordinator.history_store): operation summaries go with the record write
that starts or ends them, the rest is written by a background task that the
dispatch loop never waits for, and a new leader loads it at its take-over.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence

import aetcd
import grpc
import torch.distributed as dist
from grpc_health.v1 import health as grpc_health

from coordinator import etcd_keys, keepalive, security
from coordinator import state_machine as sm
from coordinator.cluster_store import ClusterStore, StaleWrite
from coordinator.config import CoordinatorConfig, is_loopback, split_host_port
from coordinator.election import Deposed, LeaderLease, campaign
from coordinator.history import History, OperationRecord
from coordinator.history_store import EventSeq, HistoryStore, HistoryWriter
from coordinator.logs import fields
from coordinator.membership import LeaseWatcher
from coordinator.metrics import CoordinatorMetrics, bound_port, start_metrics_server
from coordinator.services import (
    NUMBERING_UNAVAILABLE,
    SessionChannel,
    Watcher,
    add_services,
    end_health,
    event_to_proto,
    set_serving,
)
from coordinator.wire import WireGuard
from protos.limits import MESSAGE_SIZE_OPTIONS

log = logging.getLogger(__name__)

# How long an admin call waits for the state machine's answer.
ADMIN_TIMEOUT_S = 10.0
# How often phase deadlines are checked: their resolution.
TICK_S = 0.25
# How long a scrape waits for the transition being carried out (see render_metrics).
METRICS_LOCK_WAIT_S = 1.0
# A record write that etcd did not take is retried this often until the leader
# lease would have expired; then this coordinator steps down.
PERSIST_RETRY_S = 0.1
# How long a clean stop waits for the history's last write.
HISTORY_FINAL_WRITE_S = 1.0
# The sources of EtcdReachability.
RECORD_WRITES = "cluster record writes"
LEADER_REFRESHES = "leader lease refreshes"


class EtcdReachability:
    """Whether etcd answers this coordinator. Each source (the leader lease's
    refreshes, the cluster record's writes) reports its last outcome; etcd is
    reachable while none of them is failing. `changed` is set on each change
    (the gRPC health follows it)."""

    def __init__(self) -> None:
        self._failing: dict[str, str] = {}
        self.changed = asyncio.Event()

    @property
    def reachable(self) -> bool:
        return not self._failing

    @property
    def problems(self) -> dict[str, str]:
        return dict(self._failing)

    def report(self, source: str, problem: str = "") -> None:
        """`problem` empty: the source's last etcd call got through."""
        was = self.reachable
        if problem:
            self._failing[source] = problem
        else:
            self._failing.pop(source, None)
        if self.reachable != was:
            if self.reachable:
                log.info("etcd reachable again", extra=fields(source=source))
            else:
                log.warning("etcd unreachable", extra=fields(source=source, problem=problem))
            self.changed.set()


class Coordinator:
    def __init__(self, config: CoordinatorConfig, leader: LeaderLease | None = None) -> None:
        """`leader`: the leadership this coordinator holds; its fence guards every
        record write. None only where no election runs (unit tests)."""
        self.config = config
        self.leader = leader
        # Set (with the reason) once this coordinator must stop acting.
        self.deposed = asyncio.Event()
        self.deposed_reason = ""
        self.machine = sm.RecoveryStateMachine(
            config.cluster,
            config.world_size,
            fingerprint=config.fingerprint,
            auto_rejoin=config.auto_rejoin,
            hold_lead_s=config.hold_lead_s,
            deadlines_s=config.phase_deadlines_s,
            hang_timeout_s=config.hang_timeout_s,
            lease_rebind_s=config.lease_rebind_s,
            reconnect_window_s=config.reconnect_window_s or 2.0 * config.leader_ttl_s,
        )
        self.history = History()
        # The WatchEvents numbering: the last seq given out, and the ceiling
        # etcd holds (history_store.EventSeq).
        self.seq = EventSeq()
        self.sessions: dict[str, SessionChannel] = {}
        self.store_port = 0
        self.listen_port = 0
        self.metrics_port = 0  # 0 while metrics are not served
        self.metrics = CoordinatorMetrics()
        self.etcd_access = security.etcd_access(config)
        self.etcd_reachability = EtcdReachability()
        self._events: asyncio.Queue[sm.Event] = asyncio.Queue()
        self._etcd: aetcd.Client | None = None
        self._cluster_store: ClusterStore | None = None
        self._history_store: HistoryStore | None = None
        # The history writer's own etcd client: its larger writes never queue
        # the record's writes behind them on one connection.
        self._history_etcd: aetcd.Client | None = None
        self._history_writer: HistoryWriter | None = None
        self._store: dist.TCPStore | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Held from an event's handling until its actions are carried out, so a
        # reader (GetStatus) never sees a transition that is not yet persisted.
        self.dispatch_lock = asyncio.Lock()
        # Admin calls waiting for the machine's answer, by request id.
        self._admin_waiters: dict[str, list[asyncio.Future[sm.AdminAnswered]]] = {}
        # Called with every phase entered (e.g. the systemd STATUS= line).
        self.phase_hooks: list[Callable[[sm.PhaseEntered], None]] = []
        # WatchEvents streams; each gets every event after its snapshot.
        self.watchers: set[Watcher] = set()
        # Wall clock of a monotonic instant, for times other processes compare.
        self._wall_offset = time.time() - time.monotonic()

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        host, port = split_host_port(self.config.etcd)
        self._etcd = etcd_keys.new_client(host, port, access=self.etcd_access)
        await self._etcd.connect()
        self._cluster_store = ClusterStore(self._etcd, self.config.cluster)
        self._history_store = HistoryStore(self._etcd, self.config.cluster)
        # The rendezvous store lives here, never on a rank: a dead store host
        # fails silently on set(), and any rank may be the one that dies.
        self._store = host_store(self.config.store_host, self.config.store_port)
        self.store_port = self._store.port
        await self._take_over()
        self._history_etcd = etcd_keys.new_client(host, port, access=self.etcd_access)
        self._history_writer = HistoryWriter(
            HistoryStore(self._history_etcd, self.config.cluster),
            self.history,
            self.seq,
            self._fence,
            self.step_down,
        )
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name="dispatch"),
            asyncio.create_task(self._watch_leases(), name="lease-watch"),
            asyncio.create_task(self._tick(), name="deadlines"),
            asyncio.create_task(self._history_writer.run(), name="history"),
        ]
        log.info(
            "coordinator started",
            extra=fields(
                cluster=self.config.cluster,
                world_size=self.config.world_size,
                store=f"{self.config.store_host}:{self.store_port}",
            ),
        )

    async def _take_over(self) -> None:
        """Go on from the record a previous coordinator persisted, if any."""
        assert self._cluster_store is not None and self._etcd is not None
        raw, _ = await self._cluster_store.load()
        record = sm.ClusterRecord.from_json(raw) if raw is not None else None
        await self._take_over_history()
        if record is None or not record.members:
            await self._apply(self.machine.start(time.monotonic()))
            return
        live: dict[int, tuple[str, int]] = {}
        for kv in await self._etcd.get_prefix(etcd_keys.ranks_prefix(self.config.cluster)):
            rank = etcd_keys.parse_rank_key(self.config.cluster, kv.key)
            value = etcd_keys.decode_rank_value(kv.value)
            if rank is not None and value is not None:
                live[rank] = (str(value.get("incarnation", "")), int(value.get("lease_id", 0)))
        await self._apply(self.machine.restore(record, live, time.monotonic()))
        log.info(
            "took over the cluster record",
            extra=fields(
                epoch=record.epoch,
                members=list(record.members),
                phase=str(record.phase),
                operation=record.operation.op_id if record.operation else "",
                live=sorted(live),
            ),
        )

    async def _take_over_history(self) -> None:
        """Load the operation history a previous leader left in etcd, and
        reserve the first block of event numbers above its ceiling (fenced,
        before any event is numbered). Deposed when the fence fails."""
        assert self._history_store is not None
        loaded = await self._history_store.load()
        self.history = loaded.history
        self.seq = EventSeq(last=loaded.seq_ceiling, durable=loaded.seq_ceiling)
        ceiling = self.seq.wanted()
        try:
            await self._history_store.reserve(
                ceiling, self.seq.last, self.history.oldest_kept, self._fence()
            )
        except StaleWrite as exc:
            raise Deposed(f"fenced history write refused: {exc}") from exc
        self.seq.durable = ceiling
        log.info(
            "took over the operation history",
            extra=fields(
                operations=len(self.history.operations),
                first_seq=self.seq.last + 1,
                unreadable=loaded.unreadable,
            ),
        )

    def _fence(self) -> list[object]:
        return self.leader.fence() if self.leader is not None else []

    async def operation_detail(self, record: OperationRecord) -> None:
        """Read the phase and rank spans of an operation loaded from etcd
        (a predecessor's) into it, if not yet read. TimeoutError or an aetcd
        error when etcd does not answer."""
        if record.detail_loaded or self._history_store is None:
            return
        await self._history_store.read_detail(record)
        self.history.link_phases(record)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        writer = self._history_writer
        leading = not self.deposed.is_set() and not (
            self.leader is not None and self.leader.lost.is_set()
        )
        if writer is not None and writer.pending and leading:
            # A clean stop hands the successor everything (still fenced).
            try:
                await asyncio.wait_for(writer.flush(), HISTORY_FINAL_WRITE_S)
            except Exception as exc:
                log.warning("history's last write failed", extra=fields(error=repr(exc)))
        for channel in self.sessions.values():
            channel.outbox.put_nowait(None)
        self.end_watches()
        if self._etcd is not None:
            await self._etcd.close()
        if self._history_etcd is not None:
            with contextlib.suppress(Exception):
                await self._history_etcd.close()
        self._store = None

    async def rank_key(self, rank: int) -> tuple[int, str]:
        """`rank`'s key in etcd, read now: the lease that holds it (0: no key)
        and the digest of its process's proof ("" when none)."""
        assert self._etcd is not None
        got = await self._etcd.get(etcd_keys.rank_key(self.config.cluster, rank))
        if got is None:
            return 0, ""
        value = etcd_keys.decode_rank_value(bytes(got.value)) or {}
        return int(got.lease), str(value.get("proof_sha256", ""))

    # --- events in ------------------------------------------------------------

    def submit(self, event: sm.Event) -> None:
        self._events.put_nowait(event)

    async def admin(
        self, request_id: str, command: sm.AdminCommand, timeout_s: float = ADMIN_TIMEOUT_S
    ) -> sm.AdminAnswered:
        """Hand an operator's call to the state machine; its answer (TimeoutError
        if the dispatch is stuck, e.g. on an etcd write)."""
        future: asyncio.Future[sm.AdminAnswered] = asyncio.get_running_loop().create_future()
        waiters = self._admin_waiters.setdefault(request_id, [])
        waiters.append(future)
        self.submit(sm.AdminRequested(request_id, command))
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._admin_waiters.pop(request_id, None)

    async def _dispatch_loop(self) -> None:
        while True:
            event = await self._events.get()
            async with self.dispatch_lock:
                try:
                    await self._apply(self.machine.handle(event, time.monotonic()))
                except Deposed as exc:
                    # Nothing of this transition was carried out: the new
                    # leader goes on from the last record that was written.
                    self.step_down(str(exc))
                    return
                except Exception:
                    log.exception("dispatch failed", extra=fields(event=repr(event)))

    def step_down(self, reason: str) -> None:
        if not self.deposed.is_set():
            self.deposed_reason = reason
            self.deposed.set()
            log.error("stepping down", extra=fields(cluster=self.config.cluster, reason=reason))

    async def _apply(self, actions: list[sm.Action]) -> None:
        """Persist the newest record among `actions` first, then carry them out.

        The summaries of the operations the actions start or end go into the
        record's transaction (history_store: small, no extra round trip, and
        the history never disagrees with the record). Spans, the timeline and
        failures are left to the history writer, which the loop never waits for."""
        records = [a.record for a in actions if isinstance(a, sm.Persist)]
        preview = self.history.preview(actions, self.unix_ms)
        if preview.operations and not records:
            # Starting or ending an operation always changes the record; should
            # one not, its summary still goes with a record write.
            records = [self.machine.record()]
        if records:
            extra: list[object] = []
            if self._history_store is not None and preview.operations:
                extra = self._history_store.summary_ops(preview.operations, preview.oldest_kept)
            await self._persist(records[-1], extra)
        for action in actions:
            self._carry_out(action)

    async def _tick(self) -> None:
        """Let the state machine check its phase deadlines."""
        while True:
            await asyncio.sleep(TICK_S)
            self.submit(sm.Tick())

    async def _watch_leases(self) -> None:
        assert self._etcd is not None
        watcher = LeaseWatcher(self._etcd, self.config.cluster)
        try:
            async for event in watcher.events():
                if event.kind == "delete":
                    lease_id = int((event.value or {}).get("lease_id", 0))
                    self.submit(sm.LeaseExpired(event.rank, lease_id))
        finally:
            await watcher.close()

    async def _persist(self, record: sm.ClusterRecord, extra: Sequence[object] = ()) -> None:
        """Write the record (and `extra`, more transaction operations), fenced
        by the leader key. Deposed when the fence fails or etcd takes no write
        for as long as the leader lease lasts: by then a standby may lead, and
        nothing may be carried out here."""
        assert self._cluster_store is not None
        raw = record.to_json()
        give_up_at = time.monotonic() + (self.leader.ttl if self.leader else ADMIN_TIMEOUT_S)
        failures = 0
        while True:
            if self.leader is not None and self.leader.lost.is_set():
                raise Deposed(f"leader lease lost: {self.leader.lost_reason}")
            fence = self.leader.fence() if self.leader is not None else []
            try:
                await asyncio.wait_for(
                    self._cluster_store.save(raw, extra_compares=fence, extra_success=extra),
                    max(0.0, give_up_at - time.monotonic()),
                )
                self.etcd_reachability.report(RECORD_WRITES)
                return
            except StaleWrite as exc:
                raise Deposed(f"fenced write refused: {exc}") from exc
            except (TimeoutError, aetcd.ClientError) as exc:
                failures += 1
                self.etcd_reachability.report(RECORD_WRITES, f"record write failed: {exc!r}")
                if time.monotonic() >= give_up_at:
                    raise Deposed(
                        f"etcd took no write of the cluster record for "
                        f"{self.leader.ttl if self.leader else ADMIN_TIMEOUT_S} s "
                        f"({failures} tries): {exc!r}"
                    ) from exc
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "cluster record write failed, retrying",
                    extra=fields(failures=failures, error=repr(exc)),
                )
                await asyncio.sleep(PERSIST_RETRY_S)

    # --- actions out ----------------------------------------------------------

    def _carry_out(self, action: sm.Action) -> None:
        match action:
            case sm.Accept() | sm.Send() | sm.Refuse():
                self.deliver(action)
            case sm.AdminAnswered():
                method, arguments = (
                    sm.describe_admin(action.command) if action.command else ("", "")
                )
                log.info(
                    "admin call answered",
                    extra=fields(
                        request_id=action.request_id,
                        method=method,
                        arguments=arguments,
                        code=action.code or "OK",
                        message=action.message,
                        replayed=action.replayed,
                    ),
                )
                for future in self._admin_waiters.pop(action.request_id, []):
                    if not future.done():
                        future.set_result(action)
                self._publish(action, self.unix_ms(time.monotonic()))
            case sm.PhaseEntered():
                self._record_phase(action)
            case sm.RankFailed():
                suspected = (
                    self.unix_ms(action.suspected_at) if action.suspected_at is not None else 0.0
                )
                at = self.unix_ms(action.at)
                self.history.failed(action, suspected, at)
                self.metrics.observe_failure(action)
                log.warning(
                    "rank failed",
                    extra=fields(rank=action.rank, reason=action.reason, epoch=self.machine.epoch),
                )
                self._publish(action, at)
            case sm.OperationStarted():
                at = self.unix_ms(action.at)
                self.history.operation_started(action, at)
                log.info(
                    "operation started",
                    extra=fields(
                        op_id=action.op_id,
                        kind=action.kind,
                        target_epoch=action.target_epoch,
                        joining=list(action.joining),
                        leaving=list(action.leaving),
                    ),
                )
                self._publish(action, at)
            case sm.RankDone():
                self.history.rank_done(
                    action, self.unix_ms(action.started_at), self.unix_ms(action.at)
                )
            case sm.OperationEnded():
                now = self.unix_ms(action.at)
                self.history.operation_ended(action, now)
                self.metrics.observe_operation(action)
                log.info(
                    "operation ended",
                    extra=fields(
                        op_id=action.op_id,
                        kind=action.kind,
                        outcome=action.outcome,
                        epoch=action.epoch,
                        stall_ms=round(action.stall_ms, 2),
                        reason=action.reason,
                    ),
                )
                self._publish(action, now)

    def deliver(self, action: sm.Accept | sm.Send | sm.Refuse) -> None:
        """Queue a message for its session (dropped if the session is gone);
        refusals are counted, whether the machine or the service made them."""
        if isinstance(action, sm.Refuse):
            self.metrics.observe_refused(action.code)
        channel = self.sessions.get(action.session)
        if channel is not None:
            channel.outbox.put_nowait(action)

    def _record_phase(self, action: sm.PhaseEntered) -> None:
        at = self.unix_ms(action.at)
        closed = self.history.phase_entered(action, at)
        if closed is not None and not closed.inherited:
            self.metrics.observe_phase(closed.phase, (at - closed.start_unix_ms) / 1000.0)
        log.info(
            "phase",
            extra=fields(phase=action.phase, epoch=action.epoch, op_id=action.op_id),
        )
        self._publish(action, at)
        for hook in self.phase_hooks:
            try:
                hook(action)
            except Exception:
                log.exception("phase hook failed", extra=fields(phase=action.phase))

    def unix_ms(self, monotonic_s: float) -> float:
        return (monotonic_s + self._wall_offset) * 1000.0

    # --- the event stream -----------------------------------------------------

    def watch(self) -> Watcher:
        """A new WatchEvents subscriber. Call it holding `dispatch_lock`, with
        the snapshot taken under the same hold: no event falls between them."""
        watcher = Watcher()
        self.watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    def end_watches(self) -> None:
        """End every WatchEvents stream cleanly (at shutdown)."""
        for watcher in self.watchers:
            watcher.close()
        self.watchers.clear()

    @property
    def event_seq(self) -> int:
        """The seq of the last event numbered (a snapshot's)."""
        return self.seq.last

    def _publish(self, action: sm.Action, unix_ms: float) -> None:
        """Hand an event to every watcher. Called as actions are carried out,
        after the record was persisted: a watcher never sees a transition
        etcd does not hold, nor a seq above the ceiling etcd holds (a
        successor numbers from above it)."""
        seq = self.seq.next()
        if self.seq.wanted() and self._history_writer is not None:
            self._history_writer.poke()  # the next block of numbers
        if not self.watchers:
            return  # nobody listens: no conversion
        if not self.seq.sendable:
            # Not one block reserved ahead: etcd has taken no history write
            # for thousands of events. Rather than send a number a successor
            # could give out again, end the streams (watch again later).
            for watcher in list(self.watchers):
                watcher.fail(NUMBERING_UNAVAILABLE)
            self.watchers.clear()
            log.warning("event streams ended: their numbering waits for etcd")
            return
        event = event_to_proto(self, action, unix_ms, seq)
        if event is None:
            return
        for watcher in list(self.watchers):
            if not watcher.offer(event):
                # Too slow to keep up: cut it off rather than buffer without bound.
                self.watchers.discard(watcher)
                log.warning("event watcher fell behind; its stream ends")

    async def render_metrics(self, accept: str = "") -> tuple[bytes, str]:
        """The /metrics body and content type, with the state gauges read now.

        Like GetStatus, it waits for the transition in flight to be carried out,
        but only briefly: while etcd hangs a write, the scrape still answers
        (then the gauges may be one unpersisted transition ahead).
        """
        locked = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.dispatch_lock.acquire(), METRICS_LOCK_WAIT_S)
            locked = True
        try:
            machine = self.machine
            self.metrics.set_state(
                machine.epoch,
                machine.phase,
                (machine.rank_state(rank) for rank in range(machine.world_size)),
            )
        finally:
            if locked:
                self.dispatch_lock.release()
        return self.metrics.render(accept)


# The listen backlog torch's own store server uses: a cluster's ranks connect at once.
STORE_BACKLOG = 16384


def host_store(host: str, port: int) -> dist.TCPStore:
    """The rendezvous store's server, listening on `host` (the address
    `store_host` names, the first one if a name has several) and nowhere else.

    TCPStore binds the port on every interface by itself ("::" or 0.0.0.0),
    whatever host it is given. So the socket is bound here and handed over
    (master_listen_fd); the store owns it from then on and closes it when it
    stops. OSError when the address is not this host's or the port is taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"cannot host the rendezvous store on {host}:{port}: {exc}") from exc
    with sock:
        try:
            # As torch's own server does: a restarted daemon gets its fixed
            # port back while old connections linger in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(STORE_BACKLOG)
        except OSError as exc:
            raise OSError(f"cannot host the rendezvous store on {host}:{port}: {exc}") from exc
        # The store gets a duplicate, and owns it. Should it fail to start, it
        # may have closed that one already: it is left alone rather than risk
        # closing a descriptor reused since (a failed start ends the daemon).
        return dist.TCPStore(
            host,
            sock.getsockname()[1],
            is_master=True,
            wait_for_workers=False,
            master_listen_fd=os.dup(sock.fileno()),
            use_libuv=True,
        )


def advertised_endpoint(config: CoordinatorConfig, port: int) -> str:
    """Where agents reach this coordinator: `advertise_host` if set, else the
    listen host, or this host's name when listening on every interface."""
    host = config.advertise_host or split_host_port(config.listen)[0]
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(
    config: CoordinatorConfig,
    on_ready: Callable[[Coordinator], None] | None = None,
    on_standby: Callable[[dict[str, object]], None] | None = None,
    secrets: security.ServerSecrets | None = None,
) -> None:
    """Run the daemon until cancelled: stand by while another coordinator
    leads, then lead. `on_standby` is called with the leader's key value each
    time a new leader is seen (and with {} when this one steps down),
    `on_ready` each time this one leads and serves. `secrets`: what the
    configuration's files hold (read here when None; ConfigError when one is
    unusable).

    A leader that loses its leadership (a fenced write refused, its lease lost
    to an etcd outage or a freeze) steps down in this process: it stops
    serving at once and stands by again, so that once etcd answers some
    coordinator leads without anyone restarting one."""
    if secrets is None:
        secrets = security.load_server_secrets(config)
    host, port = split_host_port(config.etcd)
    access = security.etcd_access(config)
    watcher = etcd_keys.new_client(host, port, access=access)
    try:
        while True:
            # A new identity per term: agents tell this term's leader from
            # the last one's by it.
            identity = {
                "id": uuid.uuid4().hex[:12],
                "pid": os.getpid(),
                "host": socket.gethostname(),
            }
            leader = await campaign(
                functools.partial(
                    LeaderLease,
                    host,
                    port,
                    config.cluster,
                    ttl=config.leader_ttl_s,
                    identity=identity,
                    access=access,
                ),
                watcher,
                on_standby=on_standby,
            )
            log.info(
                "leading",
                extra=fields(
                    cluster=config.cluster, id=identity["id"], fence=leader.fence_revision
                ),
            )
            try:
                await _lead(config, leader, on_ready, secrets)
            except Deposed as exc:
                log.error(
                    "stepped down; standing by",
                    extra=fields(cluster=config.cluster, reason=str(exc)),
                )
                if on_standby is not None:
                    on_standby({})
            finally:
                await leader.stop()  # revoked: a standby takes over now, not a TTL later
    finally:
        with contextlib.suppress(Exception):
            await watcher.close()


def _bind(
    server: grpc.aio.Server, config: CoordinatorConfig, secrets: security.ServerSecrets
) -> int:
    """Listen on `config.listen`, over TLS when configured; the bound port."""
    credentials = secrets.server_credentials()
    try:
        if credentials is not None:
            bound = server.add_secure_port(config.listen, credentials)
        else:
            bound = server.add_insecure_port(config.listen)
    except RuntimeError:  # grpcio >= 1.5x raises where older ones returned 0
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {config.listen}")
    if credentials is None:
        # Loopback only, unless insecure_listen said so (coordinator.config).
        log.warning(
            "serving without TLS",
            extra=fields(listen=config.listen, insecure_listen=config.insecure_listen),
        )
    admin = []
    if secrets.admin_token:
        admin.append("bearer token")
    if secrets.admin_identities:
        admin.append("client certificate (" + ",".join(sorted(secrets.admin_identities)) + ")")
    log.info(
        "transport security",
        extra=fields(
            tls=credentials is not None,
            mutual_tls=bool(secrets.client_ca),
            admin_credential=" or ".join(admin) or "none",
        ),
    )
    if not admin and not is_loopback(split_host_port(config.listen)[0]):
        log.warning(
            "mutating admin calls are open to every client that reaches the port; "
            "set admin_token_file or admin_identities",
            extra=fields(listen=config.listen),
        )
    return bound


async def _follow_etcd(
    health: grpc_health.aio.HealthServicer,
    reachability: EtcdReachability,
    metrics: CoordinatorMetrics,
) -> None:
    """Keep the gRPC health (and the etcd_reachable gauge) in step with
    whether etcd answers: NOT_SERVING while it does not."""
    serving: bool | None = None
    while True:
        reachability.changed.clear()
        now = reachability.reachable
        if now != serving:
            serving = now
            await set_serving(health, now)
            metrics.etcd_reachable.set(1 if now else 0)
            log.info(
                "health",
                extra=fields(
                    status="SERVING" if now else "NOT_SERVING", etcd=reachability.problems
                ),
            )
        await reachability.changed.wait()


async def _lead(
    config: CoordinatorConfig,
    leader: LeaderLease,
    on_ready: Callable[[Coordinator], None] | None,
    secrets: security.ServerSecrets,
) -> None:
    coordinator = Coordinator(config, leader)
    await coordinator.start()
    admin_auth = secrets.admin_auth()
    if admin_auth is not None:
        admin_auth.on_denied = lambda code: coordinator.metrics.observe_admin_denied(code.name)
    # AdminAuth first: it keeps WireGuard's request deserializer and checks the
    # credential before WireGuard refuses a bad request, so a caller without
    # the credential learns nothing about what the request held.
    wire_guard = WireGuard(
        on_refused=lambda: coordinator.metrics.observe_refused(
            grpc.StatusCode.INVALID_ARGUMENT.name
        )
    )
    server = grpc.aio.server(
        interceptors=[*([admin_auth] if admin_auth is not None else []), wire_guard],
        # Sessions whose rank went silent are ended; the agents' pings are
        # welcome. Messages up to the largest legitimate one (protos/limits.py).
        options=[*MESSAGE_SIZE_OPTIONS, *keepalive.server_options(config.lease_rebind_s)],
    )
    health = add_services(server, coordinator)
    try:
        bound = _bind(server, config, secrets)
    except OSError:
        await coordinator.stop()
        raise
    # Serving from the first RPC on: etcd answered in start(), and this
    # coordinator leads. From then on health follows etcd's answers.
    await set_serving(health, True)
    reachability = coordinator.etcd_reachability
    leader.refresh_listeners.append(lambda problem: reachability.report(LEADER_REFRESHES, problem))
    if leader.refresh_problem:
        reachability.report(LEADER_REFRESHES, leader.refresh_problem)
    await server.start()
    coordinator.listen_port = bound
    log.info("serving", extra=fields(listen=config.listen, port=bound))
    metrics_server: asyncio.Server | None = None
    follow = asyncio.create_task(
        _follow_etcd(health, reachability, coordinator.metrics), name="health"
    )
    try:
        if config.metrics_listen:
            try:
                metrics_server = await start_metrics_server(
                    config.metrics_listen, coordinator.render_metrics
                )
            except OSError as exc:
                raise OSError(f"cannot serve metrics on {config.metrics_listen}: {exc}") from exc
            coordinator.metrics_port = bound_port(metrics_server)
            if not is_loopback(split_host_port(config.metrics_listen)[0]):
                # Only with insecure_metrics_listen (coordinator.config), as
                # "serving without TLS" says for the gRPC port.
                log.warning(
                    "serving metrics beyond loopback without TLS or authentication",
                    extra=fields(metrics_listen=config.metrics_listen),
                )
        # Agents find the coordinator here (worker_agent.agent).
        await leader.announce(endpoint=advertised_endpoint(config, bound))
        if on_ready is not None:
            on_ready(coordinator)
        # Until cancelled (a signal) or deposed. Not server.wait_for_termination():
        # cancelling it cancels the server's own shutdown future.
        ended = {
            asyncio.create_task(coordinator.deposed.wait()),
            asyncio.create_task(leader.lost.wait()),
        }
        try:
            await asyncio.wait(ended, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in ended:
                task.cancel()
        if leader.lost.is_set():
            coordinator.step_down(f"leader lease lost: {leader.lost_reason}")
        if coordinator.deposed.is_set():
            raise Deposed(coordinator.deposed_reason)
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        # Health watchers (load balancers) hear NOT_SERVING before the server goes.
        await end_health(health)
        # Watch streams end now rather than at the server's grace deadline.
        coordinator.end_watches()
        if metrics_server is not None:
            metrics_server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(metrics_server.wait_closed(), 2.0)
        await server.stop(grace=0.5)
        await coordinator.stop()
