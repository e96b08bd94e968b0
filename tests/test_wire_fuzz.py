"""Fuzzing the coordinator's gRPC surface: every AdminService and
WorkerService method, driven with generated messages and damaged bytes,
against a real coordinator process, real etcd and real agents.

After each call: the status code is one the method may answer (never UNKNOWN
or INTERNAL), its details are short; the cluster is as it was unless the call
was a mutating one with the admin credential that the coordinator answered
OK; and the daemon's RSS stays within a bound of where it started.

The generator reads the message descriptors (`messages`): every field of
every request type, strings around and far past their limits, repeated fields
one past theirs, unknown enum values, oneofs; and some payloads are damaged
serializations or random bytes. Hello fields are biased towards the real
cluster, fingerprint and ranks, so that hellos get past the cheap checks.

CI runs the same 200 examples each time (under 10 s here);
`EP_WIRE_FUZZ_EXAMPLES=5000` runs that many random ones (about a minute).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator import wire
from protos.ep_recovery.v1 import admin_pb2, common_pb2, worker_pb2
from protos.limits import field_limits
from tests.agent_harness import (
    CoordinatorProcess,
    ThreadRank,
    ring_placement,
    thread_cluster,
    wait_until,
)
from tests.test_wire import (
    ADMIN,
    MUTATING,
    SESSION,
    RawSession,
    bearer,
    call_raw,
    cluster_state,
    vm_rss_kib,
)

EXAMPLES = int(os.environ.get("EP_WIRE_FUZZ_EXAMPLES", "200"))
WORLD = 3
TOKEN = "fuzz-token"
FINGERPRINT = "test-engine-v1"  # tests.agent_harness.RecordingAdapter's
# The bound on the daemon's growth over the whole run. The largest request
# generated is about 2.4 MB (a few fields of up to 600,000 characters), and a
# process handling such requests swings by some tens of MB while the allocator
# keeps freed blocks (tests/test_wire.py measures about 20 MB for 3.8 MB
# requests). Kept requests would exceed this within a few dozen examples.
RSS_BOUND_KIB = 64 * 1024

# The ranks are threads of this process, which also builds and parses
# megabyte requests: a 1 s lease (the default) can expire while they wait for
# the GIL, and the cluster would change under the fuzz for that reason.
AGENT_OPTIONS = {"lease_ttl_s": 10}

ADMIN_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
}
# A session is never accepted here (no generated hello holds its rank's lease).
SESSION_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def weighted(*choices: tuple[int, st.SearchStrategy[object]]) -> st.SearchStrategy[object]:
    """One of the strategies, each drawn about `weight` times in the sum."""
    picks = [i for i, (weight, _) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(picks).flatmap(lambda i: choices[i][1])


def strings(limit: int) -> st.SearchStrategy[object]:
    """Short text, mostly; at the limit, give or take one (2-byte characters,
    so a limit counted in bytes would show); and far past it."""
    return weighted(
        (4, st.text(min_size=1, max_size=12)),
        (1, st.just("")),
        (1, st.integers(limit - 1, limit + 1).map(lambda n: "é" * n)),
        (1, st.integers(limit + 1, 600_000).map(lambda n: "Z" * n)),
    )


def scalars(field: FieldDescriptor) -> st.SearchStrategy[object]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return strings(field_limits(field).max_chars)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if field.type == FieldDescriptor.TYPE_ENUM:
        # proto3 enums are open: an unknown number is a valid value.
        numbers = [v.number for v in field.enum_type.values]
        return st.sampled_from([*numbers, 99])
    low, high = _INT_RANGES[field.type]
    # Small values (ranks, epochs, a world of 3) most of the time.
    return st.one_of(st.integers(max(low, -2), min(high, 4)), st.integers(low, high))


def messages(
    descriptor: Descriptor,
    overrides: dict[str, st.SearchStrategy[object]],
    depth: int = 0,
) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type: any subset of its fields set, at most
    one field of each oneof. `overrides` replaces the strategy of a field (by
    its full name)."""
    cls = GetMessageClass(descriptor)
    single: dict[str, st.SearchStrategy[object]] = {}
    oneofs: dict[str, list[tuple[str, st.SearchStrategy[object]]]] = {}
    for field in descriptor.fields:
        values = overrides.get(field.full_name)
        if values is None:
            values = _values(field, overrides, depth)
        if values is None:
            continue
        oneof = field.containing_oneof
        # proto3 `optional` is a synthetic oneof of one field: set or not.
        if oneof is not None and len(oneof.fields) > 1:
            oneofs.setdefault(oneof.name, []).append((field.name, values))
        else:
            single[field.name] = values
    chosen = [
        st.one_of(st.none(), *[st.tuples(st.just(name), v) for name, v in members])
        for members in oneofs.values()
    ]

    def build(fields: dict[str, object], picks: list[tuple[str, object] | None]) -> Message:
        fields = dict(fields)
        fields.update(pick for pick in picks if pick is not None)
        return cls(**fields)  # type: ignore[no-any-return]

    return st.builds(
        build, st.fixed_dictionaries({}, optional=single), st.tuples(*chosen).map(list)
    )


