"""gRPC services: translate wire messages to state-machine events and back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import TYPE_CHECKING, cast

import aetcd
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator import etcd_keys
from coordinator import state_machine as sm
from coordinator.history import OperationRecord
from coordinator.logs import fields
from protos.ep_recovery.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    worker_pb2,
    worker_pb2_grpc,
)
from protos.types import Placement, loads_to_proto

if TYPE_CHECKING:
    from coordinator.runtime import Coordinator

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
# How long a hello waits for etcd to say which lease holds its rank's key.
LEASE_READ_TIMEOUT_S = 5.0
# Events a WatchEvents stream may fall behind by before it is cut off.
WATCH_BACKLOG = 1024
# Why a stream ends, or a watch is refused, while the event numbers given out
# run past the ceiling reserved in etcd (coordinator.history_store.EventSeq).
NUMBERING_UNAVAILABLE = (
    "the event stream's numbering waits for etcd (no history write got through); watch again"
)

PHASE_TO_PROTO: dict[sm.Phase, common_pb2.Phase] = {
    phase: cast(common_pb2.Phase, common_pb2.Phase.Value(f"PHASE_{phase.name}"))
    for phase in sm.Phase
}
RANK_STATE_TO_PROTO = {
    "absent": admin_pb2.RANK_STATE_ABSENT,
    "registered": admin_pb2.RANK_STATE_ABSENT,
    "serving": admin_pb2.RANK_STATE_SERVING,
    "suspect": admin_pb2.RANK_STATE_SUSPECT,
    "failed": admin_pb2.RANK_STATE_FAILED,
    "joining": admin_pb2.RANK_STATE_JOINING,
    "drained": admin_pb2.RANK_STATE_DRAINED,
}


def _group_spec(
    coordinator: Coordinator, epoch: int, members: tuple[int, ...], prefix: str
) -> worker_pb2.GroupSpec:
    """Where and how ranks build a group: on this coordinator's store."""
    return worker_pb2.GroupSpec(
        epoch=epoch,
        store_host=coordinator.config.store_host,
        store_port=coordinator.store_port,
        store_prefix=prefix,
        members=list(members),
        timeout_ms=int(coordinator.config.group_timeout_s * 1000),
    )


def command_to_proto(coordinator: Coordinator, send: sm.Send) -> worker_pb2.CoordinatorMessage:
    cmd = worker_pb2.Command(epoch=send.epoch, op_id=send.op_id, command_id=send.command_id)
    match send.command:
        case sm.Hold(iteration):
            cmd.hold.iteration = iteration
        case sm.Abort(epoch):
            cmd.abort.epoch = epoch
        case sm.Rebuild(epoch, members, prefix):
            cmd.rebuild.groups.CopyFrom(_group_spec(coordinator, epoch, members, prefix))
        case sm.Prefetch(plan, epoch, members, prefix):
            cmd.prefetch.plan.CopyFrom(plan.to_proto())
            cmd.prefetch.groups.CopyFrom(_group_spec(coordinator, epoch, members, prefix))
        case sm.Resync(plan, source, placement):
            cmd.resync.plan.CopyFrom(plan.to_proto())
            cmd.resync.metadata_source = source
            cmd.resync.placement.CopyFrom(placement.to_proto())
        case sm.Reload(placement, loads):
            cmd.reload.placement.CopyFrom(placement.to_proto())
            cmd.reload.loads.extend(loads_to_proto(loads))
        case sm.Resume(iteration, members):
            cmd.resume.iteration = iteration
            cmd.resume.members.extend(members)
        case sm.Retry(reason):
            cmd.retry.reason = reason
        case sm.Leave(reason):
            cmd.leave.reason = reason
    return worker_pb2.CoordinatorMessage(command=cmd)


def rank_clock_s(progress: worker_pb2.Progress) -> float | None:
    """The rank's clock in a progress report, in s (None: not sent)."""
    return progress.rank_clock_ms / 1000.0 if progress.rank_clock_ms > 0 else None


