"""The etcd key layout, in one place, and how we open a client.

    /ep-recovery/{cluster}/ranks/{rank:05d}   one per live rank, on its lease
    /ep-recovery/{cluster}/state              the coordinator's cluster record
    /ep-recovery/{cluster}/leader             the active coordinator (election)
    /ep-recovery/{cluster}/history/...        the operation history (history_store)

Rank numbers are zero-padded so a prefix read returns ranks in numeric order.
A rank key's value is JSON: rank, incarnation, lease_id, pid, host, and
proof_sha256 (the SHA-256 of the secret the rank's hello carries).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher
import grpc

from coordinator.security import EtcdAccess

ROOT = "/ep-recovery"
RANK_DIGITS = 5
MAX_RANK = 10**RANK_DIGITS - 1

# gRPC reconnects with exponential backoff up to 120 s by default, so after a
# long etcd outage a client could sit out minutes after the server is back.
# Keepalive pings find a dead peer on a half-open connection (no RST), which
# would otherwise hang a watch forever; etcd refuses pings more often than
# every 5 s (--grpc-keepalive-min-time). How long a ping may go unanswered is
# gRPC's ping timeout (one minute by default), which gRPC core 1.85 applies
# where `keepalive_timeout_ms` alone is not enforced (coordinator.keepalive):
# without it a dead connection was found after 70 s, not 15.
CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.ping_timeout_ms": 5_000,
    # A connection of its own per client. By default gRPC shares one
    # connection among the channels of a process that have the same target
    # and options, so a client made to get away from a connection that went
    # silent (coordinator.leased_key) would get the same dead one again.
    "grpc.use_local_subchannel_pool": 1,
}


def proof_digest(proof: str) -> str:
    """What a rank key holds of its process's proof: its SHA-256 (hex). A
    reader of etcd learns nothing that would let it present the proof."""
    return hashlib.sha256(proof.encode()).hexdigest()


def proof_matches(proof: str, digest: str) -> bool:
    """Whether a hello's `proof` is the one whose digest the rank key holds."""
    return bool(proof) and bool(digest) and hmac.compare_digest(proof_digest(proof), digest)


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


def new_client(
    host: str, port: int, *, timeout_s: float | None = None, access: EtcdAccess | None = None
) -> aetcd.Client:
    """An aetcd client with our channel options, over TLS and/or as an etcd
    user when `access` says so (it reads its files now: OSError/ValueError
    when one is unusable). It connects lazily (first call)."""
    access = access or EtcdAccess()
    password = access.password()
    username = access.username or None
    tls = access.tls
    kwargs: dict[str, Any] = {
        "host": host,
        "port": port,
        "timeout": timeout_s,
        "options": dict(CHANNEL_OPTIONS),
        "username": username,
        "password": password if username else None,
    }
    if tls is None:
        return aetcd.Client(**kwargs)
    return TlsClient(credentials=tls.credentials(), **kwargs)


class TlsClient(aetcd.Client):
    """aetcd's client over a TLS channel.

    aetcd 1.0 (the newest) opens plaintext channels only, so this connect()
    opens a secure one and sets up the same stubs as aetcd's own: every other
    method is aetcd's. tests/test_security.py runs it against a real etcd
    serving TLS with client certificates and authentication, so a change in
    aetcd's internals fails a test rather than production.
    """

    _is_connecting: bool  # aetcd's, set in its __init__

    def __init__(self, *, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # another task is connecting: wait for it
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        host = f"[{self._host}]" if ":" in self._host else self._host
        channel = grpc.aio.secure_channel(
            f"{host}:{self._port}", self._credentials, options=list(self._options.items())
        )
        try:
            metadata = None
            if self._username is not None:
                auth = aetcd.rpc.AuthStub(channel)
                try:
                    reply = await auth.Authenticate(
                        aetcd.rpc.AuthenticateRequest(name=self._username, password=self._password),
                        timeout=self._timeout,
                    )
                except grpc.aio.AioRpcError as exc:
                    # Raised as aetcd's own client calls raise it (its error
                    # for the code: ConnectionFailedError, AuthFailedError, ...).
                    aetcd.exceptions._handle_exception(exc)
                    raise
                self.auth_stub = auth
                metadata = (("token", reply.token),)
            self.channel = channel
            self.metadata = metadata
            self.kvstub = aetcd.rpc.KVStub(channel)
            self.clusterstub = aetcd.rpc.ClusterStub(channel)
            self.leasestub = aetcd.rpc.LeaseStub(channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(channel)
            self._watcher = aetcd.watcher.Watcher(
                aetcd.rpc.WatchStub(channel), timeout=self._timeout, metadata=metadata
            )
            self._connected.set()
        except BaseException:
            if self.channel is not channel:
                with contextlib.suppress(Exception):
                    await channel.close()
            raise
        finally:
            self._is_connecting = False
