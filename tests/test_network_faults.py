"""Network faults that are not crashes: traffic dropped, not refused.

A host that vanishes, a partition, a firewall that starts dropping packets:
no connection is reset, nothing is refused, the peers just stop hearing from
each other. The tests put a loopback TcpProxy (tests/agent_harness.py) in
front of a rank's coordinator session, a rank's etcd client or a
coordinator's etcd client, and blackhole it (nothing forwarded, no RST, no
FIN), stall it one way, and heal it (everything held is delivered, as TCP
retransmits it after a partition heals). Real etcd, real coordinator
processes, real agents over real gloo groups; every wait has a deadline.

What they show (docs/faults.md, "Network faults"):

- a rank cut off from both its coordinator and etcd (a host gone silently)
  is found by its lease and the others shrink without it; when the partition
  heals, that process is refused and stops, whether or not it was launched
  with --rejoin; a relaunch rejoins;
- a cut-off process whose rank was relaunched elsewhere does not take the
  rank key back from the relaunch when it heals;
- a rank cut off from the coordinator only serves on, is suspect but never
  evicted for it, and its session resumes when the cut heals;
- a rank whose one etcd connection died silently keeps its lease, on a new
  connection; an agent whose hello named a lease it has just replaced tries
  again rather than stopping;
- a leader cut off from etcd steps down within its lease, before a standby
  can lead, and stands by once healed; a standby cut off from etcd takes over
  once healed; the ranks serve throughout.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator import etcd_keys, keepalive
from coordinator.election import LeaderLease
from protos.ep_recovery.v1 import admin_pb2, worker_pb2, worker_pb2_grpc
from tests.agent_harness import (
    TO_CLIENT,
    TO_SERVER,
    CoordinatorProcess,
    RecordingAdapter,
    TcpProxy,
    ThreadRank,
    assert_alive,
    iterating,
    key_lease,
    stop_together,
    thread_cluster,
    wait_until,
)
from worker_agent.agent import AgentConfig, WorkerAgent

WORLD = 4
# Short timings, so each fault plays out in seconds: rank leases of 1 s (the
# agents' default), 1 s to bind a new lease (the coordinator's sessions are
# pinged every 0.5 s, and one whose ping goes unanswered for 2 s is ended), a
# hang found after 5 s.
REBIND = ("--lease-rebind-s", "1")
HANG_TIMEOUT_S = 5.0
HANG = ("--hang-timeout-s", str(HANG_TIMEOUT_S))


def _state(coord: CoordinatorProcess, rank: int) -> int:
    return next(r.state for r in coord.status().ranks if r.rank == rank)


def _serving(coord: CoordinatorProcess, members: list[int]) -> bool:
    try:
        status = coord.status()
    except grpc.RpcError:
        return False
    return list(status.members) == members and all(
        r.state == admin_pb2.RANK_STATE_SERVING for r in status.ranks if r.rank in members
    )


def _log_time(coord: CoordinatorProcess, message: str) -> datetime:
    """When `message` was first logged by `coord` (its log's clock: this host's)."""
    coord.log.flush()
    for line in Path(coord.log.name).read_text(errors="replace").splitlines():
        if message in line:
            return datetime.strptime(line.split(" ", 1)[0], "%H:%M:%S.%f")
    raise AssertionError(f"{message!r} not in the log:\n{coord.log_tail()}")


# --- gRPC keepalive itself ---------------------------------------------------------------


async def _blackholed_call(options: list[tuple[str, object]], limit_s: float) -> float:
    """Open a streaming call through a proxy with these client channel
    options, blackhole the proxy, and return how long the client took to see
    the call fail (limit_s if it never did)."""
    server = grpc.aio.server(options=keepalive.server_options(1.0))
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    proxy = TcpProxy(f"127.0.0.1:{port}")
    channel = grpc.aio.insecure_channel(proxy.endpoint, options=options)
    try:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        await call.read()  # the session is up
        proxy.blackhole()
        started = time.monotonic()
        try:
            await asyncio.wait_for(call.read(), limit_s)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            return time.monotonic() - started
        except TimeoutError:
            return limit_s
        raise AssertionError("a blackholed call got an answer")
    finally:
        proxy.close()
        await channel.close()
        await server.stop(0)


def test_a_blackholed_session_is_dropped_within_seconds() -> None:
    """The agents' channel options (rank lease TTL 1 s): a session whose
    coordinator went silent fails within the ping interval (1 s) and the
    ping timeout (2 s). gRPC core 1.85 does not enforce `keepalive_timeout_ms`
    by itself: without the ping timeout the same call failed only after a
    minute."""
    took = asyncio.run(_blackholed_call(keepalive.client_options(1), 10.0))
    assert took < 4.5, f"the blackholed session failed only after {took:.1f} s"


def test_the_etcd_channel_options_find_a_dead_connection_within_the_ping_timeout() -> None:
    """etcd_keys.CHANNEL_OPTIONS, with the ping interval shortened (1 s, not
    10) to keep the test short: a blackholed etcd connection fails within the
    interval and the 5 s ping timeout, not after gRPC's default minute."""
    options = {**etcd_keys.CHANNEL_OPTIONS, "grpc.keepalive_time_ms": 1000}
    took = asyncio.run(_blackholed_call(list(options.items()), 12.0))
    assert took < 8.0, f"the blackholed etcd connection failed only after {took:.1f} s"


