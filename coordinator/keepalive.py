"""gRPC keepalive of the rank sessions: a session whose peer went silent
without closing it is noticed, on both ends.

A host that vanishes, a partition, a firewall or NAT that starts dropping a
flow: none of them ends a TCP connection. Nothing arrives, nothing is
refused, and without keepalive a gRPC stream waits on it for ever (TCP's own
keepalive starts after two hours). So both ends ping:

- The agent pings its coordinator every rank lease TTL (at least 1 s) and
  drops the session when a ping goes unanswered for a TTL, at least
  MIN_PING_TIMEOUT_S: a dead session is noticed within about three seconds
  at the default TTL of 1 s, about when the coordinator would see the lease
  of a dead rank expire and fail it. The agent then reconnects (to
  whichever coordinator the leader key names), for as long as it takes; the
  engine serves on meanwhile. Without this, an agent whose coordinator's
  host vanished waits on the old connection for ever, past a new leader's
  reconnection window.
- The coordinator pings every session every `lease_rebind_s` / 2 and ends a
  session whose ping goes unanswered for as long again, at least
  MIN_PING_TIMEOUT_S: a dead session is noticed within about
  `lease_rebind_s` (3.5 s at the default 3 s). A rank cut off from the
  coordinator but not from etcd (its lease is renewed) is then *suspect*,
  not silently "serving": a suspect member is never declared hung for the
  progress reports that stopped arriving (before, the hang check failed such
  a rank after `hang_timeout_s`), and a rank gone for good (no lease either)
  is confirmed by both signals as soon as both are in.

The server must allow the agents' pings: by default it tolerates a ping
without data only every 5 minutes and ends the connection (GOAWAY
"too_many_pings") after two that come sooner, and a session in steady state
carries hardly any data from the coordinator.

How long a ping may go unanswered is `grpc.http2.ping_timeout_ms`, not only
`grpc.keepalive_timeout_ms`: gRPC core (1.85 here) arms the keepalive
watchdog only under conditions that do not hold for these channels, while
every ping it sends is bounded by the ping timeout, one minute by default.
With only `keepalive_timeout_ms` set, a blackholed session was dropped a
minute after the ping, not a second (tests/test_network_faults.py shows
both). So both are set, to the same value.

A ping is an HTTP/2 frame answered by gRPC's core, not by Python code, so a
busy event loop does not delay the answer; a frozen process (SIGSTOP) does,
and that is a session worth dropping. The answer may still wait for a
thread on a host whose cores are all busy, hence MIN_PING_TIMEOUT_S: a
session dropped for nothing costs a reconnect, and makes the rank suspect
meanwhile (a peer's failed step would then convict it).
"""

from __future__ import annotations

from typing import Any

# The shortest interval the agents ping at (a lease TTL is at least 1 s).
MIN_PING_INTERVAL_S = 1.0
# The shortest time either end waits for a ping's answer.
MIN_PING_TIMEOUT_S = 2.0
# The server accepts pings this often: under the agents' interval, with room
# for timer jitter.
SERVER_MIN_PING_INTERVAL_MS = 500


def client_options(lease_ttl_s: float) -> list[tuple[str, Any]]:
    """A rank's session channel: ping every lease TTL, give up on a ping
    after another TTL (at least `MIN_PING_INTERVAL_S` and
    `MIN_PING_TIMEOUT_S`)."""
    interval_ms = int(1000 * max(MIN_PING_INTERVAL_S, lease_ttl_s))
    timeout_ms = int(1000 * max(MIN_PING_TIMEOUT_S, lease_ttl_s))
    return [
        ("grpc.keepalive_time_ms", interval_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        # Pings while the coordinator sends nothing (steady state), for ever.
        ("grpc.http2.max_pings_without_data", 0),
        # A lost session is reopened at once, not after gRPC's default backoff
        # (up to 120 s); the agent's loop has its own backoff.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


def server_options(lease_rebind_s: float) -> list[tuple[str, Any]]:
    """The coordinator's gRPC server: ping every session every
    `lease_rebind_s` / 2, end it after as long again without an answer (at
    least `MIN_PING_TIMEOUT_S`); and accept the agents' own pings."""
    half_ms = max(250, int(500 * lease_rebind_s))
    timeout_ms = max(int(1000 * MIN_PING_TIMEOUT_S), half_ms)
    return [
        ("grpc.keepalive_time_ms", half_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        # 0: no limit to pings that come sooner (they are not misbehaviour).
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.http2.max_pings_without_data", 0),
    ]