def reply_from_proto(ack: worker_pb2.Ack) -> sm.Reply | None:
    match ack.WhichOneof("body"):
        case "held":
            return sm.Held(ack.held.iteration)
        case "past_target":
            return sm.PastTarget(ack.past_target.iteration)
        case "halted":
            return sm.Halted(ack.halted.last_completed)
        case "groups_ready":
            ready = ack.groups_ready
            if not ready.HasField("progress"):
                return sm.GroupsReady(ready.build_ms)
            return sm.GroupsReady(
                ready.build_ms, ready.progress.iteration, rank_clock_s(ready.progress)
            )
        case "resynced":
            r = ack.resynced
            return sm.Resynced(r.bytes_received, r.bytes_sent, r.transfer_ms)
        case "reloaded":
            return sm.Reloaded(ack.reloaded.slots_loaded, ack.reloaded.load_ms)
        case "resumed":
            return sm.Resumed(ack.resumed.stall_ms)
        case "failed":
            return sm.CommandFailed(ack.failed.message)
    return None


class SessionChannel:
    """The outgoing side of one worker session; the dispatcher puts, the RPC writes."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.outbox: asyncio.Queue[sm.Action | None] = asyncio.Queue()


class WorkerService(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self._renewals: set[asyncio.Task[None]] = set()

    async def Session(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        try:
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT_S)
        except TimeoutError:
            self.coordinator.metrics.observe_refused(grpc.StatusCode.DEADLINE_EXCEEDED.name)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello within 10 s")
            return
        if first is grpc.aio.EOF or not first.HasField("hello"):
            self.coordinator.metrics.observe_refused(grpc.StatusCode.INVALID_ARGUMENT.name)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message of a session must be a hello"
            )
            return
        hello = first.hello
        try:
            key_lease, key_proof = await self._rank_key(hello)
        except (TimeoutError, aetcd.ClientError) as exc:
            # Retried by the agent (UNAVAILABLE is not a refusal).
            self.coordinator.metrics.observe_refused(grpc.StatusCode.UNAVAILABLE.name)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot check rank {hello.rank}'s lease in etcd now: {exc!r}",
            )
            return
        session = uuid.uuid4().hex
        channel_rank = hello.rank
        channel = SessionChannel(channel_rank)
        self.coordinator.sessions[session] = channel
        placement = Placement.from_proto(hello.placement) if hello.HasField("placement") else None
        self.coordinator.submit(
            sm.RankRegistered(
                rank=hello.rank,
                session=session,
                cluster=hello.cluster,
                incarnation=hello.incarnation,
                lease_id=hello.lease_id,
                fingerprint=hello.fingerprint,
                rejoin=hello.rejoin,
                placement=placement,
                key_lease=key_lease,
                proven=etcd_keys.proof_matches(hello.proof, key_proof),
            )
        )
        reader = asyncio.create_task(self._read(context, hello.rank, session, channel))
        accepted = False
        try:
            while True:
                action = await channel.outbox.get()
                if action is None:
                    break
                if isinstance(action, sm.Refuse) and action.end_session:
                    await context.abort(getattr(grpc.StatusCode, action.code), action.message)
                    return
                message = self._to_proto(action, session)
                if isinstance(action, sm.Accept):
                    accepted = True
                await context.write(message)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.coordinator.sessions.pop(session, None)
            if accepted:
                self.coordinator.submit(sm.SessionClosed(hello.rank, session))
                log.info("session closed", extra=fields(rank=hello.rank, session=session[:8]))

    async def _lease_renewed(self, rank: int, session: str, lease_id: int) -> None:
        try:
            key_lease, _ = await asyncio.wait_for(
                self.coordinator.rank_key(rank), LEASE_READ_TIMEOUT_S
            )
        except (TimeoutError, aetcd.ClientError) as exc:
            # The rank's lease-lost window runs on; it may say so again.
            log.warning("cannot check a renewed lease", extra=fields(rank=rank, error=repr(exc)))
            return
        self.coordinator.submit(sm.LeaseRenewed(rank, session, lease_id, key_lease))

    async def _rank_key(self, hello: worker_pb2.Hello) -> tuple[int, str]:
        """The lease that holds the hello's rank key in etcd now (0: no key)
        and the digest of the proof its process drew: the state machine accepts
        the hello only when the lease is the hello's own and its proof matches.
        A hello the machine refuses for its cluster or rank is not looked up."""
        config = self.coordinator.config
        if hello.cluster != config.cluster or not 0 <= hello.rank < config.world_size:
            return 0, ""
        return await asyncio.wait_for(self.coordinator.rank_key(hello.rank), LEASE_READ_TIMEOUT_S)

    def _to_proto(self, action: sm.Action, session: str) -> worker_pb2.CoordinatorMessage:
        match action:
            case sm.Accept(role=role, epoch=epoch):
                return worker_pb2.CoordinatorMessage(
                    welcome=worker_pb2.Welcome(
                        role=worker_pb2.ROLE_JOINER
                        if role == sm.Role.JOINER
                        else worker_pb2.ROLE_MEMBER,
                        epoch=epoch,
                        session_id=session,
                        progress_interval_ms=self.coordinator.config.rank_progress_interval_ms,
                    )
                )
            case sm.Send():
                return command_to_proto(self.coordinator, action)
            case sm.Refuse():
                return worker_pb2.CoordinatorMessage(
                    refusal=worker_pb2.Refusal(
                        code=getattr(grpc.StatusCode, action.code).value[0],
                        message=action.message,
                        op_id=action.op_id,
                        command_id=action.command_id,
                    )
                )
        raise TypeError(f"not a session message: {action!r}")

    async def _read(
        self,
        context: grpc.aio.ServicerContext,
        rank: int,
        session: str,
        channel: SessionChannel,
    ) -> None:
        submit = self.coordinator.submit
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    break
                match msg.WhichOneof("body"):
                    case "progress":
                        p = msg.progress
                        submit(sm.ProgressReported(rank, session, p.iteration, rank_clock_s(p)))
                    case "ready":
                        submit(sm.JoinerReady(rank, session))
                    case "step_failed":
                        f = msg.step_failed
                        submit(sm.StepFailed(rank, session, f.epoch, f.last_completed, f.message))
                    case "lease_renewed":
                        # Read off the reading loop: etcd may be slow right
                        # after the outage that took the old lease.
                        renewal = asyncio.create_task(
                            self._lease_renewed(rank, session, msg.lease_renewed.lease_id)
                        )
                        self._renewals.add(renewal)
                        renewal.add_done_callback(self._renewals.discard)
                    case "ack":
                        reply = reply_from_proto(msg.ack)
                        if reply is None:
                            self.coordinator.deliver(
                                sm.Refuse(
                                    rank,
                                    session,
                                    sm.Code.INVALID_ARGUMENT,
                                    "ack without a body",
                                    op_id=msg.ack.op_id,
                                    command_id=msg.ack.command_id,
                                )
                            )
                            continue
                        a = msg.ack
                        submit(sm.Acked(rank, session, a.epoch, a.op_id, a.command_id, reply))
                    case "hello":
                        self.coordinator.deliver(
                            sm.Refuse(
                                rank,
                                session,
                                sm.Code.INVALID_ARGUMENT,
                                "a session sends exactly one hello",
                            )
                        )
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            channel.outbox.put_nowait(None)


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    async def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ClusterStatus:
        async with self.coordinator.dispatch_lock:
            return status_to_proto(self.coordinator)

    async def AbortOperation(
        self, request: admin_pb2.AbortOperationRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AdminReply:
        command = sm.AbortOperation(request.op_id, request.reason)
        return await self._mutate(request.request_id, command, context)

    async def SetAutoRejoin(
        self, request: admin_pb2.SetAutoRejoinRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AdminReply:
        command = sm.SetAutoRejoin(request.enabled)
        return await self._mutate(request.request_id, command, context)

    async def Drain(
        self, request: admin_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AdminReply:
        rank = await self._present_rank(request, "Drain", context)
        return await self._mutate(request.request_id, sm.Drain(rank), context)

    async def Admit(
        self, request: admin_pb2.AdmitRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AdminReply:
        rank = await self._present_rank(request, "Admit", context)
        return await self._mutate(request.request_id, sm.Admit(rank), context)

    @staticmethod
    async def _present_rank(
        request: admin_pb2.DrainRequest | admin_pb2.AdmitRequest,
        method: str,
        context: grpc.aio.ServicerContext,
    ) -> int:
        """The request's rank. A request without one (or with one of the wrong
        wire type, which protobuf keeps as an unknown field) would read as rank
        0 and act on it: INVALID_ARGUMENT instead."""
        if not request.HasField("rank"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{method} needs a rank: the request has no rank field (an int64, field 2)",
            )
        return request.rank

    async def ListOperations(
        self, request: admin_pb2.ListOperationsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListOperationsReply:
        if request.limit < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"limit must be 0 (all kept) or positive, got {request.limit}",
            )
        async with self.coordinator.dispatch_lock:
            records = self.coordinator.history.newest_first(request.limit)
            phase = self.coordinator.machine.phase
            return admin_pb2.ListOperationsReply(
                operations=[operation_summary(r, phase) for r in records]
            )

    async def GetOperation(
        self, request: admin_pb2.GetOperationRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.OperationDetail:
        if not request.op_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "op_id is empty")
        coordinator = self.coordinator
        async with coordinator.dispatch_lock:
            history = coordinator.history
            record = history.operations.get(request.op_id)
            if record is not None and record.detail_loaded:
                return operation_detail(record, coordinator.machine.phase)
            kept = len(history.operations)
        if record is not None:
            # A predecessor's operation: its spans are read from etcd when
            # first asked for (history_store), not at the take-over.
            try:
                await coordinator.operation_detail(record)
            except (TimeoutError, aetcd.ClientError) as exc:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the spans of {request.op_id!r} could not be read from etcd ({exc!r}); retry",
                )
            async with coordinator.dispatch_lock:
                return operation_detail(record, coordinator.machine.phase)
        await context.abort(
            grpc.StatusCode.NOT_FOUND,
            f"no operation {request.op_id!r} in the cluster's history "
            f"({kept} kept; see ListOperations)",
        )
        raise AssertionError("unreachable")  # context.abort raises

    async def WatchEvents(
        self, request: admin_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> None:
        coordinator = self.coordinator
        # The snapshot and the subscription under one hold of the dispatch
        # lock: every event after the snapshot reaches the watcher, none twice.
        async with coordinator.dispatch_lock:
            if not coordinator.seq.sendable:
                await context.abort(grpc.StatusCode.UNAVAILABLE, NUMBERING_UNAVAILABLE)
            first = admin_pb2.ClusterEvent(
                seq=coordinator.event_seq,
                unix_ms=time.time() * 1000.0,
                snapshot=status_to_proto(coordinator),
            )
            watcher = coordinator.watch()
        log.info("event watch started", extra=fields(peer=context.peer()))
        try:
            await context.write(first)
            while (event := await watcher.next()) is not None:
                await context.write(event)
            if watcher.overflowed:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the watcher fell more than {WATCH_BACKLOG} events behind; watch again",
                )
            if watcher.unavailable:
                await context.abort(grpc.StatusCode.UNAVAILABLE, watcher.unavailable)
        finally:
            coordinator.unwatch(watcher)
            log.info("event watch ended", extra=fields(peer=context.peer()))

    async def _mutate(
        self, request_id: str, command: sm.AdminCommand, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AdminReply:
        try:
            answer = await self.coordinator.admin(request_id, command)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the coordinator did not answer in time (is etcd reachable?); "
                "retry with the same request_id",
            )
            raise  # context.abort raises; this keeps the type checker informed
        if answer.code is not None:
            await context.abort(getattr(grpc.StatusCode, answer.code.value), answer.message)
        return admin_pb2.AdminReply(
            request_id=request_id,
            message=answer.message,
            replayed=answer.replayed,
            op_id=answer.op_id,
        )


class Watcher:
    """One WatchEvents stream's queue. The dispatcher offers events without
    ever waiting; a stream that falls WATCH_BACKLOG events behind is ended
    (`overflowed`) rather than buffered without bound."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[admin_pb2.ClusterEvent | None] = asyncio.Queue()
        self.overflowed = False
        # Set (the reason) when the stream is ended for UNAVAILABLE.
        self.unavailable = ""
        self._closed = False

    def offer(self, event: admin_pb2.ClusterEvent) -> bool:
        """Queue `event`; False (and the stream ends) when it is too far behind."""
        if self._closed:
            return False
        if self._queue.qsize() >= WATCH_BACKLOG:
            self.overflowed = True
            self.close()
            return False
        self._queue.put_nowait(event)
        return True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)

    def fail(self, reason: str) -> None:
        """End the stream with UNAVAILABLE and `reason`."""
        self.unavailable = reason
        self.close()

    async def next(self) -> admin_pb2.ClusterEvent | None:
        """The next event; None once the stream is to end."""
        return await self._queue.get()