def test_a_leader_lease_is_lost_when_it_expires_not_a_retry_later(
    etcd: str, cluster_name: str
) -> None:
    """The leader's etcd path refuses connections (fast failures, backing
    off): the lease must be reported lost at its expiry, when etcd may drop
    it and a standby lead, not when the next retry happens to run (up to
    0.8 s later before the fix)."""

    sent: list[float] = []

    class Spied(LeaderLease):
        async def _refresh(self, client: object, lease_id: int, left: float) -> object:
            at = time.monotonic()
            reply = await super()._refresh(client, lease_id, left)  # type: ignore[arg-type]
            sent.append(at)  # answered: the lease runs from here
            return reply

    async def body() -> float:
        proxy = TcpProxy(etcd)
        host, port = etcd_keys.split_endpoint(proxy.endpoint)
        lease = Spied(host, port, cluster_name, ttl=3, identity={"id": "spied"})
        await lease.start()
        try:
            granted = time.monotonic()
            while not sent:  # the first refresh got through
                await asyncio.sleep(0.01)
                assert time.monotonic() - granted < 3, "no refresh got through"
            proxy.close()  # connections reset, new ones refused: fast failures
            await asyncio.wait_for(lease.lost.wait(), 10)
            return time.monotonic() - (sent[-1] + lease.ttl)
        finally:
            proxy.close()
            await lease.stop()

    late = asyncio.run(body())
    assert late < 0.05, f"the lease was reported lost {late:.3f} s after it expired"


# --- a rank cut off ------------------------------------------------------------------------


