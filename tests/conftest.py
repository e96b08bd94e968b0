"""Shared fixtures: one real etcd for the whole session, a cluster name per test.

Tests share the etcd and stay apart by cluster name (every key lives under
/ep-recovery/{cluster}/). A test that restarts or kills etcd starts its own
LocalEtcd instead of disturbing the shared one.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from epctl.local_etcd import LocalEtcd
from epctl.local_etcd import free_port as _free_port


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[LocalEtcd]:
    """The session's running LocalEtcd (1 s leases allowed)."""
    server = LocalEtcd(name="pytest")
    try:
        server.start()
        yield server
    finally:
        # By pid, SIGTERM then SIGKILL; also removes the data dir.
        server.stop()


@pytest.fixture(scope="session")
def etcd(etcd_server: LocalEtcd) -> str:
    """The session etcd's client endpoint, "127.0.0.1:PORT" (what --etcd takes)."""
    return etcd_server.endpoint


@pytest.fixture
def cluster_name(request: pytest.FixtureRequest) -> str:
    """A cluster name no other test uses; valid for CoordinatorConfig (<= 64 chars)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-._")[:40]
    return f"t-{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def free_port() -> int:
    """A loopback port that was free a moment ago (epctl.local_etcd.free_port)."""
    return _free_port()
