"""The etcd layer against a real etcd server: LocalEtcd, RankLease, LeaseWatcher,
ClusterStore. No mocks; every wait is a condition polled against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import pytest

from coordinator import etcd_keys
from coordinator.cluster_store import ClusterStore, StaleWrite
from coordinator.election import LeaderLease
from coordinator.membership import LeaseWatcher, RankKeyEvent
from epctl.local_etcd import LocalEtcd, LocalEtcdError
from worker_agent.lease import RankLease

ROOT = Path(__file__).resolve().parent.parent
TTL = 1
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def client_for(endpoint: str) -> aetcd.Client:
    return etcd_keys.new_client(*etcd_keys.split_endpoint(endpoint))


async def until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `cond` until true; return the seconds it took. Fails at the deadline."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


class Events:
    """A LeaseWatcher drained by a task; events carry their arrival time."""

    def __init__(self, watcher: LeaseWatcher) -> None:
        self.watcher = watcher
        self.queue: asyncio.Queue[tuple[float, RankKeyEvent]] = asyncio.Queue()
        self.task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for event in self.watcher.events():
            self.queue.put_nowait((time.monotonic(), event))

    async def next(
        self, timeout: float, match: Callable[[RankKeyEvent], bool] = lambda e: True
    ) -> tuple[float, RankKeyEvent]:
        """The next matching event (skipping others), with its arrival time."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.task.done():
                if self.task.done() and self.task.exception() is not None:
                    raise AssertionError("watcher died") from self.task.exception()
                raise AssertionError(f"no matching event within {timeout}s")
            try:
                at, event = await asyncio.wait_for(self.queue.get(), min(left, 0.1))
            except TimeoutError:
                continue
            if match(event):
                return at, event


@contextlib.asynccontextmanager
async def watching(endpoint: str, cluster: str) -> AsyncIterator[Events]:
    client = client_for(endpoint)
    watcher = LeaseWatcher(client, cluster)
    events = Events(watcher)
    try:
        yield events
    finally:
        await watcher.close()
        # close() must end events() normally and promptly.
        await asyncio.wait_for(events.task, 2.0)
        await client.close()


async def retrying(op: Callable[[], Coroutine[Any, Any, T]], timeout: float = 5.0) -> T:
    """Retry an etcd call while the client reconnects after a server restart."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await op()
        except aetcd.ConnectionFailedError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def is_(kind: str, rank: int) -> Callable[[RankKeyEvent], bool]:
    return lambda e: e.kind == kind and e.rank == rank


# --- LocalEtcd ----------------------------------------------------------------------


def test_local_etcd_starts_healthy_and_stop_removes_its_dir() -> None:
    server = LocalEtcd()
    try:
        server.start()
        pid, workdir = server.pid, server.data_dir.parent
        assert pid is not None and server.running and server.data_dir.is_dir()
        # Its own session: a terminal's Ctrl-C reaches only us.
        assert os.getsid(pid) == pid
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{server.client_url}/health", timeout=2) as resp:
            assert json.loads(resp.read())["health"] == "true"
        with pytest.raises(LocalEtcdError, match="already running"):
            server.start()
    finally:
        server.stop()
    assert not workdir.exists()
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    server.stop()  # idempotent


@pytest.mark.parametrize(
    ("binary", "message"),
    [
        ("no-such-etcd-binary", "not on PATH; run `make setup`"),
        ("/nonexistent/bin/etcd", "does not exist or is not executable; run `make setup`"),
        ("/bin/false", "exited with code 1 during startup"),
    ],
)
def test_local_etcd_bad_binary_is_a_clear_error(binary: str, message: str) -> None:
    server = LocalEtcd(binary=binary, startup_timeout_s=5)
    with pytest.raises(LocalEtcdError, match=message.replace("`", ".")):
        server.start()
    assert not server.running
    with pytest.raises(LocalEtcdError, match="not been started"):
        _ = server.endpoint


# --- RankLease ------------------------------------------------------------------------


def test_rank_lease_keeps_its_key_across_three_ttls(etcd: str, cluster_name: str) -> None:
    async def body() -> None:
        host, port = etcd_keys.split_endpoint(etcd)
        lease = RankLease(host, port, cluster_name, 4, ttl=TTL, value={"incarnation": "a"})
        await lease.start()
        client = client_for(etcd)
        try:
            assert lease.ttl == TTL
            got = await client.get(etcd_keys.rank_key(cluster_name, 4))
            value = json.loads(got.value)
            assert value["rank"] == 4 and value["lease_id"] == lease.lease_id
            assert value["incarnation"] == "a" and value["pid"] == os.getpid() and value["host"]
            assert got.lease == lease.lease_id
            deadline = time.monotonic() + 3 * TTL + 0.2
            while time.monotonic() < deadline:
                assert await client.get(etcd_keys.rank_key(cluster_name, 4)) is not None
                assert not lease.lost.is_set()
                await asyncio.sleep(0.1)
        finally:
            await lease.stop()
            await client.close()

    run(body())


HOLDER = r"""
import asyncio, sys
from worker_agent.lease import RankLease

