"""The wire contract's door: requests without a rank, with a field over its
size limit, or that do not parse, are INVALID_ARGUMENT before anything is
stored, logged or echoed; the message size limit fits a large cluster's
placement; and repeated oversized calls do not grow the daemon.

The unit tests check the limits themselves (every field a client sends has
one, and docs/architecture.md lists it); the others run a real coordinator
process, real etcd and real agents (tests/agent_harness.py) and speak raw
bytes to it where a well-behaved client could not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from coordinator import wire
from coordinator.config import CoordinatorConfig
from protos.ep_recovery.v1 import admin_pb2, common_pb2, worker_pb2, worker_pb2_grpc
from protos.limits import MAX_MESSAGE_BYTES, field_limits
from tests.agent_harness import (
    HELD_PROOF,
    CoordinatorProcess,
    held_lease,
    ring_placement,
    thread_cluster,
    wait_until,
)
from worker_agent.agent import AgentConfig, WorkerAgent

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
TOKEN = "wire-test-token"
ADMIN = "/ep_recovery.v1.AdminService/"
SESSION = "/ep_recovery.v1.WorkerService/Session"
MUTATING = ("AbortOperation", "SetAutoRejoin", "Drain", "Admit")
# A marker no message of the coordinator holds: found in a reply or the log,
# it was echoed.
MARK = "Q7zv"


def bearer(token: str = TOKEN) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def cluster_state(coord: CoordinatorProcess) -> tuple[object, ...]:
    """What a call that changes nothing leaves as it was."""
    s = coord.status()
    return (
        s.epoch,
        s.phase,
        tuple(s.members),
        tuple(s.pending_members),
        s.operation.op_id,
        tuple((r.rank, r.state, r.incarnation, r.ready) for r in s.ranks),
        tuple(o.op_id for o in s.operations),
    )


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def call_raw(
    endpoint: str,
    method: str,
    payload: bytes,
    metadata: tuple[tuple[str, str], ...] = (),
    timeout: float = 20,
) -> tuple[grpc.StatusCode, str]:
    """One unary call (or the first reply of WatchEvents) with request bytes as
    given; how it ended."""
    with grpc.insecure_channel(endpoint) as channel:
        try:
            if method.endswith("/WatchEvents"):
                stream = channel.unary_stream(method, response_deserializer=None)(
                    payload, metadata=metadata, timeout=timeout
                )
                next(stream)
                stream.cancel()
            else:
                channel.unary_unary(method, response_deserializer=None)(
                    payload, metadata=metadata, timeout=timeout
                )
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


class RawSession:
    """A WorkerService session driven by hand: `send` puts bytes (or a
    message) on the stream, `next` reads the next reply or the error the
    session ended with. The stream stays open until `close` (a half-close
    right after a hello would end the session before its answer)."""

    def __init__(self, endpoint: str) -> None:
        self._channel = grpc.insecure_channel(endpoint)
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._replies = self._channel.stream_stream(
            SESSION,
            request_serializer=None,
            response_deserializer=worker_pb2.CoordinatorMessage.FromString,
        )(self._requests(), timeout=30)

    def _requests(self) -> Iterator[bytes]:
        while (item := self._queue.get()) is not None:
            yield item

    def send(self, item: bytes | Message) -> None:
        self._queue.put(item if isinstance(item, bytes) else item.SerializeToString())

    def next(self) -> worker_pb2.CoordinatorMessage | grpc.RpcError:
        try:
            return next(self._replies)  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            return exc

    def close(self) -> None:
        self._queue.put(None)
        self._replies.cancel()
        self._channel.close()


def first_reply(endpoint: str, *items: bytes | Message) -> grpc.RpcError:
    """Open a session, send `items`, and return the error it ended with."""
    session = RawSession(endpoint)
    try:
        for item in items:
            session.send(item)
        reply = session.next()
        assert isinstance(reply, grpc.RpcError), f"the session went on: {reply}"
        return reply
    finally:
        session.close()


def hello(cluster: str, rank: int, **kw: Any) -> worker_pb2.WorkerMessage:
    fields: dict[str, Any] = {
        "cluster": cluster,
        "rank": rank,
        "fingerprint": "test-engine-v1",
        "incarnation": uuid.uuid4().hex,
        "lease_id": 0x7E57,
        "placement": ring_placement(WORLD).to_proto(),
        "proof": HELD_PROOF,
    }
    fields.update(kw)
    return worker_pb2.WorkerMessage(hello=worker_pb2.Hello(**fields))


# --- the limits themselves ------------------------------------------------------------


def _limited_fields() -> list[tuple[str, FieldDescriptor]]:
    """Every string and repeated field of every message a client may send."""
    found: list[tuple[str, FieldDescriptor]] = []
    done: set[str] = set()
    todo = [t.DESCRIPTOR for t in wire.REQUEST_TYPES.values()]
    while todo:
        descriptor = todo.pop()
        if descriptor.full_name in done:
            continue
        done.add(descriptor.full_name)
        for field in descriptor.fields:
            if field.is_repeated or field.type == FieldDescriptor.TYPE_STRING:
                found.append((f"{descriptor.name}.{field.name}", field))
            if field.message_type is not None:
                todo.append(field.message_type)
    return found


def test_every_field_a_client_sends_has_a_limit_and_the_docs_list_it() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    fields = _limited_fields()
    names = {name for name, _ in fields}
    assert {"AbortOperationRequest.reason", "Hello.fingerprint", "LayerPlacement.slot_expert"} <= (
        names
    )
    for name, field in fields:
        limit = field_limits(field)
        bound = limit.max_items if field.is_repeated else limit.max_chars
        assert bound > 0, f"{name} has no limit"
        row = re.search(rf"^ *\| `{re.escape(name)}` \| ([0-9,]+) ", doc, re.MULTILINE)
        assert row is not None, f"docs/architecture.md does not list {name}'s limit"
        assert int(row.group(1).replace(",", "")) == bound, name
    # As the configuration bounds a cluster's name.
    cluster = CoordinatorConfig.model_fields["cluster"].metadata
    assert any(getattr(m, "max_length", None) == 64 for m in cluster)
    hello_cluster = worker_pb2.Hello.DESCRIPTOR.fields_by_name["cluster"]
    assert field_limits(hello_cluster).max_chars == 64


def test_a_field_without_a_limit_stops_the_coordinator_at_start() -> None:
    """A string or repeated field added to a request without a limit is a
    TypeError when the rules are built (at import), not an open door."""
    pool = descriptor_pool.DescriptorPool()
    proto = descriptor_pb2.FileDescriptorProto(name="t/unbounded.proto", package="t")
    message = proto.message_type.add(name="Unbounded")
    message.field.add(
        name="note",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    listed = proto.message_type.add(name="Listed")
    listed.field.add(
        name="ids",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
    )
    pool.Add(proto)
    with pytest.raises(TypeError, match=r"Unbounded.note is a string but has no \(max_chars\)"):
        wire._rules_of(pool.FindMessageTypeByName("t.Unbounded"), {})
    with pytest.raises(TypeError, match=r"Listed.ids is repeated but has no \(max_items\)"):
        wire._rules_of(pool.FindMessageTypeByName("t.Listed"), {})


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        (
            admin_pb2.AbortOperationRequest(request_id="r", op_id="o", reason=MARK * 200),
            "AbortOperationRequest.reason is 800 characters long; at most 512 are allowed",
        ),
        (
            admin_pb2.DrainRequest(request_id=MARK * 33, rank=1),
            "DrainRequest.request_id is 132 characters long; at most 128 are allowed",
        ),
        (
            admin_pb2.GetOperationRequest(op_id="é" * 129),
            "GetOperationRequest.op_id is 129 characters long; at most 128 are allowed",
        ),
        (
            worker_pb2.WorkerMessage(
                hello=worker_pb2.Hello(
                    placement=common_pb2.Placement(
                        layers=[
                            common_pb2.LayerPlacement(slot_expert=[1]),
                            common_pb2.LayerPlacement(slot_expert=[0] * 65537),
                        ]
                    )
                )
            ),
            "WorkerMessage.hello.placement.layers[1].slot_expert has 65537 items; "
            "at most 65536 are allowed",
        ),
        (
            worker_pb2.WorkerMessage(
                hello=worker_pb2.Hello(
                    placement=common_pb2.Placement(layers=[common_pb2.LayerPlacement()] * 1025)
                )
            ),
            "WorkerMessage.hello.placement.layers has 1025 items; at most 1024 are allowed",
        ),
        (
            worker_pb2.WorkerMessage(
                ack=worker_pb2.Ack(failed=worker_pb2.CommandFailed(message=MARK * 300))
            ),
            "WorkerMessage.ack.failed.message is 1200 characters long; at most 1024 are allowed",
        ),
    ],
    ids=["reason", "request_id", "op_id-non-ascii", "slot_expert", "layers", "ack-message"],
)
def test_a_field_over_its_limit_is_named_with_its_limit_not_its_value(
    message: Message, problem: str
) -> None:
    assert wire.find_problem(message) == problem
    rejected = wire.parse_request(type(message))(message.SerializeToString())
    assert rejected == wire.Rejected(problem)


def test_fields_at_their_limit_pass() -> None:
    at_limit = [
        admin_pb2.AbortOperationRequest(request_id="r" * 128, op_id="o" * 128, reason="é" * 512),
        worker_pb2.WorkerMessage(
            hello=worker_pb2.Hello(
                cluster="c" * 64,
                fingerprint="f" * 256,
                incarnation="i" * 128,
                placement=common_pb2.Placement(
                    layers=[common_pb2.LayerPlacement(slot_expert=[3] * 65536)] * 2
                ),
            )
        ),
        worker_pb2.WorkerMessage(step_failed=worker_pb2.StepFailed(message="m" * 1024)),
    ]
    for message in at_limit:
        parsed = wire.parse_request(type(message))(message.SerializeToString())
        assert parsed == message


def test_a_large_clusters_placement_fits_the_message_limit() -> None:
    """The size MAX_MESSAGE_BYTES is justified by (protos/limits.py): 128
    layers of 32,768 slots (4,096 ranks of 8) with 256 experts."""
    layer = [slot % 256 for slot in range(32_768)]
    message = worker_pb2.WorkerMessage(
        hello=worker_pb2.Hello(
            placement=common_pb2.Placement(
                slots_per_rank=8, layers=[common_pb2.LayerPlacement(slot_expert=layer)] * 128
            )
        )
    )
    size = message.ByteSize()
    assert 4 * 1024 * 1024 < size <= MAX_MESSAGE_BYTES // 2, size


# --- against a coordinator process ---------------------------------------------------


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, etcd: str
) -> Iterator[tuple[CoordinatorProcess, str]]:
    """One coordinator with an admin token and two agents for the tests that
    change nothing in the cluster (each checks that it did not)."""
    workdir = tmp_path_factory.mktemp("wire")
    token_file = workdir / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    cluster = f"t-wire-{uuid.uuid4().hex[:8]}"
    # Leases of 10 s, not 1: the agents are threads of this process, which
    # also builds megabyte requests, and a lease lost while they wait for the
    # GIL would change the cluster these tests check stays as it was.
    with thread_cluster(
        workdir, etcd, cluster, WORLD, "--admin-token-file", str(token_file), token=TOKEN,
        agent_options=lambda rank: {"lease_ttl_s": 10},
    ) as (coord, _ranks):  # fmt: skip
        yield coord, cluster


def test_drain_or_admit_without_a_rank_is_invalid_argument_and_changes_nothing(
    guarded: tuple[CoordinatorProcess, str],
) -> None:
    coord, _cluster = guarded
    before = cluster_state(coord)
    no_rank = admin_pb2.DrainRequest(request_id="no-rank").SerializeToString()
    # Field 2 as a string: protobuf keeps it as an unknown field, and rank
    # would read 0. (Both requests have the same fields, numbers and types.)
    wrong_type = admin_pb2.DrainRequest(request_id="wrong-type").SerializeToString() + bytes(
        [0x12, 0x01, 0x31]
    )
    for method in ("Drain", "Admit"):
        for payload in (no_rank, wrong_type):
            code, details = call_raw(coord.endpoint, ADMIN + method, payload, bearer())
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
            assert f"{method} needs a rank" in details
            # Without the credential: refused for that first, whatever it holds.
            code, _ = call_raw(coord.endpoint, ADMIN + method, payload)
            assert code == grpc.StatusCode.UNAUTHENTICATED
    assert cluster_state(coord) == before
    # An explicit rank 0 is a rank: epctl sets it, and the state machine
    # answers for rank 0 (already a member).
    admit = subprocess.run(
        [sys.executable, "-m", "epctl.cli", "admit", "0", "--endpoint", coord.endpoint],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("EPCTL_")},
            "EPCTL_TOKEN_FILE": str(coord.ready_file.parent / "admin.token"),
        },
        cwd=ROOT,
    )
    assert admit.returncode == 5, admit.stderr
    assert "rank 0" in admit.stderr and "already a member" in admit.stderr
    assert cluster_state(coord) == before


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("AbortOperation", admin_pb2.AbortOperationRequest(request_id="a", op_id=MARK * 40_000),
         "AbortOperationRequest.op_id"),
        ("AbortOperation", admin_pb2.AbortOperationRequest(
            request_id="a", op_id="x", reason=MARK * 500_000), "AbortOperationRequest.reason"),
        ("AbortOperation", admin_pb2.AbortOperationRequest(request_id=MARK * 40),
         "AbortOperationRequest.request_id"),
        ("SetAutoRejoin", admin_pb2.SetAutoRejoinRequest(request_id=MARK * 40),
         "SetAutoRejoinRequest.request_id"),
        ("Drain", admin_pb2.DrainRequest(request_id=MARK * 40, rank=1),
         "DrainRequest.request_id"),
        ("Admit", admin_pb2.AdmitRequest(request_id=MARK * 40, rank=1),
         "AdmitRequest.request_id"),
        ("GetOperation", admin_pb2.GetOperationRequest(op_id=MARK * 4096),
         "GetOperationRequest.op_id"),
    ],
    ids=["abort-op_id", "abort-reason", "abort-request_id", "auto-rejoin-request_id",
         "drain-request_id", "admit-request_id", "get-operation-op_id"],
)  # fmt: skip
def test_an_admin_field_over_its_limit_is_refused_by_name_without_its_value(
    guarded: tuple[CoordinatorProcess, str], method: str, request_: Message, field: str
) -> None:
    coord, _cluster = guarded
    before = cluster_state(coord)
    log_before = Path(coord.log.name).stat().st_size
    # GetOperation is read-only: anyone may call it, and is refused the same.
    metadata = bearer() if method in MUTATING else ()
    code, details = call_raw(coord.endpoint, ADMIN + method, request_.SerializeToString(), metadata)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert details.startswith(f"{field} is ") and "at most" in details, details
    assert MARK not in details and len(details) < 200
    if method in MUTATING:
        code, details = call_raw(coord.endpoint, ADMIN + method, request_.SerializeToString())
        assert code == grpc.StatusCode.UNAUTHENTICATED and MARK not in details
    assert cluster_state(coord) == before
    log = coord.log_tail()
    assert "request refused" in log and MARK not in log
    assert Path(coord.log.name).stat().st_size - log_before < 4096


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (lambda c: hello(c, 1, fingerprint=MARK * 100), "WorkerMessage.hello.fingerprint"),
        (lambda c: hello(c, 1, incarnation=MARK * 40), "WorkerMessage.hello.incarnation"),
        (lambda c: hello(MARK * 20, 1), "WorkerMessage.hello.cluster"),
        (
            lambda c: hello(
                c, 1, placement=common_pb2.Placement(layers=[common_pb2.LayerPlacement()] * 1025)
            ),
            "WorkerMessage.hello.placement.layers",
        ),
        (
            lambda c: worker_pb2.WorkerMessage(
                step_failed=worker_pb2.StepFailed(message=MARK * 1000)
            ),
            "WorkerMessage.step_failed.message",
        ),
        (
            lambda c: worker_pb2.WorkerMessage(ready=worker_pb2.JoinerReady(op_id=MARK * 40)),
            "WorkerMessage.ready.op_id",
        ),
        (
            lambda c: worker_pb2.WorkerMessage(ack=worker_pb2.Ack(op_id=MARK * 40)),
            "WorkerMessage.ack.op_id",
        ),
    ],
    ids=["fingerprint", "incarnation", "cluster", "layers", "step-failed", "ready", "ack"],
)
def test_a_session_message_over_its_limit_ends_the_session_by_name(
    guarded: tuple[CoordinatorProcess, str], message: Any, field: str
) -> None:
    coord, cluster = guarded
    before = cluster_state(coord)
    ended = first_reply(coord.endpoint, message(cluster))
    assert ended.code() == grpc.StatusCode.INVALID_ARGUMENT, ended.details()
    details = ended.details() or ""
    assert details.startswith(f"{field} ") and "at most" in details, details
    assert MARK not in details
    assert cluster_state(coord) == before
    assert MARK not in coord.log_tail()


# Bytes that are no message: field 1 with wire type 7 (there is none); a
# length-delimited field 1 that runs past the end; field 1 of a string-only
# message holding invalid UTF-8.
MALFORMED = {"bad-wire-type": b"\x0f", "truncated": b"\x0a\x05ab", "bad-utf8": b"\x0a\x02\xff\xfe"}


@pytest.mark.parametrize("damage", sorted(MALFORMED))
def test_malformed_bytes_are_invalid_argument_for_every_method(
    guarded: tuple[CoordinatorProcess, str], damage: str
) -> None:
    coord, _cluster = guarded
    before = cluster_state(coord)
    payload = MALFORMED[damage]
    methods = [m for m in wire.REQUEST_TYPES if m.startswith(ADMIN)]
    assert len(methods) == 8
    for method in methods:
        # bad-utf8 is a valid message of some types (field 1 is not a string
        # everywhere, or the type has no field 1: an unknown field).
        message_type = wire.REQUEST_TYPES[method]
        with contextlib.suppress(Exception):
            message_type.FromString(payload)
            continue
        code, details = call_raw(coord.endpoint, method, payload, bearer())
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
        assert details.startswith("malformed request: not a valid "), details
    ended = first_reply(coord.endpoint, payload)
    assert ended.code() == grpc.StatusCode.INVALID_ARGUMENT, ended.details()
    assert (ended.details() or "").startswith("malformed request: not a valid WorkerMessage")
    assert cluster_state(coord) == before


def test_the_message_limit_takes_a_large_clusters_hello_and_refuses_a_bigger_one(
    guarded: tuple[CoordinatorProcess, str],
) -> None:
    coord, cluster = guarded
    # 40 layers of 65,536 slots of up to 16,383 experts: 5 MiB, over gRPC's
    # default 4 MiB. It reaches the state machine, which refuses it because
    # rank 1 is live, not for its size.
    layer = common_pb2.LayerPlacement(slot_expert=[slot % 16_383 for slot in range(65_536)])
    large = hello(cluster, 1, placement=common_pb2.Placement(slots_per_rank=8, layers=[layer] * 40))
    assert large.ByteSize() > 4 * 1024 * 1024
    ended = first_reply(coord.endpoint, large)
    assert ended.code() == grpc.StatusCode.ALREADY_EXISTS, ended.details()
    assert "rank 1 is already registered" in (ended.details() or "")
    # Past MAX_MESSAGE_BYTES: gRPC refuses it before it is parsed.
    huge = hello(cluster, 1, placement=common_pb2.Placement(slots_per_rank=8, layers=[layer] * 200))
    assert huge.ByteSize() > MAX_MESSAGE_BYTES
    ended = first_reply(coord.endpoint, huge)
    assert ended.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ended.details()


def test_repeated_oversized_admin_calls_do_not_grow_the_coordinator(
    guarded: tuple[CoordinatorProcess, str],
) -> None:
    """The finding: 41 authenticated AbortOperation calls with a 1.9 MB op_id
    and reason grew the daemon from 320 to 679 MB (each was kept: in the
    answers replayed by request id, the operation history, the log) and its
    log by 233 MB, and the first one cut `epctl watch` off."""
    coord, _cluster = guarded
    pid = coord.proc.pid
    big = MARK * 475_000  # 1.9 MB
    warm_up, measured = 30, 41
    calls = [
        admin_pb2.AbortOperationRequest(request_id=f"big-{i}", op_id=big, reason=big)
        for i in range(warm_up + measured)
    ]
    watch = coord.admin.WatchEvents(admin_pb2.WatchEventsRequest(), timeout=120)
    try:
        assert next(watch).HasField("snapshot")

        def send(request: admin_pb2.AbortOperationRequest) -> int:
            """The daemon's RSS (KiB) once the call was refused."""
            with pytest.raises(grpc.RpcError) as refused:
                coord.admin.AbortOperation(request, timeout=20)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            return vm_rss_kib(pid)

        # The RSS of a process that handles 3.8 MB requests swings between
        # calls (the request exists several times over while one is handled:
        # gRPC's receive buffer, the bytes, protobuf's parsed copy, the strings
        # the check reads; how much of it the allocator keeps varies): by up
        # to about 20 MB here, 500 calls level at that. So the baseline is the
        # peak over a warm-up, and the bound is on the peak after it.
        baseline = max(send(request) for request in calls[:warm_up])
        log_before = Path(coord.log.name).stat().st_size
        peak = max(send(request) for request in calls[warm_up:])
        grown_kib = peak - baseline
        # Before the fix each call kept at least its 3.8 MB (41 calls: 155 MB
        # or more; the finding saw 359 MB). 32 MiB is above the swing and far
        # below that.
        assert grown_kib < 32 * 1024, f"the coordinator grew by {grown_kib} KiB in 41 calls"
        grown_log = Path(coord.log.name).stat().st_size - log_before
        assert grown_log < measured * 512, f"the log grew by {grown_log} bytes"
        # The watch stream lived through it and still carries admin calls.
        reply = coord.admin.SetAutoRejoin(
            admin_pb2.SetAutoRejoinRequest(request_id="after-the-flood", enabled=True), timeout=20
        )
        assert reply.message == "automatic rejoin is on"
        for event in watch:
            if event.HasField("admin_call"):
                assert event.admin_call.request_id == "after-the-flood"
                break
    finally:
        watch.cancel()


