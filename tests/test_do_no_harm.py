"""Do no harm: no fault of the control plane stops a rank from serving.

Real etcd, real coordinator processes, real agents and gloo groups. Each test
takes one piece of the control plane away (etcd for several lease TTLs, the
leader frozen with its sockets open, a rank's lease dropped behind its back)
and checks that every rank serves on throughout and that the cluster heals by
itself, without a rank or coordinator being restarted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from coordinator import etcd_keys
from epctl.local_etcd import LocalEtcd
from protos.ep_recovery.v1 import admin_pb2
from tests.agent_harness import (
    CoordinatorProcess,
    ThreadRank,
    assert_alive,
    iterating,
    stop_together,
    wait_until,
)

WORLD = 4


def _serving(coord: CoordinatorProcess) -> bool:
    try:
        status = coord.status()
    except Exception:
        return False
    return len(status.members) == WORLD and all(
        r.state == admin_pb2.RANK_STATE_SERVING for r in status.ranks
    )


def test_an_etcd_outage_past_every_lease_stops_no_rank(tmp_path: Path, cluster_name: str) -> None:
    """etcd SIGKILLed for 8 s (8 rank lease TTLs, 4 leader lease TTLs), then
    started again on its data: every rank serves throughout, the leader steps
    down and leads again in the same process, and the cluster is the same
    epoch with the same members, with no failure recorded."""
    with LocalEtcd(name="no-harm-outage") as etcd:
        coord = CoordinatorProcess(
            tmp_path, cluster_name, WORLD, etcd.endpoint, "--leader-ttl-s", "2",
            "--group-timeout-s", "5",
        )  # fmt: skip
        ranks: dict[int, ThreadRank] = {}
        try:
            # No coordinator address: the agents follow the leader key.
            for rank in range(WORLD):
                ranks[rank] = ThreadRank(rank, WORLD, "", etcd.endpoint, cluster_name).start()
            wait_until(lambda: coord.phase() == "steady", 30, "the cluster to form")
            epoch = coord.status().epoch

            etcd.kill()
            iterating(ranks, 50, 30, "50 iterations on every rank with etcd down")
            wait_until(lambda: coord.role() == "standby", 15, "the leader to step down")
            outage_until = time.monotonic() + 8
            while time.monotonic() < outage_until:
                assert_alive(ranks)
                time.sleep(0.2)
            iterating(ranks, 20, 30, "20 more iterations, etcd still down")
            etcd.start()  # same ports, same data dir

            coord.wait_leader(30)
            wait_until(lambda: _serving(coord), 30, "every rank to serve under the leader again")
            status = coord.status()
            assert (status.epoch, list(status.members)) == (epoch, list(range(WORLD)))
            assert not status.failures, status.failures
            iterating(ranks, 20, 30, "20 more iterations after the outage")
            assert_alive(ranks)
            assert coord.proc.poll() is None, "the coordinator exited"
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- coordinator log ---\n{coord.log_tail()}") from exc
        finally:
            stop_together(ranks)
            coord.stop()


def test_a_frozen_leader_and_a_rank_death_lose_nobody_else(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    """The leader is SIGSTOPped with its sessions open and a standby takes
    over; the ranks follow the leader key to it. Then rank 3 dies: the new
    leader's shrink completes with ranks 0 to 2, and the thawed old leader
    stands by without disturbing anyone."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = ("--group-timeout-s", "5", "--leader-ttl-s", "1")
    first = CoordinatorProcess(tmp_path / "a", cluster_name, WORLD, etcd, *args)
    second = CoordinatorProcess(tmp_path / "b", cluster_name, WORLD, etcd, *args, standby=True)
    ranks: dict[int, ThreadRank] = {}
    frozen = False
    try:
        for rank in range(WORLD):
            ranks[rank] = ThreadRank(rank, WORLD, "", etcd, cluster_name).start()
        wait_until(lambda: first.phase() == "steady", 30, "the cluster to form")
        epoch = first.status().epoch

        os.kill(first.proc.pid, signal.SIGSTOP)
        frozen = True
        second.wait_leader(15)
        wait_until(lambda: _serving(second), 15, "every rank to follow the new leader")
        ranks.pop(3).stop()  # its lease is revoked: the new leader sees it go
        wait_until(
            lambda: second.phase() == "degraded" and list(second.status().members) == [0, 1, 2],
            30,
            "the shrink without rank 3",
        )
        assert [f.rank for f in second.status().failures] == [3]
        assert second.status().epoch == epoch + 1
        iterating(ranks, 20, 30, "20 iterations on the survivors")

        os.kill(first.proc.pid, signal.SIGCONT)
        frozen = False
        wait_until(lambda: first.role() == "standby", 15, "the thawed leader to stand by")
        iterating(ranks, 20, 30, "20 more iterations after the thaw")
        assert_alive(ranks)
        assert second.phase() == "degraded" and [f.rank for f in second.status().failures] == [3]
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- new leader log ---\n{second.log_tail()}") from exc
    finally:
        if frozen:
            os.kill(first.proc.pid, signal.SIGCONT)
        stop_together(ranks)
        first.stop()
        second.stop()


def test_a_rank_whose_lease_etcd_dropped_renews_it_and_stays_a_member(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    """etcd drops rank 1's lease behind its back (as after an outage that
    outlived it): the rank takes a new lease, binds its open session to it,
    and stays a member; no recovery runs."""
    coord = CoordinatorProcess(tmp_path, cluster_name, WORLD, etcd, "--group-timeout-s", "5")
    ranks: dict[int, ThreadRank] = {}
    try:
        for rank in range(WORLD):
            ranks[rank] = ThreadRank(rank, WORLD, coord.endpoint, etcd, cluster_name).start()
        wait_until(lambda: coord.phase() == "steady", 30, "the cluster to form")
        before = coord.status()

        async def revoke() -> int:
            client = etcd_keys.new_client(*etcd_keys.split_endpoint(etcd))
            try:
                got = await client.get(etcd_keys.rank_key(cluster_name, 1))
                assert got is not None
                await client.revoke_lease(int(got.lease))
                return int(got.lease)
            finally:
                await client.close()

        old = asyncio.run(revoke())
        lease = ranks[1].agent
        wait_until(lambda: _renewed(lease, old), 10, "rank 1 to renew its lease")
        # The coordinator saw the delete, then the renewal on the open session.
        wait_until(lambda: _serving(coord), 10, "rank 1 to be serving again")
        iterating(ranks, 20, 30, "20 iterations after the renewal")
        after = coord.status()
        assert (after.epoch, list(after.members)) == (before.epoch, list(before.members))
        assert not after.failures and len(after.operations) == len(before.operations)
        assert_alive(ranks)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- coordinator log ---\n{coord.log_tail()}") from exc
    finally:
        stop_together(ranks)
        coord.stop()


def _renewed(agent: object, old_lease: int) -> bool:
    lease = getattr(agent, "_lease", None)
    return lease is not None and lease.renewals >= 1 and lease.lease_id != old_lease