async def main() -> None:
    host, port, cluster, rank = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    lease = RankLease(host, port, cluster, rank, ttl=1, value={"incarnation": "holder"})
    await lease.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture
def holder_process() -> Iterator[Callable[[str, str, int], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(endpoint: str, cluster: str, rank: int) -> subprocess.Popen[bytes]:
        host, port = etcd_keys.split_endpoint(endpoint)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        argv = [sys.executable, "-c", HOLDER, host, str(port), cluster, str(rank)]
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_sigkilled_lease_holder_is_deleted_within_ttl(
    etcd: str,
    cluster_name: str,
    holder_process: Callable[[str, str, int], subprocess.Popen[bytes]],
    record_property: Callable[[str, object], None],
) -> None:
    async def body() -> float:
        async with watching(etcd, cluster_name) as events:
            proc = holder_process(etcd, cluster_name, 3)
            _, put = await events.next(15, is_("put", 3))
            assert put.value is not None and put.value["pid"] == proc.pid
            killed_at = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            at, gone = await events.next(TTL + 3, is_("delete", 3))
            # The DELETE names the incarnation that left (from prev_kv).
            assert gone.value is not None and gone.value["lease_id"] == put.value["lease_id"]
            return at - killed_at

    elapsed = run(body())
    record_property("kill_to_delete_s", round(elapsed, 3))
    print(f"SIGKILL -> DELETE: {elapsed:.3f}s (TTL {TTL}s)")
    assert elapsed < TTL + 1.5


def test_clean_stop_revokes_and_the_delete_is_prompt(
    etcd: str, cluster_name: str, record_property: Callable[[str, object], None]
) -> None:
    async def body() -> float:
        host, port = etcd_keys.split_endpoint(etcd)
        async with watching(etcd, cluster_name) as events:
            lease = RankLease(host, port, cluster_name, 0, ttl=TTL)
            await lease.start()
            await events.next(5, is_("put", 0))
            stopped_at = time.monotonic()
            await lease.stop()
            at, _ = await events.next(2, is_("delete", 0))
            assert not lease.lost.is_set()  # a clean stop is not a loss
            return at - stopped_at

    elapsed = run(body())
    record_property("stop_to_delete_s", round(elapsed, 3))
    print(f"stop() -> DELETE: {elapsed:.3f}s")
    assert elapsed < 0.5


def test_rank_lease_revoked_behind_its_back_is_renewed_once(etcd: str, cluster_name: str) -> None:
    """A rank whose lease etcd dropped is alive: it takes a new lease, puts its
    key back on it and says so (on_renewed), and is never reported lost."""

    async def body() -> float:
        host, port = etcd_keys.split_endpoint(etcd)
        renewed: list[int] = []
        lost: list[float] = []
        lease = RankLease(
            host,
            port,
            cluster_name,
            1,
            ttl=TTL,
            value={"incarnation": "i1"},
            on_lost=lambda: lost.append(time.monotonic()),
            on_renewed=renewed.append,
        )
        await lease.start()
        client = client_for(etcd)
        try:
            old = lease.lease_id
            revoked_at = time.monotonic()
            await client.revoke_lease(old)
            # The next refresh (every ttl/3) returns TTL 0; a new lease follows.
            took = await until(lambda: bool(renewed), TTL + 1, "on_renewed")
            assert renewed == [lease.lease_id] and lease.lease_id != old
            got = await client.get(etcd_keys.rank_key(cluster_name, 1))
            assert got is not None and int(got.lease) == lease.lease_id
            value = etcd_keys.decode_rank_value(bytes(got.value)) or {}
            assert (value["lease_id"], value["incarnation"]) == (lease.lease_id, "i1")
            # And it is kept alive like the first one.
            await asyncio.sleep(TTL * 2)
            assert await client.get(etcd_keys.rank_key(cluster_name, 1)) is not None
            assert renewed == [lease.lease_id] and not lost and not lease.lost.is_set()
            assert time.monotonic() - revoked_at >= took
            return took
        finally:
            await lease.stop()
            await client.close()

    took = run(body())
    print(f"revoked behind its back -> renewed: {took:.3f}s")


def test_a_renewal_never_takes_the_key_of_a_relaunch(etcd: str, cluster_name: str) -> None:
    """Rank 1's old process lost its lease (cut off from etcd) and was
    relaunched: the new process holds the rank key on its own lease. When
    the old one's keepalive finds its lease gone, it must not put the key
    back on a new lease: that took the rank from the live process, and once
    the old one stopped (revoking its lease) the live rank had no key, so its
    next reconnect was refused. The old lease is reported lost instead (the
    coordinator refuses that process anyway); the live one keeps the key."""

    async def body() -> None:
        host, port = etcd_keys.split_endpoint(etcd)
        lost: list[float] = []
        old = RankLease(
            host,
            port,
            cluster_name,
            1,
            ttl=TTL,
            value={"incarnation": "old"},
            on_lost=lambda: lost.append(time.monotonic()),
        )
        await old.start()
        new = RankLease(host, port, cluster_name, 1, ttl=TTL, value={"incarnation": "new"})
        client = client_for(etcd)
        try:
            await new.start()  # the relaunch: its key replaces the old one's
            await client.revoke_lease(old.lease_id)  # as expiry would
            await until(lambda: old.lost.is_set() or old.renewals > 0, TTL + 2, "the old lease")
            await asyncio.sleep(TTL / 2)
            got = await client.get(etcd_keys.rank_key(cluster_name, 1))
            assert got is not None
            value = etcd_keys.decode_rank_value(bytes(got.value)) or {}
            assert (int(got.lease), value["incarnation"]) == (new.lease_id, "new")
            assert old.lost.is_set() and old.renewals == 0 and len(lost) == 1
            assert "held by another lease" in old.lost_reason
            await old.stop()  # revokes: the live key stays
            got = await client.get(etcd_keys.rank_key(cluster_name, 1))
            assert got is not None and int(got.lease) == new.lease_id
        finally:
            await old.stop()
            await new.stop()
            await client.close()

    run(body())


def test_leader_lease_revoked_behind_its_back_is_reported_lost_once(
    etcd: str, cluster_name: str
) -> None:
    """The leader key is fenced: a lost leader lease is never replaced."""

    async def body() -> None:
        host, port = etcd_keys.split_endpoint(etcd)
        calls: list[float] = []
        lease = LeaderLease(
            host,
            port,
            cluster_name,
            ttl=TTL,
            identity={"id": "x"},
            on_lost=lambda: calls.append(time.monotonic()),
        )
        await lease.start()
        client = client_for(etcd)
        try:
            await client.revoke_lease(lease.lease_id)
            await until(lambda: bool(calls), TTL, "on_lost")
            assert lease.lost.is_set() and "TTL 0" in lease.lost_reason
            await asyncio.sleep(TTL)
            assert await client.get(etcd_keys.leader_key(cluster_name)) is None
        finally:
            await lease.stop()
            await client.close()
            assert len(calls) == 1

    run(body())


# --- LeaseWatcher ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_etcd() -> Iterator[LocalEtcd]:
    """An etcd for tests that restart or kill it."""
    server = LocalEtcd(name="private")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_watcher_survives_an_etcd_restart(private_etcd: LocalEtcd, cluster_name: str) -> None:
    endpoint = private_etcd.endpoint

    async def body() -> None:
        writer = client_for(endpoint)
        watcher = LeaseWatcher(client_for(endpoint), cluster_name)
        gen = watcher.events()
        key = lambda rank: etcd_keys.rank_key(cluster_name, rank)  # noqa: E731
        try:
            await writer.put(key(1), b'{"rank": 1}')
            first = await asyncio.wait_for(anext(gen), 5)
            assert first == RankKeyEvent("put", 1, {"rank": 1}, first.revision)
            await writer.put(key(9), b'{"rank": 9}')
            live = await asyncio.wait_for(anext(gen), 5)
            assert (live.kind, live.rank) == ("put", 9)  # so the watch is open now
            # The generator is pull-driven: it stays suspended (its watch
            # stream broken) until we ask again, so these changes happen while
            # it is disconnected and only a re-watch from revision + 1 sees them.
            await asyncio.to_thread(private_etcd.restart)
            await retrying(lambda: writer.put(key(2), b'{"rank": 2}'))
            await retrying(lambda: writer.delete(key(1)))
            got = [await asyncio.wait_for(anext(gen), 10) for _ in range(2)]
            assert [(e.kind, e.rank, e.value) for e in got] == [
                ("put", 2, {"rank": 2}),
                ("delete", 1, {"rank": 1}),
            ]
            assert got[0].revision > live.revision
            assert watcher.reconnects >= 1
            assert watcher.ranks == {2: {"rank": 2}, 9: {"rank": 9}}
        finally:
            await watcher.close()
            await gen.aclose()
            await watcher.client.close()
            await writer.close()

    run(body())


def test_rank_lease_outlives_an_etcd_outage_of_several_ttls(
    private_etcd: LocalEtcd, cluster_name: str
) -> None:
    """etcd down for 3 TTLs: the rank's keepalive never gives up, and once etcd
    is back (same data) its key is alive again, on the old lease (etcd extends
    leases when it elects a leader) or a renewed one."""
    host, port = private_etcd.host_port

    async def body() -> None:
        lease = RankLease(host, port, cluster_name, 6, ttl=TTL)
        await lease.start()
        client = client_for(private_etcd.endpoint)
        try:
            await asyncio.to_thread(private_etcd.kill)
            await until(lambda: bool(lease.refresh_problem), TTL + 1.0, "a failed refresh")
            await asyncio.sleep(3 * TTL)
            assert not lease.lost.is_set()
            await asyncio.to_thread(private_etcd.start)  # same ports, same data

            async def key_on_our_lease() -> bool:
                with contextlib.suppress(Exception):
                    got = await client.get(etcd_keys.rank_key(cluster_name, 6))
                    return got is not None and int(got.lease) == lease.lease_id
                return False

            deadline = time.monotonic() + 10
            while not (await key_on_our_lease() and not lease.refresh_problem):
                assert time.monotonic() < deadline, "the key did not come back"
                await asyncio.sleep(0.05)
            assert not lease.lost.is_set()
        finally:
            await lease.stop()
            await client.close()

    run(body())


def test_watcher_resyncs_after_compaction(etcd: str, cluster_name: str) -> None:
    async def body() -> None:
        writer = client_for(etcd)
        watcher = LeaseWatcher(client_for(etcd), cluster_name)
        gen = watcher.events()
        key = lambda rank: etcd_keys.rank_key(cluster_name, rank)  # noqa: E731
        try:
            await writer.put(key(1), b'{"rank": 1}')
            await writer.put(key(2), b'{"rank": 2, "incarnation": "a"}')
            await writer.put(etcd_keys.ranks_prefix(cluster_name) + b"junk", b"x")  # foreign
            # The generator is pull-driven: suspended on the last snapshot event,
            # it has not started its watch yet, so what follows it misses.
            snap = [await anext(gen), await anext(gen)]
            assert [(e.kind, e.rank) for e in snap] == [("put", 1), ("put", 2)]
            await writer.delete(key(1))
            await writer.delete(key(2))
            await writer.put(key(2), b'{"rank": 2, "incarnation": "b"}')
            put3 = await writer.put(key(3), b'{"rank": 3}')
            await writer.compact(put3.header.revision)
            got = [await asyncio.wait_for(anext(gen), 5) for _ in range(4)]
            assert [(e.kind, e.rank) for e in got] == [
                ("delete", 1),
                ("delete", 2),
                ("put", 2),
                ("put", 3),
            ]
            assert got[1].value == {"rank": 2, "incarnation": "a"}
            assert got[2].value == {"rank": 2, "incarnation": "b"}
            # And the live watch works from the new snapshot on.
            await writer.delete(key(3))
            gone = await asyncio.wait_for(anext(gen), 5)
            assert (gone.kind, gone.rank, gone.value) == ("delete", 3, {"rank": 3})
        finally:
            await watcher.close()
            await gen.aclose()
            await watcher.client.close()
            await writer.close()

    run(body())


# --- ClusterStore and keys -----------------------------------------------------------------


def test_cluster_store_round_trip_and_stale_writes(etcd: str, cluster_name: str) -> None:
    async def body() -> None:
        client = client_for(etcd)
        store = ClusterStore(client, cluster_name)
        try:
            assert await store.load() == (None, 0)
            rev1 = await store.save(b"one", expected_revision=0)
            assert await store.load() == (b"one", rev1)
            with pytest.raises(StaleWrite) as exists:
                await store.save(b"again", expected_revision=0)
            assert exists.value.revision_mismatch and exists.value.current_revision == rev1
            rev2 = await store.save(b"two", expected_revision=rev1)
            assert rev2 > rev1
            with pytest.raises(StaleWrite) as stale:
                await store.save(b"late", expected_revision=rev1)
            assert stale.value.current_revision == rev2
            # A failing fence (the future leader-key compare) refuses the write
            # even when the record's revision matches.
            fence = client.transactions.version(etcd_keys.leader_key(cluster_name)) > 0
            with pytest.raises(StaleWrite) as fenced:
                await store.save(b"deposed", expected_revision=rev2, extra_compares=[fence])
            assert not fenced.value.revision_mismatch
            assert await store.load() == (b"two", rev2)
            rev3 = await store.save(b"unconditional")
            assert await store.load() == (b"unconditional", rev3)
        finally:
            await client.close()

    run(body())


def test_key_layout() -> None:
    assert etcd_keys.rank_key("c1", 7) == b"/ep-recovery/c1/ranks/00007"
    assert etcd_keys.state_key("c1") == b"/ep-recovery/c1/state"
    assert etcd_keys.leader_key("c1") == b"/ep-recovery/c1/leader"
    assert etcd_keys.parse_rank_key("c1", etcd_keys.rank_key("c1", 12345)) == 12345
    for foreign in (
        b"/ep-recovery/c1/state",
        b"/ep-recovery/c1/ranks/7",
        b"/ep-recovery/c1/ranks/0000x",
        b"/ep-recovery/c10/ranks/00007",
        etcd_keys.rank_key("c2", 7),
    ):
        assert etcd_keys.parse_rank_key("c1", foreign) is None
    with pytest.raises(ValueError):
        etcd_keys.rank_key("a/b", 0)
    with pytest.raises(ValueError):
        etcd_keys.rank_key("c1", 100_000)
    assert etcd_keys.split_endpoint("127.0.0.1:2379") == ("127.0.0.1", 2379)
    assert etcd_keys.split_endpoint("[::1]:2379") == ("::1", 2379)