@pytest.mark.parametrize("launched_with_rejoin", [False, True], ids=["founder", "relaunched"])
def test_a_rank_host_gone_silently_is_shrunk_away_and_refused_when_it_heals(
    tmp_path: Path, etcd: str, cluster_name: str, launched_with_rejoin: bool
) -> None:
    """Rank 1's session and its etcd traffic are blackholed: to the others,
    its host vanished without a reset. Its lease expires and its session
    goes silent: it is failed within about a lease TTL plus lease_rebind_s,
    and the others shrink and serve on. The partition heals: that process
    (which served on by itself meanwhile, then held once its peers had moved
    on) renews its lease, reconnects and is refused, so it stops; the
    cluster does not take it back, also when it had been launched with
    --rejoin (the relaunched case: before the fix it was admitted again as a
    joiner, without a relaunch). A relaunch rejoins."""
    with thread_cluster(
        tmp_path, etcd, cluster_name, WORLD, *REBIND, proxied=(1,), etcd_proxied=(1,)
    ) as (coord, ranks):
        try:
            session, lease = coord.proxies[1], coord.etcd_proxies[1]
            if launched_with_rejoin:
                ranks.pop(1).stop()
                wait_until(lambda: coord.phase() == "degraded", 30, "the shrink without 1")
                ranks[1] = ThreadRank(
                    1, WORLD, session.endpoint, lease.endpoint, cluster_name, rejoin=True
                ).start()
                wait_until(lambda: _serving(coord, [0, 1, 2, 3]), 30, "rank 1's rejoin")
            epoch = coord.status().epoch
            cut_off = ranks[1]

            session.blackhole()
            lease.blackhole()
            started = time.monotonic()
            wait_until(lambda: coord.phase() == "degraded", 10, "the shrink without rank 1")
            found_s = time.monotonic() - started
            # Lease TTL 1 s + lease_rebind_s 1 s, with room for a loaded host.
            assert found_s < 5, f"rank 1 was found gone after {found_s:.1f} s"
            status = coord.status()
            assert list(status.members) == [0, 2, 3] and status.epoch == epoch + 1
            assert [f.rank for f in status.failures if f.confirmed_unix_ms > 0][-1:] == [1]
            others = {r: ranks[r] for r in (0, 2, 3)}
            iterating(others, 30, 30, "30 iterations on the survivors")
            assert cut_off._thread.is_alive() and cut_off.agent._fatal is None  # it waits

            operations = len(coord.status().operations)
            # The partition heals, etcd first: the cut-off process renews its
            # lease, so its key is back and its hello will name the lease
            # that holds it, as a member's reconnect does. Its stale session
            # attempts are reset (as a firewall that lost their state does),
            # so the next one carries that lease.
            lease.heal()
            wait_until(
                lambda: cut_off.agent._lease is not None and cut_off.agent._lease.renewals > 0,
                15,
                "the cut-off rank 1 to renew its lease",
            )
            session.cut()
            session.heal()
            wait_until(lambda: cut_off.agent._fatal is not None, 15, "the old rank 1 to stop")
            assert "was removed from cluster" in cut_off.agent._fatal, cut_off.agent._fatal
            wait_until(lambda: not cut_off._thread.is_alive(), 15, "its engine to stop")
            # No split brain: it never came back, nothing started for it.
            iterating(others, 30, 30, "30 more iterations on the survivors")
            status = coord.status()
            assert list(status.members) == [0, 2, 3] and status.epoch == epoch + 1
            assert len(status.operations) == operations and coord.phase() == "degraded"
            assert_alive(others)

            ranks.pop(1).stop()
            ranks[1] = ThreadRank(1, WORLD, coord.endpoint, etcd, cluster_name, rejoin=True)
            ranks[1].start()
            wait_until(lambda: _serving(coord, [0, 1, 2, 3]), 30, "the relaunched rank 1")
            iterating(ranks, 20, 30, "20 iterations on all four")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- coordinator log ---\n{coord.log_tail()}") from exc