def operation_summary(record: OperationRecord, phase: sm.Phase) -> admin_pb2.OperationSummary:
    """`phase`: the machine's phase now, shown for the operation in flight."""
    summary = admin_pb2.OperationSummary(
        op_id=record.op_id,
        kind=record.kind,
        outcome=record.outcome,
        start_unix_ms=record.start_unix_ms,
        end_unix_ms=record.end_unix_ms,
        target_epoch=record.target_epoch,
        survivors=list(record.survivors),
        joining=list(record.joining),
        leaving=list(record.leaving),
    )
    ended = record.ended
    if ended is None:
        summary.epoch = record.epoch
        summary.phase = PHASE_TO_PROTO[phase]
    else:
        summary.epoch = ended.epoch
        summary.joined.extend(ended.joined)
        summary.left.extend(ended.left)
        summary.stall_ms = ended.stall_ms
        summary.reason = ended.reason
        summary.retargets = ended.retargets
    return summary


def operation_detail(record: OperationRecord, phase: sm.Phase) -> admin_pb2.OperationDetail:
    detail = admin_pb2.OperationDetail(summary=operation_summary(record, phase))
    for span in record.phases:
        detail.phases.add(
            phase=PHASE_TO_PROTO[span.phase],
            op_id=span.op_id,
            epoch=span.epoch,
            start_unix_ms=span.start_unix_ms,
            end_unix_ms=span.end_unix_ms,
        )
    for r in record.ranks:
        detail.ranks.add(
            rank=r.rank,
            step=r.step,
            start_unix_ms=r.start_unix_ms,
            end_unix_ms=r.end_unix_ms,
            outcome=r.outcome,
        )
    return detail