# --- in a session the coordinator accepted -------------------------------------------


def test_a_bad_message_in_an_accepted_session_ends_it_and_the_joiner_is_dropped(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    """The session's later messages are read by another task than its hello:
    a message refused there ends the session as well."""
    with thread_cluster(tmp_path, etcd, cluster_name, WORLD, "--no-auto-rejoin") as (
        coord,
        ranks,
    ):
        ranks.pop(1).stop()
        wait_until(lambda: coord.phase() == "degraded", 30, "the cluster to shrink without 1")

        def joining() -> bool:
            return coord.status().ranks[1].state == admin_pb2.RANK_STATE_JOINING

        with held_lease(etcd, cluster_name, 1) as lease:
            for bad, needle in (
                (
                    worker_pb2.WorkerMessage(
                        step_failed=worker_pb2.StepFailed(message=MARK * 1000)
                    ).SerializeToString(),
                    "WorkerMessage.step_failed.message is 4000 characters long",
                ),
                (MALFORMED["truncated"], "malformed request: not a valid WorkerMessage"),
            ):
                session = RawSession(coord.endpoint)
                try:
                    session.send(hello(cluster_name, 1, rejoin=True, lease_id=lease))
                    welcome = session.next()
                    assert isinstance(welcome, worker_pb2.CoordinatorMessage), welcome
                    assert welcome.welcome.role == worker_pb2.ROLE_JOINER
                    wait_until(joining, 10, "rank 1 to be a joiner")
                    before = cluster_state(coord)
                    session.send(bad)
                    ended = session.next()
                    assert isinstance(ended, grpc.RpcError), ended
                    assert ended.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert (ended.details() or "").startswith(needle), ended.details()
                finally:
                    session.close()
                # The session is gone, so the joiner is too; the members never moved.
                wait_until(lambda: not joining(), 10, "the joiner to be dropped")
                after = coord.status()
                assert (after.epoch, list(after.members)) == (before[0], list(before[2]))
                assert coord.phase() == "degraded"
        log = coord.log_tail()
        assert MARK not in log and "Abort error unexpectedly suppressed" not in log


# --- the agent takes what the coordinator may send -----------------------------------


def test_an_agent_receives_a_resync_larger_than_grpcs_default(tmp_path: Path) -> None:
    """A Resync carries the whole placement: a large cluster's is over gRPC's
    default 4 MiB receive limit, which the agent's channel lifts to
    MAX_MESSAGE_BYTES."""
    layer = common_pb2.LayerPlacement(slot_expert=[slot % 16_383 for slot in range(65_536)])
    resync = worker_pb2.CoordinatorMessage(
        command=worker_pb2.Command(
            resync=worker_pb2.Resync(placement=common_pb2.Placement(layers=[layer] * 40))
        )
    )
    assert resync.ByteSize() > 4 * 1024 * 1024

    class Servicer(worker_pb2_grpc.WorkerServiceServicer):
        async def Session(self, request_iterator: Any, context: Any) -> None:
            await context.read()
            await context.write(resync)

    async def exchange() -> worker_pb2.CoordinatorMessage:
        server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            agent = WorkerAgent(
                AgentConfig(cluster="c", rank=0, coordinator="", etcd="127.0.0.1:1"),
                adapter=None,  # type: ignore[arg-type]  # only its channel is used
            )
            async with agent._channel(f"127.0.0.1:{port}") as channel:
                call = worker_pb2_grpc.WorkerServiceStub(channel).Session()
                await call.write(hello("c", 0))
                reply = await asyncio.wait_for(call.read(), 30)
                call.cancel()
                return reply  # type: ignore[no-any-return]
        finally:
            await server.stop(None)

    assert asyncio.run(exchange()) == resync
