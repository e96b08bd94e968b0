"""Prometheus metrics of one coordinator, and the tiny HTTP server for /metrics.

Each coordinator owns its own `CollectorRegistry` (never prometheus_client's
global one), so tests and several coordinators in one process stay apart.

Events feed the histograms and counters as the runtime carries out actions
(`observe_*`). The gauges of the current state (epoch, phase, ranks by state)
are set from the state machine just before each scrape (`set_state`), so they
cost nothing between scrapes.

The HTTP server runs on the coordinator's event loop (asyncio streams, no
thread): a scrape reads the machine on the same loop that changes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from coordinator import state_machine as sm
from coordinator.config import split_host_port
from coordinator.logs import fields

log = logging.getLogger(__name__)

NAMESPACE = "ep_coordinator"

# Rank states as `RecoveryStateMachine.rank_state` names them; each is exported
# (as 0 when no rank is in it) so a dashboard's series never vanish.
RANK_STATES = ("absent", "registered", "serving", "suspect", "failed", "joining", "drained")
OUTCOMES = ("completed", "rolled_back")

# Operation phases last milliseconds to seconds; idle phases (steady,
# degraded) last until the next event, so the buckets reach an hour.
PHASE_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip
STALL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
DETECTION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)  # fmt: skip


class CoordinatorMetrics:
    """The coordinator's metric families, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.phase_duration = Histogram(
            "phase_duration_seconds",
            "Time spent in each phase of the timeline, observed when the next phase begins.",
            ["phase"],
            namespace=NAMESPACE,
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.grow_stall = Histogram(
            "grow_stall_seconds",
            "Longest survivor stall (held at the boundary until resumed) of each completed grow.",
            namespace=NAMESPACE,
            buckets=STALL_BUCKETS,
            registry=r,
        )
        self.detection = Histogram(
            "failure_detection_seconds",
            "From a rank's suspicion (its session broke) to the confirmation of its failure, "
            "for failures that had a suspicion; by the confirming reason.",
            ["reason"],
            namespace=NAMESPACE,
            buckets=DETECTION_BUCKETS,
            registry=r,
        )
        self.operations = Counter(
            "operations",
            "Operations ended, by kind (form, shrink, grow, drain) and outcome.",
            ["kind", "outcome"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.refused = Counter(
            "refused_messages",
            "Messages refused, by gRPC status code: ranks' hellos and in-session messages, "
            "and any request refused at the door (malformed, or a field over its size limit).",
            ["code"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.ranks = Gauge(
            "ranks",
            "Rank slots by state.",
            ["state"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.epoch = Gauge("epoch", "The current epoch.", namespace=NAMESPACE, registry=r)
        self.etcd_reachable = Gauge(
            "etcd_reachable",
            "1 while etcd answers this coordinator (leader lease refreshes, record writes); "
            "0 while it does not (gRPC health is NOT_SERVING then).",
            namespace=NAMESPACE,
            registry=r,
        )
        self.etcd_reachable.set(1)
        self.admin_denied = Counter(
            "admin_calls_denied",
            "Mutating admin calls refused for a missing or wrong admin credential, by gRPC "
            "status code (UNAUTHENTICATED, PERMISSION_DENIED).",
            ["code"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.phase = Gauge(
            "phase",
            "1 for the current phase, 0 for the others.",
            ["phase"],
            namespace=NAMESPACE,
            registry=r,
        )
        # Every known label value up front: a family with no samples yet is
        # still exported, and a rate() over a series that appears later is wrong.
        for phase in sm.Phase:
            self.phase_duration.labels(phase.value)
            self.phase.labels(phase.value)
        for kind in sm.OpKind:
            for outcome in OUTCOMES:
                self.operations.labels(kind.value, outcome)
        for code in sm.Code:
            self.refused.labels(code.value)
        for state in RANK_STATES:
            self.ranks.labels(state)
        for denied in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            self.admin_denied.labels(denied)

    # --- fed by the runtime ---------------------------------------------------

    def observe_phase(self, phase: str, seconds: float) -> None:
        self.phase_duration.labels(phase).observe(max(seconds, 0.0))

    def observe_failure(self, failed: sm.RankFailed) -> None:
        if failed.suspected_at is not None:
            self.detection.labels(failed.reason).observe(max(failed.at - failed.suspected_at, 0.0))

    def observe_operation(self, ended: sm.OperationEnded) -> None:
        self.operations.labels(ended.kind.value, ended.outcome).inc()
        if ended.kind == sm.OpKind.GROW and ended.outcome == "completed":
            self.grow_stall.observe(max(ended.stall_ms, 0.0) / 1000.0)

    def observe_refused(self, code: str) -> None:
        self.refused.labels(code).inc()

    def observe_admin_denied(self, code: str) -> None:
        self.admin_denied.labels(code).inc()

    def set_state(self, epoch: int, phase: str, rank_states: Iterable[str]) -> None:
        self.epoch.set(epoch)
        for known in sm.Phase:
            self.phase.labels(known.value).set(1 if known.value == phase else 0)
        counts = Tally(rank_states)
        for state in {*RANK_STATES, *counts}:
            self.ranks.labels(state).set(counts.get(state, 0))

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (text, or OpenMetrics when `accept` asks) and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


# --- /metrics over HTTP ---------------------------------------------------------

Render = Callable[[str], Awaitable[tuple[bytes, str]]]

_REQUEST_TIMEOUT_S = 5.0
_MAX_HEAD = 16 * 1024


async def start_metrics_server(listen: str, render: Render) -> asyncio.Server:
    """Serve GET /metrics on `listen` (host:port, port 0 picks one) until closed.

    HTTP/1.1 with one request per connection (Connection: close), which is what
    Prometheus and curl need. `render(accept_header)` returns the body and type.
    """
    host, port = split_host_port(listen)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _handle(reader, writer, render)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except ConnectionError:
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port, limit=_MAX_HEAD)
    log.info("metrics serving", extra=fields(listen=listen, port=bound_port(server)))
    return server


def bound_port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1]) if server.sockets else 0


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, render: Render
) -> None:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT_S)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        await _respond(writer, "400 Bad Request", b"bad request\n")
        return
    method, target, _ = parts
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    path = target.split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        await _respond(writer, "405 Method Not Allowed", b"GET or HEAD\n", allow="GET, HEAD")
        return
    if path != "/metrics":
        await _respond(writer, "404 Not Found", b"metrics are at /metrics\n")
        return
    body, content_type = await render(headers.get("accept", ""))
    await _respond(writer, "200 OK", body, content_type=content_type, head_only=method == "HEAD")


async def _respond(
    writer: asyncio.StreamWriter,
    status: str,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    allow: str = "",
    head_only: bool = False,
) -> None:
    head = [
        f"HTTP/1.1 {status}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if allow:
        head.append(f"Allow: {allow}")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(body)
    await writer.drain()