def _values(
    field: FieldDescriptor, overrides: dict[str, st.SearchStrategy[object]], depth: int
) -> st.SearchStrategy[object] | None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if depth >= 4:
            return None
        element: st.SearchStrategy[object] = messages(field.message_type, overrides, depth + 1)
    else:
        element = scalars(field)
    if not field.is_repeated:
        return element
    limit = field_limits(field).max_items
    filler = GetMessageClass(field.message_type)() if field.message_type is not None else 0
    return st.one_of(
        st.lists(element, max_size=3),
        # One past the limit, of default elements (cheap to build and send).
        st.just(limit + 1).map(lambda n: [filler] * n),
    )


def damaged(valid: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    """Bytes that are (mostly) not a message: random ones, or a valid
    serialization with a byte changed, cut short, or garbage appended."""

    @st.composite
    def change(draw: st.DrawFn) -> bytes:
        raw = bytearray(draw(valid).SerializeToString())
        how = draw(st.sampled_from(["flip", "cut", "append"]))
        if how == "append" or not raw:
            return bytes(raw) + draw(st.binary(min_size=1, max_size=8))
        at = draw(st.integers(0, len(raw) - 1))
        if how == "cut":
            return bytes(raw[:at])
        raw[at] = draw(st.integers(0, 255))
        return bytes(raw)

    return st.one_of(st.binary(max_size=48), change())


@dataclass(frozen=True)
class Call:
    method: str
    credential: str  # "none", "wrong" or "admin"
    payloads: tuple[bytes, ...]  # one for a unary request, 1-3 for a session

    def __repr__(self) -> str:  # hypothesis prints it: keep huge payloads out
        sizes = ", ".join(f"{len(p)} B {p[:24]!r}" for p in self.payloads)
        return f"Call({self.method.rsplit('/', 1)[-1]}, {self.credential}, [{sizes}])"


def calls(cluster: str) -> st.SearchStrategy[Call]:
    hello = "ep_recovery.v1.Hello."
    overrides: dict[str, st.SearchStrategy[object]] = {
        hello + "cluster": weighted((3, st.just(cluster)), (1, strings(64))),
        hello + "fingerprint": weighted((3, st.just(FINGERPRINT)), (1, strings(256))),
        hello + "incarnation": weighted((3, st.uuids().map(lambda u: u.hex)), (1, strings(128))),
        hello + "rank": st.integers(0, WORLD),
        hello + "placement": weighted(
            (3, st.just(ring_placement(WORLD).to_proto())),
            (1, messages(common_pb2.Placement.DESCRIPTOR, {})),
        ),
        # Mostly ranks of the cluster, so that some drains go through.
        "ep_recovery.v1.DrainRequest.rank": st.integers(-1, WORLD),
        "ep_recovery.v1.AdmitRequest.rank": st.integers(-1, WORLD),
        # Fresh request ids too: hypothesis repeats the text it generates,
        # and a repeated id is answered from the first call's answer.
        **{
            f"ep_recovery.v1.{request}.request_id": weighted(
                (2, st.uuids().map(lambda u: u.hex)), (3, strings(128))
            )
            for request in (
                "AbortOperationRequest",
                "SetAutoRejoinRequest",
                "DrainRequest",
                "AdmitRequest",
            )
        },
    }
    by_method = {
        method: messages(message_type.DESCRIPTOR, overrides)
        for method, message_type in wire.REQUEST_TYPES.items()
    }

    # A session's first message is mostly a hello: the others are refused
    # before anything else looks at them.
    hellos = messages(worker_pb2.Hello.DESCRIPTOR, overrides).map(
        lambda h: worker_pb2.WorkerMessage(hello=h)
    )

    def payload(method: str, first: bool) -> st.SearchStrategy[object]:
        valid = by_method[method]
        if method == SESSION and first:
            valid = weighted((2, hellos), (1, valid))  # type: ignore[assignment]
        return weighted((3, valid.map(lambda m: m.SerializeToString())), (1, damaged(valid)))

    @st.composite
    def one(draw: st.DrawFn) -> Call:
        method = draw(st.sampled_from(sorted(by_method)))
        credential = draw(
            weighted((1, st.just("none")), (1, st.just("wrong")), (3, st.just("admin")))
        )
        count = draw(st.integers(1, 3)) if method == SESSION else 1
        payloads = tuple(draw(payload(method, i == 0)) for i in range(count))
        return Call(method, str(credential), payloads)  # type: ignore[arg-type]

    return one()


def within_limits(message: Message) -> bool:
    """Every string and repeated field of `message`, nested ones too, within
    the limit its .proto states (checked here on its own, not by the code
    under test)."""
    for field, value in message.ListFields():
        limit = field_limits(field)
        if field.is_repeated:
            if len(value) > limit.max_items:
                return False
            if field.message_type is not None and not all(within_limits(v) for v in value):
                return False
        elif field.message_type is not None:
            if not within_limits(value):
                return False
        elif field.type == FieldDescriptor.TYPE_STRING and len(value) > limit.max_chars:
            return False
    return True


def well_formed(method: str, payload: bytes) -> bool:
    """Whether a request is one the coordinator must not refuse as invalid
    before looking at the cluster: it parses, is within its limits and, for a
    mutating call, has a request id and (Drain, Admit) a rank."""
    message_type = wire.REQUEST_TYPES[method]
    try:
        request = message_type.FromString(payload)
    except DecodeError:
        return False
    if not within_limits(request):
        return False
    if method.removeprefix(ADMIN) in MUTATING and not getattr(request, "request_id", ""):
        return False
    return "rank" not in message_type.DESCRIPTOR.fields_by_name or request.HasField("rank")


def run(coord: CoordinatorProcess, call: Call) -> tuple[grpc.StatusCode, str]:
    metadata = {"none": (), "wrong": bearer("not-the-token"), "admin": bearer(TOKEN)}
    if call.method != SESSION:
        return call_raw(coord.endpoint, call.method, call.payloads[0], metadata[call.credential])
    session = RawSession(coord.endpoint)
    try:
        for payload in call.payloads:
            session.send(payload)
        ended = session.next()
        assert isinstance(ended, grpc.RpcError), f"a generated session was accepted: {ended}"
        return ended.code(), ended.details() or ""
    finally:
        session.close()


@dataclass
class Fuzzed:
    coord: CoordinatorProcess
    ranks: dict[int, ThreadRank]
    etcd: str
    cluster: str

    def idle(self) -> bool:
        status = self.coord.status()
        return not status.HasField("operation") and self.coord.phase() in ("steady", "degraded")

    def restore(self) -> None:
        """After a call that changed the cluster: back to all ranks serving,
        so that later calls meet a full cluster again (a drained rank is
        relaunched and admitted, as an operator would)."""
        wait_until(self.idle, 60, "the operation the call started to end")
        for rank in list(self.ranks):
            if self.coord.status().ranks[rank].state != admin_pb2.RANK_STATE_DRAINED:
                continue
            self.ranks.pop(rank).stop()
            self.ranks[rank] = ThreadRank(
                rank, WORLD, self.coord.endpoint, self.etcd, self.cluster, rejoin=True,
                agent_options=AGENT_OPTIONS,
            ).start()  # fmt: skip
            wait_until(partial(self._admitted, rank), 90, f"rank {rank} to be admitted again")

    def _admitted(self, rank: int) -> bool:
        """Admit `rank` once it is a ready joiner and nothing runs (again if
        a fuzzed call switched automatic rejoin off and an admission was
        rolled back); True once it serves."""
        status = self.coord.status()
        if not self.idle():
            return False
        if rank in status.members:
            return True
        if status.ranks[rank].ready:
            with contextlib.suppress(grpc.RpcError):  # not ready after all: next time
                self.coord.admin.Admit(
                    admin_pb2.AdmitRequest(request_id=uuid.uuid4().hex, rank=rank), timeout=20
                )
        return False


@pytest.fixture
def fuzzed(tmp_path: Path, etcd: str, cluster_name: str) -> Iterator[Fuzzed]:
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    with thread_cluster(
        tmp_path, etcd, cluster_name, WORLD, "--admin-token-file", str(token_file), token=TOKEN,
        agent_options=lambda rank: AGENT_OPTIONS,
    ) as (coord, ranks):  # fmt: skip
        yield Fuzzed(coord, ranks, etcd, cluster_name)


def test_generated_calls_change_nothing_unless_authorized_and_valid(fuzzed: Fuzzed) -> None:
    coord, cluster = fuzzed.coord, fuzzed.cluster
    pid = coord.proc.pid
    start_kib = vm_rss_kib(pid)
    seen: dict[str, set[grpc.StatusCode]] = {}
    state = {"before": cluster_state(coord), "changes": 0}

    @settings(
        max_examples=EXAMPLES,
        # The CI budget runs the same examples every time (no flaky CI);
        # EP_WIRE_FUZZ_EXAMPLES asks for a bigger, random run.
        derandomize="EP_WIRE_FUZZ_EXAMPLES" not in os.environ,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(call=calls(cluster))
    def one_call(call: Call) -> None:
        try:
            check(call)
        except AssertionError as exc:
            failures.append(f"{call}: {exc}")
            raise

    def check(call: Call) -> None:
        code, details = run(coord, call)
        seen.setdefault(call.method.rsplit("/", 1)[-1], set()).add(code)
        allowed = SESSION_CODES if call.method == SESSION else ADMIN_CODES
        assert code in allowed, (code, details)
        # Never an echo of a long value: the longest legitimate answer names
        # a request id and an operation (128 characters each) and a reason.
        assert len(details) < 2048, len(details)
        name = call.method.removeprefix(ADMIN)
        authorized = name not in MUTATING or call.credential == "admin"
        if not authorized:
            assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
        elif not well_formed(call.method, call.payloads[0]):
            # Refused as such, never acted on (a rankless Drain on rank 0).
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        if name in MUTATING and authorized and code == grpc.StatusCode.OK:
            # Authorized and valid: it may change the cluster.
            fuzzed.restore()
            state["changes"] += 1
        else:
            assert cluster_state(coord) == state["before"], (call, code, details)
        state["before"] = cluster_state(coord)
        grown = vm_rss_kib(pid) - start_kib
        assert grown < RSS_BOUND_KIB, f"the coordinator grew by {grown} KiB"

    failures: list[str] = []
    try:
        one_call()
    except Exception:
        # The cluster a failing call left behind is not the one it met, so
        # hypothesis' replays fail differently (FlakyFailure): say what
        # failed first.
        if failures:
            raise AssertionError(f"the first failing call: {failures[0]}") from None
        raise
    # Every method was driven, and calls got past the cheap checks too: some
    # reached the state machine, and some mutating ones were carried out.
    assert len(seen) == len(wire.REQUEST_TYPES), sorted(seen)
    codes = set().union(*seen.values())
    assert {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED} <= codes, codes
    assert grpc.StatusCode.NOT_FOUND in codes and len(seen["Session"]) > 1, seen
    assert state["changes"] > 0, seen
    assert coord.phase() == "steady" and len(coord.status().members) == WORLD
    assert "Abort error unexpectedly suppressed" not in coord.log_tail()