def test_a_cut_off_rank_relaunched_elsewhere_does_not_take_the_rank_back_when_it_heals(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    """Rank 1's host is cut off and the rank relaunched elsewhere (as an
    orchestrator reschedules a pod of an unreachable node): the relaunch is
    admitted. Then the partition heals. The old process finds its lease gone;
    before the fix its keepalive put the rank key back on a new lease of its
    own, taking it from the live process, and revoked it when it stopped:
    the live rank 1 served on without a key, and its next reconnect (here a
    blip of its session) was refused ("no key in etcd"), ending a healthy
    rank. Now the old process leaves the key alone and is refused; the live
    one keeps its key and survives the blip."""
    cluster = thread_cluster(
        tmp_path, etcd, cluster_name, WORLD, *REBIND, proxied=(1,), etcd_proxied=(1,)
    )
    with cluster as (coord, ranks):
        relaunched: TcpProxy | None = None
        old = ranks[1]
        try:
            session, lease = coord.proxies[1], coord.etcd_proxies[1]
            session.blackhole()
            lease.blackhole()
            wait_until(lambda: coord.phase() == "degraded", 10, "the shrink without rank 1")
            relaunched = TcpProxy(coord.endpoint)
            ranks[1] = ThreadRank(1, WORLD, relaunched.endpoint, etcd, cluster_name, rejoin=True)
            ranks[1].start()
            wait_until(lambda: _serving(coord, [0, 1, 2, 3]), 30, "the relaunch's admission")
            live = ranks[1].agent

            lease.heal()
            old_lease = old.agent._lease
            assert old_lease is not None
            wait_until(
                lambda: old_lease.lost.is_set() or old_lease.renewals > 0,
                10,
                "the old process to find its lease gone",
            )
            session.cut()
            session.heal()
            wait_until(lambda: old.agent._fatal is not None, 15, "the old rank 1 to stop")
            old.stop()  # its lease is revoked: the live key must stay
            assert live._lease is not None
            assert _key_lease(etcd, cluster_name, 1) == live._lease.lease_id, "the key was taken"
            assert old_lease.renewals == 0 and "another lease" in old_lease.lost_reason

            accepted = relaunched.accepted
            relaunched.cut()  # a blip of the live rank 1's session
            wait_until(lambda: relaunched.accepted > accepted, 10, "rank 1 to reconnect")
            wait_until(lambda: _serving(coord, [0, 1, 2, 3]), 10, "rank 1 serving again")
            iterating(ranks, 20, 30, "20 iterations on all four")
            assert_alive(ranks)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- coordinator log ---\n{coord.log_tail()}") from exc
        finally:
            stop_together({**ranks, -1: old})
            if relaunched is not None:
                relaunched.close()


def _key_lease(etcd: str, cluster: str, rank: int) -> int:
    return key_lease(etcd, cluster, rank)


@pytest.mark.parametrize("direction", ["both", TO_SERVER, TO_CLIENT])
def test_a_rank_cut_off_from_the_coordinator_only_serves_on_and_is_not_evicted(
    tmp_path: Path, etcd: str, cluster_name: str, direction: str
) -> None:
    """Only rank 1's session is cut (both ways, or one way: its messages or
    the coordinator's stalled): its lease is renewed and its peers reach it.
    Both ends notice the silent session (keepalive), so the coordinator holds
    it suspect, not serving with no progress: past the hang timeout it is
    not declared hung (before, it was, after the hang timeout), nobody
    fails, and it serves throughout. Healed, its session resumes: same
    epoch, same members, no operation ran."""
    cluster = thread_cluster(tmp_path, etcd, cluster_name, WORLD, *REBIND, *HANG, proxied=(1,))
    with cluster as (coord, ranks):
        try:
            proxy = coord.proxies[1]
            before = coord.status()
            accepted = proxy.accepted
            if direction == "both":
                proxy.blackhole()
            else:
                proxy.stall(direction)
            # Past the hang timeout: nobody fails, everyone serves. The
            # coordinator drops the silent session (rank 1 is suspect) and
            # rank 1 tries new sessions, both within about three seconds.
            suspect_after: float | None = None
            started = time.monotonic()
            while time.monotonic() < started + HANG_TIMEOUT_S + 3:
                status = coord.status()
                assert list(status.members) == [0, 1, 2, 3] and not status.failures, (
                    f"members {list(status.members)}, failures "
                    f"{[(f.rank, f.reason) for f in status.failures]}"
                )
                if suspect_after is None and _state(coord, 1) == admin_pb2.RANK_STATE_SUSPECT:
                    suspect_after = time.monotonic() - started
                assert_alive(ranks)
                time.sleep(0.1)
            assert suspect_after is not None and suspect_after < 4, (
                f"the coordinator held rank 1's silent session for {suspect_after} s"
            )
            assert _state(coord, 1) == admin_pb2.RANK_STATE_SUSPECT
            assert proxy.accepted > accepted, "rank 1 never noticed its session was gone"
            iterating(ranks, 30, 30, "30 iterations on every rank, rank 1 cut off")

            proxy.heal()
            wait_until(lambda: _serving(coord, [0, 1, 2, 3]), 10, "rank 1's session back")
            iterating(ranks, 30, 30, "30 iterations after the heal")
            after = coord.status()
            assert (after.epoch, list(after.members)) == (before.epoch, [0, 1, 2, 3])
            assert not after.failures and len(after.operations) == len(before.operations)
            assert_alive(ranks)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- coordinator log ---\n{coord.log_tail()}") from exc


def test_a_rank_whose_etcd_connection_died_silently_keeps_its_lease(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    """Rank 1's one connection to etcd goes silent (a NAT or firewall that
    dropped its state: that flow's packets vanish, a new connection works).
    gRPC would notice only when its keepalive ping goes unanswered, 15 s
    later; the lease (TTL 1 s) would expire and the rank be evicted after
    lease_rebind_s, alive and serving (before the fix, within 5 s). The
    keepalive sends an unanswered refresh again on a fresh connection: the
    lease lives, nothing happens."""
    cluster = thread_cluster(tmp_path, etcd, cluster_name, WORLD, etcd_proxied=(1,))
    with cluster as (coord, ranks):
        try:
            proxy = coord.etcd_proxies[1]
            before = coord.status()
            lease = ranks[1].agent._lease
            assert lease is not None
            proxy.blackhole(existing_only=True)
            until = time.monotonic() + 1 + 3.0 + 2  # past a TTL and lease_rebind_s (3 s)
            while time.monotonic() < until:
                status = coord.status()
                assert list(status.members) == [0, 1, 2, 3] and not status.failures, (
                    f"members {list(status.members)}, failures "
                    f"{[(f.rank, f.reason) for f in status.failures]}"
                )
                assert_alive(ranks)
                time.sleep(0.1)
            assert lease.reconnects > 0 and _serving(coord, [0, 1, 2, 3])
            iterating(ranks, 30, 30, "30 iterations on every rank")
            after = coord.status()
            assert (after.epoch, len(after.operations)) == (before.epoch, len(before.operations))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- coordinator log ---\n{coord.log_tail()}") from exc


@pytest.mark.parametrize("refusal", ["replaced lease", "no key"])
def test_a_hello_naming_a_lease_the_agent_just_replaced_is_retried_not_fatal(
    etcd: str, cluster_name: str, refusal: str
) -> None:
    """After an etcd outage that took its lease, an agent reconnects while
    its keepalive replaces the lease: a hello sent with the old lease id can
    reach the coordinator after the new lease holds the key, and is refused
    (PERMISSION_DENIED: the hello's lease does not hold the key). That is the
    agent's own stale hello, not another process holding its rank: it must
    try again with its new lease, not stop a live rank. A stand-in
    coordinator plays the race deterministically: it holds the first hello
    until the agent's lease was replaced, then refuses it. Or ("no key") it
    refuses it at once, as the coordinator does while the key is gone (the
    lease expired under a starved keepalive, the renewal not done yet): seen
    failing a rank's start on a loaded host."""
    hellos: list[int] = []

    async def revoke(lease_id: int) -> None:
        client = etcd_keys.new_client(*etcd_keys.split_endpoint(etcd))
        try:
            await client.revoke_lease(lease_id)
        finally:
            await client.close()

    class StandIn(worker_pb2_grpc.WorkerServiceServicer):
        agent: WorkerAgent | None = None

        async def Session(
            self, request_iterator: object, context: grpc.aio.ServicerContext
        ) -> None:
            first = await context.read()
            hellos.append(first.hello.lease_id)
            if len(hellos) == 1 and refusal == "no key":
                await revoke(first.hello.lease_id)
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, "rank 0 has no key in etcd"
                )
            if len(hellos) == 1:
                await revoke(first.hello.lease_id)  # as an outage would have
                deadline = time.monotonic() + 10
                while (
                    self.agent is None
                    or self.agent._lease is None
                    or (self.agent._lease.lease_id == first.hello.lease_id)
                ):
                    assert time.monotonic() < deadline, "the agent never renewed its lease"
                    await asyncio.sleep(0.01)
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"lease {first.hello.lease_id:x} does not hold rank 0's key",
                )
            await context.write(
                worker_pb2.CoordinatorMessage(
                    welcome=worker_pb2.Welcome(role=worker_pb2.ROLE_MEMBER, progress_interval_ms=50)
                )
            )
            while await context.read() is not grpc.aio.EOF:
                pass

    servicer = StandIn()
    loop = asyncio.new_event_loop()
    server_box: list[grpc.aio.Server] = []

    async def serve() -> None:
        # Pinged by the agent like the coordinator is: the same options.
        server = grpc.aio.server(options=keepalive.server_options(3.0))
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
        server_box.append(server)
        server_box.append(server.add_insecure_port("127.0.0.1:0"))  # type: ignore[arg-type]
        await server.start()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    agent: WorkerAgent | None = None
    try:
        port = server_box[1]
        agent = WorkerAgent(
            AgentConfig(cluster_name, 0, f"127.0.0.1:{port}", etcd, connect_timeout_s=20),
            RecordingAdapter(0, 1),
        )
        servicer.agent = agent
        agent.start()  # welcomed: the refusal of its stale hello did not end it
        assert agent._fatal is None, agent._fatal
        assert agent._lease is not None and len(hellos) >= 2, hellos
        if refusal == "replaced lease":
            assert len(hellos) == 2 and hellos[1] == agent._lease.lease_id != hellos[0], hellos
    finally:
        if agent is not None:
            agent.stop()
        server = server_box[0]
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


