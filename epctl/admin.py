"""`epctl`'s admin commands: the AdminService calls, their tables and JSON.

Every command returns an exit code (epctl/exits.py): 0 done, 1 failed, 2 bad
request, 3 coordinator unreachable, 4 not found, 5 refused by the cluster's
state, 6 not allowed (no or a wrong admin credential). Errors go to stderr as
`epctl CMD: CODE: details`.

Every command connects the same way (`Target`): over TLS with `--ca` (and
`--cert`/`--key` under mutual TLS), sending the admin bearer token of
`--token-file` with every call; each flag has an EPCTL_* variable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TextIO, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from coordinator.config import is_loopback, split_host_port
from coordinator.security import ClientTls, SecretFileError, read_token
from epctl.exits import (
    EXIT_DENIED,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from protos.ep_recovery.v1 import admin_pb2, admin_pb2_grpc, common_pb2

DEFAULT_ENDPOINT = "127.0.0.1:50051"
ENDPOINT_ENV = "EPCTL_ENDPOINT"
CA_ENV = "EPCTL_CA"
CERT_ENV = "EPCTL_CERT"
KEY_ENV = "EPCTL_KEY"
TOKEN_FILE_ENV = "EPCTL_TOKEN_FILE"
# How long one unary call may take: mutating calls wait for an etcd write.
CALL_TIMEOUT_S = 15.0

EXIT_OF_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_REFUSED,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_DENIED,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED,
}

T = TypeVar("T")


class UsageError(Exception):
    """Bad input found before any call (exit 2)."""


def resolve_endpoint(
    flag: str | None, config: Path | None, environ: Mapping[str, str] | None = None
) -> str:
    """The coordinator's address: --endpoint, else $EPCTL_ENDPOINT, else the
    daemon's own configuration (`listen` from --config FILE, overridden by
    $EP_COORDINATOR_LISTEN, as ep-coordinator reads them), else the default.
    A wildcard listen address is reached on loopback."""
    from coordinator.config import ConfigError, env_var, read_config_file

    env = os.environ if environ is None else environ
    if flag:
        return flag
    if env.get(ENDPOINT_ENV):
        return env[ENDPOINT_ENV]
    listen = ""
    if config is not None:
        try:
            listen = str(read_config_file(config).get("listen", "") or "")
        except ConfigError as exc:
            raise UsageError(str(exc)) from exc
    listen = env.get(env_var("listen"), listen)
    if not listen:
        return DEFAULT_ENDPOINT
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint",
        help=f"coordinator host:port (default: ${ENDPOINT_ENV}, else `listen` of --config "
        f"or $EP_COORDINATOR_LISTEN, else {DEFAULT_ENDPOINT})",
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="the coordinator's YAML file, for its address"
    )
    parser.add_argument(
        "--ca",
        metavar="PEM",
        help=f"connect over TLS, verifying the coordinator with this CA bundle (${CA_ENV})",
    )
    parser.add_argument(
        "--cert", metavar="PEM", help=f"client certificate, for mutual TLS (${CERT_ENV})"
    )
    parser.add_argument("--key", metavar="PEM", help=f"the private key of --cert (${KEY_ENV})")
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"send the admin bearer token this file holds (${TOKEN_FILE_ENV})",
    )


class _CallDetails(NamedTuple):
    """grpc.ClientCallDetails with other metadata (grpc's own is private)."""

    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _WithMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds fixed metadata (the bearer token) to every call of a channel."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._pairs = pairs

    def _details(self, details: Any) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), *self._pairs],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


@dataclass(frozen=True)
class Target:
    """Where and how to reach the coordinator."""

    endpoint: str
    tls: ClientTls = field(default_factory=ClientTls)
    token: str = ""

    def channel(self) -> grpc.Channel:
        """A channel over TLS when a CA or certificate is given, plaintext
        otherwise; every call on it carries the bearer token, if any."""
        if self.tls.enabled:
            try:
                channel = grpc.secure_channel(self.endpoint, self.tls.credentials())
            except SecretFileError as exc:
                raise UsageError(str(exc)) from exc
        else:
            channel = grpc.insecure_channel(self.endpoint)
        if self.token:
            channel = grpc.intercept_channel(
                channel, _WithMetadata([("authorization", f"Bearer {self.token}")])
            )
        return channel

    @contextlib.contextmanager
    def stub(self) -> Iterator[admin_pb2_grpc.AdminServiceStub]:
        with self.channel() as channel:
            yield admin_pb2_grpc.AdminServiceStub(channel)


