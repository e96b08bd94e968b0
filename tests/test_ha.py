"""An active and a standby coordinator: leader election on etcd, fenced record
writes, step-down, and agents that follow the leader key. Real etcd, real
coordinator processes, real agents and gloo groups."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator import etcd_keys
from coordinator.cluster_store import ClusterStore, StaleWrite
from coordinator.election import LeaderLease, campaign, read_leader
from coordinator.history_store import HistoryStore
from epctl.local_etcd import LocalEtcd
from protos.ep_recovery.v1 import admin_pb2
from tests.agent_harness import CoordinatorProcess, ThreadRank, stop_together, wait_until

WORLD = 4
TTL = ("--leader-ttl-s", "1")


async def _wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


def test_one_leader_a_standby_and_a_deposed_leaders_write_refused(
    etcd: str, cluster_name: str
) -> None:
    async def scenario() -> None:
        host, port = etcd_keys.split_endpoint(etcd)

        def lease(name: str) -> LeaderLease:
            return LeaderLease(host, port, cluster_name, ttl=1, identity={"id": name})

        client = etcd_keys.new_client(host, port)
        watcher = etcd_keys.new_client(host, port)
        try:
            first = await campaign(lambda: lease("a"), client)
            seen: list[dict[str, Any]] = []
            second_leads = asyncio.create_task(
                campaign(lambda: lease("b"), watcher, on_standby=seen.append)
            )
            await _wait_for(lambda: seen, 10, "the second to stand by")
            assert seen[0]["id"] == "a" and not second_leads.done()
            assert (await read_leader(client, cluster_name) or {})["id"] == "a"

            store = ClusterStore(client, cluster_name)
            await store.save(b"written by a", extra_compares=first.fence())
            fence_of_a = first.fence()
            # A revoked lease (a clean stop) hands over at once, not a TTL later.
            await first.stop()
            second = await asyncio.wait_for(second_leads, 5)
            assert (await read_leader(client, cluster_name) or {})["id"] == "b"
            assert second.fence_revision > first.fence_revision

            # The deposed leader's late write fails as a whole.
            with pytest.raises(StaleWrite) as refused:
                await store.save(b"late write by a", extra_compares=fence_of_a)
            assert not refused.value.revision_mismatch  # the fence, not the record
            assert (await store.load())[0] == b"written by a"
            await store.save(b"written by b", extra_compares=second.fence())

            # etcd drops the leader's lease (as after a partition): the next
            # refresh says TTL 0 and the leader learns it lost.
            await client.revoke_lease(second.lease_id)
            await asyncio.wait_for(second.lost.wait(), 5)
            assert "TTL 0" in second.lost_reason
            assert await read_leader(client, cluster_name) is None
            await second.stop()
        finally:
            await client.close()
            await watcher.close()

    asyncio.run(scenario())


def _record(etcd: str, cluster: str) -> tuple[dict[str, Any], int]:
    async def read() -> tuple[dict[str, Any], int]:
        client = etcd_keys.new_client(*etcd_keys.split_endpoint(etcd))
        try:
            raw, revision = await ClusterStore(client, cluster).load()
            assert raw is not None
            return json.loads(raw), revision
        finally:
            await client.close()

    return asyncio.run(read())


def test_the_standby_takes_over_and_agents_follow_the_leader_key(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = ("--group-timeout-s", "5", *TTL)
    first = CoordinatorProcess(tmp_path / "a", cluster_name, WORLD, etcd, *args)
    second = CoordinatorProcess(tmp_path / "b", cluster_name, WORLD, etcd, *args, standby=True)
    ranks: dict[int, ThreadRank] = {}
    try:
        # No coordinator address: each agent reads the leader key.
        for rank in range(WORLD):
            ranks[rank] = ThreadRank(rank, WORLD, "", etcd, cluster_name).start()
        wait_until(lambda: first.phase() == "steady", 30, "the cluster to form")
        epoch = first.status().epoch

        first.proc.kill()  # no revoke: the standby waits out the 1 s lease
        first.proc.wait()
        second.wait_leader(15)
        wait_until(
            lambda: all(r.state == admin_pb2.RANK_STATE_SERVING for r in second.status().ranks),
            30,
            "every rank to reconnect to the new leader",
        )
        assert (second.status().epoch, list(second.status().members)) == (
            epoch,
            list(range(WORLD)),
        )
        start = {rank: r.adapter.iteration for rank, r in ranks.items()}
        wait_until(
            lambda: all(r.adapter.iteration >= start[k] + 20 for k, r in ranks.items()),
            30,
            "20 more iterations on every rank",
        )
        # The new leader runs a recovery end to end; the relaunched rank finds
        # it through etcd too.
        ranks.pop(2).stop()
        wait_until(lambda: second.phase() == "degraded", 30, "the shrink without rank 2")
        ranks[2] = ThreadRank(2, WORLD, "", etcd, cluster_name, rejoin=True).start()
        wait_until(
            lambda: second.phase() == "steady" and len(second.status().members) == WORLD,
            30,
            "rank 2 to be admitted by the new leader",
        )
        assert second.status().epoch == epoch + 2
        assert [f.rank for f in second.status().failures] == [2]  # the stop, nothing else
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- new leader log ---\n{second.log_tail()}") from exc
    finally:
        stop_together(ranks)
        first.stop()
        second.stop()


def test_a_leader_cut_off_past_its_lease_steps_down_without_writing(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = CoordinatorProcess(tmp_path / "a", cluster_name, 2, etcd, *TTL)
    second = CoordinatorProcess(tmp_path / "b", cluster_name, 2, etcd, *TTL, standby=True)
    resumed = False
    try:
        # Frozen (a long GC pause, a stalled VM): it cannot refresh its lease.
        os.kill(first.proc.pid, signal.SIGSTOP)
        second.wait_leader(15)
        record, revision = _record(etcd, cluster_name)
        assert record["auto_rejoin"] is True
        # Thawed, it still believes it leads until its keepalive runs; an
        # operator's mutating call reaches it meanwhile.
        os.kill(first.proc.pid, signal.SIGCONT)
        resumed = True
        with contextlib.suppress(grpc.RpcError):
            reply = first.admin.SetAutoRejoin(
                admin_pb2.SetAutoRejoinRequest(request_id="late", enabled=False), timeout=10
            )
            pytest.fail(f"a deposed leader answered a mutating call: {reply}")
        # It steps down in its own process and stands by: nothing to restart.
        wait_until(lambda: first.role() == "standby", 15, "the thawed leader to stand by")
        assert first.proc.poll() is None
        first.log.flush()
        assert "stepped down; standing by" in Path(first.log.name).read_text()
        # Nothing it did reached etcd, and the new leader still leads.
        assert _record(etcd, cluster_name) == (record, revision)
        assert second.status().leader and second.role() == "leader"
    finally:
        if not resumed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(first.proc.pid, signal.SIGCONT)
        first.stop()
        second.stop()


def test_a_leader_that_loses_etcd_steps_down_within_its_lease_and_leads_again(
    tmp_path: Path, cluster_name: str
) -> None:
    # An etcd of its own: this test freezes it. While etcd does not answer,
    # neither the lease refresh nor a record write gets through, and after one
    # TTL a standby may lead: the leader must stop acting by then. Once etcd
    # answers again it leads again, in the same process, with nobody's help.
    with LocalEtcd(name="ha-cut") as own:
        leader = CoordinatorProcess(tmp_path, cluster_name, 2, own.endpoint, "--leader-ttl-s", "2")
        assert own.pid is not None
        os.kill(own.pid, signal.SIGSTOP)
        try:
            wait_until(
                lambda: leader.role() == "standby" or leader.proc.poll() is not None,
                20,
                "the leader to step down",
            )
        finally:
            os.kill(own.pid, signal.SIGCONT)
        try:
            assert leader.proc.poll() is None, leader.log_tail()
            log = Path(leader.log.name).read_text()
            assert "stepping down" in log and "no successful refresh" in log
            leader.wait_leader(30)
            assert leader.proc.poll() is None
            assert leader.phase() == "forming"
        finally:
            leader.stop()


def _stored_spans(etcd: str, cluster: str, op_id: str) -> tuple[int, int]:
    """(rank spans, closed phase spans) of operation `op_id` as etcd holds them."""

    async def read() -> tuple[int, int]:
        client = etcd_keys.new_client(*etcd_keys.split_endpoint(etcd))
        try:
            store = HistoryStore(client, cluster)
            record = (await store.load()).history.operations.get(op_id)
            if record is None:
                return 0, 0
            await store.read_detail(record)
            return len(record.ranks), sum(1 for p in record.phases if p.end_unix_ms)
        finally:
            await client.close()

    return asyncio.run(read())


def _same_spans(got: admin_pb2.OperationDetail, want: admin_pb2.OperationDetail) -> bool:
    """The same phase spans, and the same rank spans with their times to
    the microsecond (etcd holds them so)."""
    phases = [(p.phase, p.epoch, p.start_unix_ms, p.end_unix_ms) for p in got.phases]
    if phases != [(p.phase, p.epoch, p.start_unix_ms, p.end_unix_ms) for p in want.phases]:
        return False

    def ranks(d: admin_pb2.OperationDetail) -> list[Any]:
        return sorted((r.rank, r.step, r.outcome, r.start_unix_ms, r.end_unix_ms) for r in d.ranks)

    a, b = ranks(got), ranks(want)
    return len(a) == len(b) and all(
        x[:3] == y[:3] and abs(x[3] - y[3]) < 0.002 and abs(x[4] - y[4]) < 0.002
        for x, y in zip(a, b, strict=True)
    )


def test_the_new_leader_answers_for_its_predecessors_operations(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    """A leader runs a recovery and is SIGKILLed: the standby that takes over
    lists its operations, with their phases and each rank's spans, and its
    event stream numbers on above the last number the old leader sent."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = ("--group-timeout-s", "5", *TTL)
    first = CoordinatorProcess(tmp_path / "a", cluster_name, WORLD, etcd, *args)
    second = CoordinatorProcess(tmp_path / "b", cluster_name, WORLD, etcd, *args, standby=True)
    ranks: dict[int, ThreadRank] = {}
    received: list[admin_pb2.ClusterEvent] = []
    stream = first.admin.WatchEvents(admin_pb2.WatchEventsRequest())

    def collect() -> None:
        with contextlib.suppress(grpc.RpcError):  # the leader dies
            for event in stream:
                received.append(event)

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        for rank in range(WORLD):
            ranks[rank] = ThreadRank(rank, WORLD, "", etcd, cluster_name).start()
        wait_until(lambda: first.phase() == "steady", 30, "the cluster to form")
        ranks.pop(2).stop()
        wait_until(lambda: first.phase() == "degraded", 30, "the shrink without rank 2")
        ranks[2] = ThreadRank(2, WORLD, "", etcd, cluster_name, rejoin=True).start()
        wait_until(
            lambda: first.phase() == "steady" and len(first.status().members) == WORLD,
            30,
            "rank 2 to be admitted again",
        )
        listed = first.admin.ListOperations(admin_pb2.ListOperationsRequest(), timeout=5)
        before = list(listed.operations)
        assert [(o.kind, o.outcome) for o in before] == [
            ("grow", "completed"),
            ("shrink", "completed"),
            ("form", "completed"),
        ]
        details = {
            o.op_id: first.admin.GetOperation(
                admin_pb2.GetOperationRequest(op_id=o.op_id), timeout=5
            )
            for o in before
        }
        grow = details[before[0].op_id]
        assert {(r.rank, r.step) for r in grow.ranks} >= {(2, "wait_ready"), (0, "hold")}
        # The old leader's writer has stored the grow's spans (it writes
        # within a tenth of a second; SIGKILL may cut its last one short).
        wait_until(
            lambda: (
                _stored_spans(etcd, cluster_name, grow.summary.op_id)
                == (len(grow.ranks), len(grow.phases))
            ),
            10,
            "the grow's spans in etcd",
        )
        wait_until(
            lambda: any(e.WhichOneof("body") == "operation_ended" for e in received[1:]),
            10,
            "the stream to carry the operations",
        )
        last_sent = max(e.seq for e in received)

        first.proc.kill()
        first.proc.wait()
        reader.join(timeout=10)
        second.wait_leader(15)

        # The predecessor's operations, as it told them.
        listed = second.admin.ListOperations(admin_pb2.ListOperationsRequest(), timeout=5)
        after = list(listed.operations)
        assert [o.op_id for o in after[: len(before)]] == [o.op_id for o in before]
        for old, new in zip(before, after, strict=False):
            assert new == old, (old, new)
        for op_id, detail in details.items():
            got = second.admin.GetOperation(admin_pb2.GetOperationRequest(op_id=op_id), timeout=5)
            assert got.summary == detail.summary
            assert _same_spans(got, detail), (op_id, got, detail)
        assert second.status().operations  # GetStatus's too

        # The event stream goes on above the old leader's numbers.
        stream = second.admin.WatchEvents(admin_pb2.WatchEventsRequest(), timeout=10)
        snapshot = next(stream)
        stream.cancel()
        assert snapshot.WhichOneof("body") == "snapshot"
        assert snapshot.seq > last_sent, (snapshot.seq, last_sent)
        assert {o.op_id for o in snapshot.snapshot.operations} >= set(details)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- new leader log ---\n{second.log_tail()}") from exc
    finally:
        stream.cancel()
        stop_together(ranks)
        first.stop()
        second.stop()