def event_to_proto(
    coordinator: Coordinator, action: sm.Action, unix_ms: float, seq: int
) -> admin_pb2.ClusterEvent | None:
    """The WatchEvents form of an action the runtime carried out (None for
    actions that are not events: commands, persists, per-rank steps)."""
    event = admin_pb2.ClusterEvent(seq=seq, unix_ms=unix_ms)
    history = coordinator.history
    match action:
        case sm.PhaseEntered():
            event.phase.CopyFrom(
                admin_pb2.PhaseSpan(
                    phase=PHASE_TO_PROTO[action.phase],
                    op_id=action.op_id,
                    epoch=action.epoch,
                    start_unix_ms=unix_ms,
                )
            )
        case sm.OperationStarted() | sm.OperationEnded():
            record = history.operations.get(action.op_id)
            if record is None:
                return None
            summary = operation_summary(record, coordinator.machine.phase)
            if isinstance(action, sm.OperationStarted):
                event.operation_started.CopyFrom(summary)
            else:
                event.operation_ended.CopyFrom(summary)
        case sm.RankFailed():
            suspected = (
                coordinator.unix_ms(action.suspected_at) if action.suspected_at is not None else 0.0
            )
            event.rank_failed.CopyFrom(
                admin_pb2.FailureRecord(
                    rank=action.rank,
                    reason=action.reason,
                    suspected_unix_ms=suspected,
                    confirmed_unix_ms=unix_ms,
                )
            )
        case sm.AdminAnswered():
            method, arguments = sm.describe_admin(action.command) if action.command else ("", "")
            event.admin_call.CopyFrom(
                admin_pb2.AdminCall(
                    request_id=action.request_id,
                    method=method,
                    arguments=arguments,
                    code=action.code.value if action.code is not None else "OK",
                    message=action.message,
                    replayed=action.replayed,
                    op_id=action.op_id,
                )
            )
        case _:
            return None
    return event


