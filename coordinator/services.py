"""gRPC services: translate wire messages to state-machine events and back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import TYPE_CHECKING, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator import state_machine as sm
from coordinator.logs import fields
from protos.ep_recovery.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    worker_pb2,
    worker_pb2_grpc,
)
from protos.types import Placement

if TYPE_CHECKING:
    from coordinator.runtime import Coordinator

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0

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
}


def command_to_proto(coordinator: Coordinator, send: sm.Send) -> worker_pb2.CoordinatorMessage:
    cmd = worker_pb2.Command(epoch=send.epoch, op_id=send.op_id, command_id=send.command_id)
    match send.command:
        case sm.Hold(iteration):
            cmd.hold.iteration = iteration
        case sm.Abort(epoch):
            cmd.abort.epoch = epoch
        case sm.Rebuild(epoch, members, prefix):
            cmd.rebuild.groups.CopyFrom(
                worker_pb2.GroupSpec(
                    epoch=epoch,
                    store_host=coordinator.config.store_host,
                    store_port=coordinator.store_port,
                    store_prefix=prefix,
                    members=list(members),
                    timeout_ms=int(coordinator.config.group_timeout_s * 1000),
                )
            )
        case sm.Resync(plan, source, placement):
            cmd.resync.plan.CopyFrom(plan.to_proto())
            cmd.resync.metadata_source = source
            cmd.resync.placement.CopyFrom(placement.to_proto())
        case sm.Resume(iteration, members):
            cmd.resume.iteration = iteration
            cmd.resume.members.extend(members)
        case sm.Retry(reason):
            cmd.retry.reason = reason
    return worker_pb2.CoordinatorMessage(command=cmd)


def reply_from_proto(ack: worker_pb2.Ack) -> sm.Reply | None:
    match ack.WhichOneof("body"):
        case "held":
            return sm.Held(ack.held.iteration)
        case "past_target":
            return sm.PastTarget(ack.past_target.iteration)
        case "halted":
            return sm.Halted(ack.halted.last_completed)
        case "groups_ready":
            return sm.GroupsReady(ack.groups_ready.build_ms)
        case "resynced":
            r = ack.resynced
            return sm.Resynced(r.bytes_received, r.bytes_sent, r.transfer_ms)
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
                        progress_interval_ms=self.coordinator.config.progress_interval_ms,
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
                        clock = p.rank_clock_ms / 1000.0 if p.rank_clock_ms > 0 else None
                        submit(sm.ProgressReported(rank, session, p.iteration, clock))
                    case "ready":
                        submit(sm.JoinerReady(rank, session))
                    case "step_failed":
                        f = msg.step_failed
                        submit(sm.StepFailed(rank, session, f.epoch, f.last_completed, f.message))
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
            request_id=request_id, message=answer.message, replayed=answer.replayed
        )


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
            rs.lease_id = view.lease_id
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
    for ended, start, end in history.operations:
        status.operations.add(
            op_id=ended.op_id,
            kind=ended.kind,
            outcome=ended.outcome,
            epoch=ended.epoch,
            joined=list(ended.joined),
            left=list(ended.left),
            stall_ms=ended.stall_ms,
            start_unix_ms=start,
            end_unix_ms=end,
            reason=ended.reason,
            retargets=ended.retargets,
        )
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
    """Health of the whole server ("") and of each service. SERVING while this
    coordinator is the leader and has reached etcd; NOT_SERVING from shutdown on
    (for good: the servicer ignores later changes once it is shutting down)."""
    if not serving:
        await health_servicer.enter_graceful_shutdown()
        return
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
