"""The etcd key layout, in one place, and how we open a client.

    /ep-recovery/{cluster}/ranks/{rank:05d}   one per live rank, on its lease
    /ep-recovery/{cluster}/state              the coordinator's cluster record
    /ep-recovery/{cluster}/leader             the active coordinator (election)

Rank numbers are zero-padded so a prefix read returns ranks in numeric order.
A rank key's value is JSON: rank, incarnation, lease_id, pid, host.
"""

from __future__ import annotations

import json
from typing import Any

import aetcd

ROOT = "/ep-recovery"
RANK_DIGITS = 5
MAX_RANK = 10**RANK_DIGITS - 1

# gRPC reconnects with exponential backoff up to 120 s by default, so after a
# long etcd outage a client could sit out minutes after the server is back.
# Keepalive pings find a dead peer on a half-open connection (no RST), which
# would otherwise hang a watch forever; etcd refuses pings more often than
# every 5 s (--grpc-keepalive-min-time).
CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
}


def validate_cluster(cluster: str) -> str:
    # A slash would let cluster "a" see cluster "a/ranks"'s keys under its prefix.
    if not cluster or "/" in cluster:
        raise ValueError(f"cluster name must be non-empty and contain no '/': {cluster!r}")
    return cluster


def cluster_prefix(cluster: str) -> bytes:
    return f"{ROOT}/{validate_cluster(cluster)}/".encode()


def ranks_prefix(cluster: str) -> bytes:
    return cluster_prefix(cluster) + b"ranks/"


def rank_key(cluster: str, rank: int) -> bytes:
    if not 0 <= rank <= MAX_RANK:
        raise ValueError(f"rank {rank} outside 0..{MAX_RANK}")
    return ranks_prefix(cluster) + f"{rank:0{RANK_DIGITS}d}".encode()


def state_key(cluster: str) -> bytes:
    return cluster_prefix(cluster) + b"state"


def leader_key(cluster: str) -> bytes:
    return cluster_prefix(cluster) + b"leader"


def parse_rank_key(cluster: str, key: bytes) -> int | None:
    """The rank a key of this cluster's rank prefix names; None for any other key."""
    prefix = ranks_prefix(cluster)
    if not key.startswith(prefix):
        return None
    tail = key[len(prefix) :]
    # Exactly our format, so a hand-written "ranks/7" or "ranks/00007x" is foreign.
    if len(tail) != RANK_DIGITS or not tail.isdigit():
        return None
    return int(tail)


def encode_rank_value(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def decode_rank_value(raw: bytes) -> dict[str, Any] | None:
    """The JSON object a rank key holds; None when it is not one."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) to (host, port)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"etcd endpoint must be host:port, got {endpoint!r}")
    return host.strip("[]"), int(port)


def new_client(host: str, port: int, *, timeout_s: float | None = None) -> aetcd.Client:
    """An aetcd client with our channel options. It connects lazily (first call)."""
    return aetcd.Client(host=host, port=port, timeout=timeout_s, options=dict(CHANNEL_OPTIONS))