def status_to_proto(coordinator: Coordinator) -> admin_pb2.ClusterStatus:
    machine = coordinator.machine
    history = coordinator.history
    now = time.monotonic()
    status = admin_pb2.ClusterStatus(
        cluster=machine.cluster,
        epoch=machine.epoch,
        phase=PHASE_TO_PROTO[machine.phase],
        members=list(machine.members),
        pending_members=list(machine.pending_members()),
        world_size=machine.world_size,
        placement_version=machine.placement.version if machine.placement else 0,
        fingerprint=machine.fingerprint,
        leader=True,
    )
    for rank in range(machine.world_size):
        view = machine.ranks.get(rank)
        rs = status.ranks.add(rank=rank, state=RANK_STATE_TO_PROTO[machine.rank_state(rank)])
        if view is not None:
            rs.iteration = view.progress.iteration if view.progress else 0
            rs.last_heartbeat_ms_ago = (
                int((now - view.last_seen) * 1000) if view.session is not None else -1
            )
            rs.incarnation = view.incarnation
            rs.ready = view.ready and rank in machine.joiners
        else:
            rs.last_heartbeat_ms_ago = -1
    op = machine.op
    if op is not None:
        status.operation.CopyFrom(
            admin_pb2.Operation(
                op_id=op.op_id,
                kind=op.kind,
                phase=PHASE_TO_PROTO[machine.phase],
                target_epoch=op.target_epoch,
                joining=list(op.joining),
                leaving=list(op.leaving),
                hold_iteration=op.hold_iteration or 0,
            )
        )
    for span in history.timeline:
        status.timeline.add(
            phase=PHASE_TO_PROTO[span.phase],
            op_id=span.op_id,
            epoch=span.epoch,
            start_unix_ms=span.start_unix_ms,
            end_unix_ms=span.end_unix_ms,
        )
    for failed, suspected, confirmed in history.failures:
        status.failures.add(
            rank=failed.rank,
            reason=failed.reason,
            suspected_unix_ms=suspected,
            confirmed_unix_ms=confirmed,
        )
    for record in history.ended_operations():
        status.operations.append(operation_summary(record, machine.phase))
    return status


SERVICE_NAMES = (
    worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


def add_services(server: grpc.aio.Server, coordinator: Coordinator) -> health.aio.HealthServicer:
    """WorkerService and AdminService, with the standard grpc.health.v1 Health
    service (returned: call `set_serving` before the server starts) and server
    reflection (so `grpcurl -plaintext HOST:PORT list` works)."""
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerService(coordinator), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminService(coordinator), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    """Health of the whole server ("") and of each service: SERVING while this
    coordinator leads and etcd answers it, NOT_SERVING while etcd does not
    (the runtime calls this on each change)."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, status)


async def end_health(health_servicer: health.aio.HealthServicer) -> None:
    """NOT_SERVING from shutdown on, for good: the servicer ignores later changes."""
    await health_servicer.enter_graceful_shutdown()