# --- a coordinator cut off from etcd -----------------------------------------------------


def _pair(
    tmp_path: Path, etcd: str, cluster: str, leader_etcd: str, standby_etcd: str
) -> tuple[CoordinatorProcess, CoordinatorProcess]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = ("--group-timeout-s", "5", "--leader-ttl-s", "2")
    first = CoordinatorProcess(tmp_path / "a", cluster, WORLD, leader_etcd, *args)
    try:
        second = CoordinatorProcess(
            tmp_path / "b", cluster, WORLD, standby_etcd, *args, standby=True
        )
    except BaseException:
        first.stop()
        raise
    return first, second


def test_a_leader_cut_off_from_etcd_steps_down_before_the_standby_leads(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    """The leader's etcd traffic is blackholed (not the ranks', not the
    standby's). It steps down within its lease (2 s), before the standby's
    claim; the standby takes over and the ranks follow the leader key,
    serving throughout, nobody failed. Healed, the old leader stands by;
    when the new one stops, it leads again and the ranks follow it back."""
    proxy = TcpProxy(etcd)
    first, second = _pair(tmp_path, etcd, cluster_name, proxy.endpoint, etcd)
    ranks: dict[int, ThreadRank] = {}
    try:
        for rank in range(WORLD):  # no coordinator address: the leader key
            ranks[rank] = ThreadRank(rank, WORLD, "", etcd, cluster_name).start()
        wait_until(lambda: first.phase() == "steady", 30, "the cluster to form")
        epoch = first.status().epoch

        proxy.blackhole()
        started = time.monotonic()
        second.wait_leader(10)
        took_s = time.monotonic() - started
        assert took_s < 2 + 2, f"the standby led only after {took_s:.1f} s"  # TTL + slack
        wait_until(lambda: first.role() == "standby", 10, "the cut-off leader to stand by")
        # No moment with two leaders: the old one gave up no later than the
        # new one's claim (the strict check, without a log's clock, is
        # test_a_leader_lease_is_lost_when_it_expires_not_a_retry_later).
        lost = _log_time(first, "leader lease lost")
        claimed = _log_time(second, "leader lease granted")
        assert lost <= claimed, f"the old leader gave up at {lost}, after the claim at {claimed}"
        wait_until(lambda: _serving(second, [0, 1, 2, 3]), 15, "the ranks to follow")
        iterating(ranks, 30, 30, "30 iterations under the new leader")

        proxy.heal()
        wait_until(
            lambda: "standing by" in Path(first.log.name).read_text().split("stepped down")[-1],
            20,
            "the healed leader to stand by",
        )
        assert first.role() == "standby" and second.role() == "leader"
        status = second.status()
        assert (status.epoch, list(status.members)) == (epoch, [0, 1, 2, 3])
        assert not status.failures

        second.stop()  # SIGTERM: its lease is revoked, the healed one takes over
        first.wait_leader(15)
        wait_until(lambda: _serving(first, [0, 1, 2, 3]), 15, "the ranks to follow it back")
        iterating(ranks, 30, 30, "30 iterations under the first leader again")
        status = first.status()
        assert (status.epoch, list(status.members)) == (epoch, [0, 1, 2, 3])
        assert not status.failures
        assert_alive(ranks)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n--- first ---\n{first.log_tail()}\n--- second ---\n{second.log_tail()}"
        ) from exc
    finally:
        stop_together(ranks)
        proxy.close()
        first.stop()
        second.stop()