def target_of(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Target:
    """The endpoint (resolve_endpoint), TLS files and token from the flags,
    else the EPCTL_* variables. UsageError for an unreadable token file."""
    env = os.environ if environ is None else environ
    endpoint = resolve_endpoint(args.endpoint, args.config, env)
    tls = ClientTls(
        ca_file=args.ca or env.get(CA_ENV, ""),
        cert_file=args.cert or env.get(CERT_ENV, ""),
        key_file=args.key or env.get(KEY_ENV, ""),
    )
    if bool(tls.cert_file) != bool(tls.key_file):
        raise UsageError("--cert and --key go together (or EPCTL_CERT and EPCTL_KEY)")
    token_file = args.token_file or env.get(TOKEN_FILE_ENV, "")
    token = ""
    if token_file:
        try:
            token = read_token(token_file)
        except SecretFileError as exc:
            raise UsageError(f"--token-file: {exc}") from exc
        host = split_host_port(endpoint)[0] if ":" in endpoint else endpoint
        if not tls.enabled and not is_loopback(host):
            sys.stderr.write(
                f"epctl: warning: sending the admin token to {endpoint} without TLS "
                "(give --ca to use TLS)\n"
            )
    return Target(endpoint, tls, token)


def endpoint_of(args: argparse.Namespace) -> str:
    return resolve_endpoint(args.endpoint, args.config)


def call(
    command: str, target: Target, fn: Callable[[admin_pb2_grpc.AdminServiceStub], T]
) -> tuple[T | None, int]:
    """Run `fn` with a stub; (its result, EXIT_OK) or (None, the exit code of
    the error, which is reported on stderr)."""
    with target.stub() as stub:
        try:
            return fn(stub), EXIT_OK
        except grpc.RpcError as exc:
            return None, report_error(command, target.endpoint, exc)


def report_error(command: str, endpoint: str, exc: grpc.RpcError) -> int:
    code: grpc.StatusCode = exc.code()
    details = exc.details() or ""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        details = f"coordinator at {endpoint}: {details}"
        lowered = details.lower()
        if any(word in lowered for word in ("ssl", "tls", "handshake", "certificate")):
            details += " (a TLS problem: check --ca, and --cert/--key under mutual TLS)"
    sys.stderr.write(f"epctl {command}: {code.name}: {details}\n")
    return EXIT_OF_CODE.get(code, EXIT_FAILED)


def to_json(message: Message) -> dict[str, Any]:
    return MessageToDict(message)


def phase_name(phase: int) -> str:
    return common_pb2.Phase.Name(phase).removeprefix("PHASE_").lower()


def clock(unix_ms: float) -> str:
    """Local wall-clock time of day with milliseconds, '-' for none."""
    if unix_ms <= 0:
        return "-"
    seconds = unix_ms / 1000.0
    return time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{int(unix_ms % 1000):03d}"


def ranks_text(ranks: Any) -> str:
    return ",".join(str(r) for r in ranks) or "-"


# --- drain, admit ----------------------------------------------------------------


def mutate(args: argparse.Namespace) -> int:
    """abort, auto-rejoin, drain and admit: one AdminReply each."""
    request_id = args.request_id or uuid.uuid4().hex
    target = target_of(args)

    def send(stub: admin_pb2_grpc.AdminServiceStub) -> admin_pb2.AdminReply:
        match args.command:
            case "abort":
                return stub.AbortOperation(
                    admin_pb2.AbortOperationRequest(
                        request_id=request_id, op_id=args.op_id, reason=args.reason
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
            case "auto-rejoin":
                return stub.SetAutoRejoin(
                    admin_pb2.SetAutoRejoinRequest(
                        request_id=request_id, enabled=args.state == "on"
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
            case "drain":
                return stub.Drain(
                    admin_pb2.DrainRequest(request_id=request_id, rank=args.rank),
                    timeout=CALL_TIMEOUT_S,
                )
            case "admit":
                return stub.Admit(
                    admin_pb2.AdmitRequest(request_id=request_id, rank=args.rank),
                    timeout=CALL_TIMEOUT_S,
                )
        raise AssertionError(f"not a mutating command: {args.command}")

    reply, code = call(args.command, target, send)
    if reply is None:
        return code
    outcome: admin_pb2.OperationSummary | None = None
    if getattr(args, "wait", False) and reply.op_id:
        outcome, code = wait_for_operation(args.command, target, reply.op_id, args.wait_timeout)
        if outcome is None:
            return code
    if args.output == "json":
        out: dict[str, Any] = {
            "request_id": reply.request_id,
            "message": reply.message,
            "replayed": reply.replayed,
            "op_id": reply.op_id,
        }
        if outcome is not None:
            out["outcome"] = outcome.outcome
            out["reason"] = outcome.reason
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        sys.stdout.write(reply.message + (" (replayed)" if reply.replayed else "") + "\n")
        if outcome is not None:
            why = f": {outcome.reason}" if outcome.reason else ""
            sys.stdout.write(f"operation {outcome.op_id} {outcome.outcome}{why}\n")
    if outcome is not None and outcome.outcome != "completed":
        return EXIT_FAILED
    return EXIT_OK


def wait_for_operation(
    command: str, target: Target, op_id: str, timeout_s: float
) -> tuple[admin_pb2.OperationSummary | None, int]:
    """Poll GetOperation until the operation has ended (its summary), or the
    deadline passes (EXIT_FAILED)."""
    deadline = time.monotonic() + timeout_s
    with target.stub() as stub:
        while True:
            try:
                detail = stub.GetOperation(
                    admin_pb2.GetOperationRequest(op_id=op_id), timeout=CALL_TIMEOUT_S
                )
            except grpc.RpcError as exc:
                return None, report_error(command, target.endpoint, exc)
            if detail.summary.outcome != "running":
                return detail.summary, EXIT_OK
            if time.monotonic() > deadline:
                sys.stderr.write(
                    f"epctl {command}: operation {op_id} still runs after {timeout_s:g} s "
                    f"(phase {phase_name(detail.summary.phase)})\n"
                )
                return None, EXIT_FAILED
            time.sleep(0.05)


# --- ops, timeline -----------------------------------------------------------------


def list_operations(args: argparse.Namespace) -> int:
    reply, code = call(
        "ops",
        target_of(args),
        lambda stub: stub.ListOperations(
            admin_pb2.ListOperationsRequest(limit=args.limit), timeout=CALL_TIMEOUT_S
        ),
    )
    if reply is None:
        return code
    if args.output == "json":
        sys.stdout.write(json.dumps(to_json(reply)) + "\n")
        return EXIT_OK
    render_operations(reply.operations, sys.stdout)
    return EXIT_OK


def render_operations(operations: Any, out: TextIO) -> None:
    header = (
        f"{'OPERATION':<34} {'KIND':<6} {'OUTCOME':<11} {'EPOCH':>5} {'JOINED':<8} "
        f"{'LEFT':<8} {'STARTED':<12} {'DURATION':>10} {'STALL':>9}  REASON\n"
    )
    out.write(header)
    for s in operations:
        duration = f"{s.end_unix_ms - s.start_unix_ms:.1f} ms" if s.end_unix_ms else "-"
        outcome = s.outcome if s.outcome != "running" else f"@{phase_name(s.phase)}"
        joined = s.joined if s.outcome != "running" else s.joining
        left = s.left if s.outcome != "running" else s.leaving
        out.write(
            f"{s.op_id:<34} {s.kind:<6} {outcome:<11} {s.epoch:>5} {ranks_text(joined):<8} "
            f"{ranks_text(left):<8} {clock(s.start_unix_ms):<12} {duration:>10} "
            f"{s.stall_ms:>6.1f} ms  {s.reason}\n"
        )


def timeline(args: argparse.Namespace) -> int:
    from epctl import trace

    detail, code = call(
        "timeline",
        target_of(args),
        lambda stub: stub.GetOperation(
            admin_pb2.GetOperationRequest(op_id=args.op_id), timeout=CALL_TIMEOUT_S
        ),
    )
    if detail is None:
        return code
    if args.trace is not None:
        try:
            args.trace.write_text(json.dumps(trace.chrome_trace(detail), indent=1))
        except OSError as exc:
            sys.stderr.write(f"epctl timeline: cannot write {args.trace}: {exc}\n")
            return EXIT_FAILED
    if args.png is not None:
        try:
            trace.gantt_png(detail, args.png)
        except trace.MissingDependency as exc:
            sys.stderr.write(f"epctl timeline: {exc}\n")
            return EXIT_FAILED
        except OSError as exc:
            sys.stderr.write(f"epctl timeline: cannot write {args.png}: {exc}\n")
            return EXIT_FAILED
    if args.output == "json":
        sys.stdout.write(json.dumps(to_json(detail)) + "\n")
    else:
        render_timeline(detail, sys.stdout)
    return EXIT_OK


def render_timeline(detail: admin_pb2.OperationDetail, out: TextIO) -> None:
    from epctl import trace

    s = detail.summary
    state = s.outcome if s.outcome != "running" else f"running ({phase_name(s.phase)})"
    out.write(
        f"operation {s.op_id}  kind {s.kind}  {state}  epoch {s.epoch}  "
        f"started {clock(s.start_unix_ms)}"
    )
    if s.end_unix_ms:
        out.write(f"  took {s.end_unix_ms - s.start_unix_ms:.1f} ms")
    out.write("\n")
    if s.reason:
        out.write(f"reason: {s.reason}\n")
    spans = trace.spans_of(detail)
    out.write(f"\n{'TRACK':<12} {'PHASE/STEP':<11} {'START':>10} {'DURATION':>10}  OUTCOME\n")
    for track in trace.tracks_of(detail):
        for span in sorted((x for x in spans if x.track == track), key=lambda x: x.start_ms):
            outcome = span.args.get("outcome", "")
            out.write(
                f"{track:<12} {span.name:<11} {span.start_ms:>7.1f} ms "
                f"{span.end_ms - span.start_ms:>7.1f} ms  {outcome}\n"
            )


# --- watch --------------------------------------------------------------------------------


def watch(args: argparse.Namespace) -> int:
    """Print events as they come: the snapshot, then one line each. Ends after
    --count events, after --timeout seconds (both exit 0), or when the
    coordinator ends the stream (exit 3)."""
    target = target_of(args)
    endpoint = target.endpoint
    seen = 0
    with target.stub() as stub:
        stream = stub.WatchEvents(admin_pb2.WatchEventsRequest(), timeout=args.timeout)
        try:
            for event in stream:
                if args.output == "json":
                    sys.stdout.write(json.dumps(to_json(event)) + "\n")
                else:
                    if event.WhichOneof("body") == "snapshot":
                        sys.stdout.write(f"{'TIME':<12} {'SEQ':>6}  {'EVENT':<18} DETAIL\n")
                    sys.stdout.write(event_line(event) + "\n")
                sys.stdout.flush()  # a pipe sees each event as it happens
                if event.WhichOneof("body") != "snapshot":
                    seen += 1
                    if args.count is not None and seen >= args.count:
                        stream.cancel()
                        return EXIT_OK
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and args.timeout is not None:
                return EXIT_OK  # --timeout: the watch ran its time
            if code == grpc.StatusCode.CANCELLED:
                return EXIT_OK
            return report_error("watch", endpoint, exc)
    sys.stderr.write("epctl watch: the coordinator ended the stream (shutting down?)\n")
    return EXIT_UNAVAILABLE


def event_line(event: admin_pb2.ClusterEvent) -> str:
    kind = event.WhichOneof("body") or "?"
    detail = ""
    match kind:
        case "snapshot":
            st = event.snapshot
            detail = (
                f"cluster {st.cluster} epoch {st.epoch} phase {phase_name(st.phase)} "
                f"members [{ranks_text(st.members)}]"
            )
            if st.HasField("operation"):
                detail += f" operation {st.operation.op_id}"
        case "phase":
            p = event.phase
            detail = f"{phase_name(p.phase)} (epoch {p.epoch}{', ' + p.op_id if p.op_id else ''})"
        case "operation_started":
            o = event.operation_started
            detail = f"{o.op_id} {o.kind} to epoch {o.target_epoch}"
            if o.joining:
                detail += f" joining [{ranks_text(o.joining)}]"
            if o.leaving:
                detail += f" leaving [{ranks_text(o.leaving)}]"
        case "operation_ended":
            o = event.operation_ended
            detail = f"{o.op_id} {o.kind} {o.outcome} at epoch {o.epoch}"
            if o.end_unix_ms:
                detail += f" in {o.end_unix_ms - o.start_unix_ms:.1f} ms"
            if o.reason:
                detail += f": {o.reason}"
        case "rank_failed":
            f = event.rank_failed
            detail = f"rank {f.rank}: {f.reason}"
        case "admin_call":
            a = event.admin_call
            detail = f"{a.method}({a.arguments}) -> {a.code}: {a.message}"
            if a.replayed:
                detail += " (replayed)"
    name = kind.replace("_", " ")
    return f"{clock(event.unix_ms):<12} {event.seq:>6}  {name:<18} {detail}"