def test_a_standby_cut_off_from_etcd_takes_over_once_healed(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    """The standby's etcd traffic is blackholed, then the leader dies
    (SIGKILL). Nobody can lead: the ranks serve on, by themselves. The
    standby must not act on what it cannot see; once healed it takes over,
    the ranks reconnect and nobody failed."""
    proxy = TcpProxy(etcd)
    first, second = _pair(tmp_path, etcd, cluster_name, etcd, proxy.endpoint)
    ranks: dict[int, ThreadRank] = {}
    try:
        for rank in range(WORLD):
            ranks[rank] = ThreadRank(rank, WORLD, "", etcd, cluster_name).start()
        wait_until(lambda: first.phase() == "steady", 30, "the cluster to form")
        epoch = first.status().epoch

        proxy.blackhole()
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        until = time.monotonic() + 5  # past the dead leader's lease (2 s)
        while time.monotonic() < until:
            assert second.role() == "standby"
            assert_alive(ranks)
            time.sleep(0.2)
        iterating(ranks, 30, 30, "30 iterations with no coordinator")

        proxy.heal()
        second.wait_leader(20)
        wait_until(lambda: _serving(second, [0, 1, 2, 3]), 20, "the ranks to reconnect")
        status = second.status()
        assert (status.epoch, list(status.members)) == (epoch, [0, 1, 2, 3])
        assert not status.failures
        iterating(ranks, 30, 30, "30 iterations under the new leader")
        assert_alive(ranks)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- standby ---\n{second.log_tail()}") from exc
    finally:
        stop_together(ranks)
        proxy.close()
        first.stop()
        second.stop()
