"""The operation history in etcd (coordinator.history_store): its encoding,
its bounds after more operations than it keeps, what a new leader loads, and
the fence that refuses a deposed leader's writes. Real etcd; the history is
fed as the runtime feeds it (summaries with the record write, the rest by the
writer)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

import aetcd
import pytest

from coordinator import etcd_keys
from coordinator import history_store as hs
from coordinator import state_machine as sm
from coordinator.cluster_store import ClusterStore, StaleWrite
from coordinator.election import LeaderLease
from coordinator.history import (
    OPERATIONS_KEPT,
    RANK_SPANS_PER_OPERATION,
    History,
    OperationRecord,
    PhaseSpanRecord,
    RankSpanRecord,
)

T = TypeVar("T")
T0 = 1_700_000_000_000.0  # unix ms of the first operation


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def unix_ms(at: float) -> float:
    """The actions' times here are unix ms already."""
    return at


class Leader:
    """What the runtime holds of the history while it leads: the in-memory
    history, the cluster record's store, the history's store and writer, all
    fenced by one leader key."""

    def __init__(self, client: aetcd.Client, cluster: str, lease: LeaderLease, history: History):
        self.lease = lease
        self.history = history
        self.records = ClusterStore(client, cluster)
        self.store = hs.HistoryStore(client, cluster)
        self.seq = hs.EventSeq()
        self.deposed: list[str] = []
        self.writer = hs.HistoryWriter(
            self.store, history, self.seq, lease.fence, self.deposed.append
        )

    async def apply(self, actions: list[sm.Action]) -> None:
        """As Coordinator._apply: the summaries with the record write, then
        the actions carried out into the history."""
        preview = self.history.preview(actions, unix_ms)
        await self.records.save(
            b"{}",
            extra_compares=self.lease.fence(),
            extra_success=self.store.summary_ops(preview.operations, preview.oldest_kept),
        )
        for action in actions:
            match action:
                case sm.OperationStarted():
                    self.history.operation_started(action, action.at)
                case sm.OperationEnded():
                    self.history.operation_ended(action, action.at)
                case sm.PhaseEntered():
                    self.history.phase_entered(action, action.at)
                case sm.RankDone():
                    self.history.rank_done(action, action.started_at, action.at)

    async def operation(self, n: int, ranks: int = 4, end: bool = True) -> str:
        """Operation number n: a grow of rank 0 into 1..ranks-1, each rank's
        four steps, then steady."""
        op_id = f"c-{n:06d}-grow"
        at = T0 + 10_000.0 * n
        survivors = tuple(range(1, ranks))
        started = sm.OperationStarted(op_id, sm.OpKind.GROW, n, n + 1, survivors, (0,), (), at)
        await self.apply([started, sm.PhaseEntered(sm.Phase.PAUSING, n, op_id, at)])
        steps = (sm.Step.HOLD, sm.Step.REBUILD, sm.Step.RESYNC, sm.Step.RESUME)
        for i, step in enumerate(steps):
            begin = at + 100.0 * i
            for rank in range(ranks):
                self.history.rank_done(
                    sm.RankDone(op_id, rank, step, begin, begin + 1.5 + rank / 1000.0, "done"),
                    begin,
                    begin + 1.5 + rank / 1000.0,
                )
        if end:
            ended = sm.OperationEnded(
                op_id, sm.OpKind.GROW, "completed", n + 1, (0,), (), 12.5, at=at + 500.0
            )
            await self.apply([ended, sm.PhaseEntered(sm.Phase.STEADY, n + 1, "", at + 500.0)])
        return op_id


async def keys(client: aetcd.Client, prefix: bytes) -> dict[bytes, bytes]:
    return {bytes(kv.key): bytes(kv.value) for kv in await client.get_prefix(prefix)}


def lease(etcd: str, cluster: str, name: str) -> LeaderLease:
    return LeaderLease(*etcd_keys.split_endpoint(etcd), cluster, ttl=5, identity={"id": name})


# --- encoding ---------------------------------------------------------------------


def test_summaries_and_spans_round_trip_compactly() -> None:
    assert hs.pack_ranks([5, 0, 1, 2, 3, 7, 8]) == "0-3,5,7-8"
    assert hs.unpack_ranks("0-3,5,7-8") == (0, 1, 2, 3, 5, 7, 8)
    assert hs.pack_ranks([]) == "" and hs.unpack_ranks("") == ()
    assert hs.pack_ranks(range(1, 1024)) == "1-1023"

    ended = sm.OperationEnded("c-000009-grow", sm.OpKind.GROW, "rolled_back", 4, (0,), (9,), 0.0)
    record = OperationRecord(
        "c-000009-grow",
        sm.OpKind.GROW,
        T0,
        epoch=3,
        target_epoch=4,
        survivors=tuple(r for r in range(1024) if r != 9),
        joining=(0,),
        leaving=(9,),
        ended=sm.OperationEnded(
            "c-000009-grow", sm.OpKind.GROW, "rolled_back", 4, (0,), (9,), 0.0, "x" * 5000, 2
        ),
        end_unix_ms=T0 + 7.25,
        index=9,
    )
    raw = hs.encode_summary(record)
    assert len(raw) < 2048  # 1,023 survivors and a long reason, in the record's transaction
    back = hs.decode_summary(raw)
    assert (back.op_id, back.index, back.kind, back.epoch, back.target_epoch) == (
        "c-000009-grow",
        9,
        sm.OpKind.GROW,
        3,
        4,
    )
    assert (back.survivors, back.joining, back.leaving) == (
        record.survivors,
        record.joining,
        record.leaving,
    )
    assert back.ended is not None and back.end_unix_ms == T0 + 7.25
    assert (back.outcome, back.ended.left, back.ended.retargets) == ("rolled_back", (9,), 2)
    assert len(back.ended.reason) == hs.REASON_CHARS
    assert not back.detail_loaded
    assert ended.reason == ""  # (the unended form above is the plain one)
    with pytest.raises(ValueError, match="unreadable"):
        hs.decode_summary(b"not json")

    # A 1,024-rank operation's spans at the in-memory bound: in keys of a
    # few KiB, and each write encodes only what was added since the last.
    big = OperationRecord("c-000010-grow", sm.OpKind.GROW, T0, index=10)
    big.phases.append(PhaseSpanRecord(sm.Phase.PAUSING, big.op_id, 3, T0, T0 + 400.0))
    steps = (sm.Step.HOLD, sm.Step.REBUILD, sm.Step.RESYNC, sm.Step.RESUME)
    for i in range(RANK_SPANS_PER_OPERATION):
        start = T0 + 100.0 * (i // 1024) + (i % 7) * 0.123
        big.ranks.append(
            RankSpanRecord(i % 1024, steps[i // 1024], start, start + 2.5 + i / 997.0, "done")
        )
    values, stored = hs.detail_values(big)
    assert stored == RANK_SPANS_PER_OPERATION and len(values) == 1 + 8
    assert max(len(v) for _, v in values) < 16 * 1024
    assert sum(len(v) for _, v in values) < 96 * 1024  # of etcd's 1.5 MiB a request
    spans = [s for key, v in values if key != b"head" for s in hs.decode_chunk(v, big.op_id)]
    assert [(s.rank, s.step, s.outcome) for s in spans] == [
        (s.rank, s.step, s.outcome) for s in big.ranks
    ]
    for a, b in zip(spans, big.ranks, strict=True):  # microseconds
        assert abs(a.start_unix_ms - b.start_unix_ms) < 0.002
        assert abs(a.end_unix_ms - b.end_unix_ms) < 0.002
    assert hs.decode_head(dict(values)[b"head"], big.op_id)[0].end_unix_ms == T0 + 400.0
    big.spans_stored = stored - hs.SPANS_PER_KEY
    big.ranks.append(RankSpanRecord(1, sm.Step.RESUME, T0, T0 + 1.0, "failed"))
    values, stored = hs.detail_values(big)
    assert [key for key, _ in values] == [b"head", b"r0007", b"r0008"]
    assert stored == RANK_SPANS_PER_OPERATION


def test_event_numbers_are_reserved_a_block_ahead() -> None:
    seq = hs.EventSeq(last=100, durable=100)  # as a new leader finds its predecessor's ceiling
    assert seq.wanted() == 100 + hs.SEQ_BLOCK
    seq.durable = seq.wanted()
    assert seq.wanted() == 0 and seq.sendable
    while seq.durable - seq.last >= hs.SEQ_BLOCK // 2:
        seq.next()
    assert seq.wanted() == seq.last + hs.SEQ_BLOCK and seq.sendable
    seq.last = seq.durable + 1  # etcd took no reservation for a whole block
    assert not seq.sendable


# --- against etcd ---------------------------------------------------------------------


def test_the_history_stays_bounded_and_a_new_leader_loads_it(etcd: str, cluster_name: str) -> None:
    async def body() -> None:
        client = etcd_keys.new_client(*etcd_keys.split_endpoint(etcd))
        first = lease(etcd, cluster_name, "a")
        await first.start()
        try:
            leader = Leader(client, cluster_name, first, History())
            total = OPERATIONS_KEPT + 12
            for n in range(1, total + 1):
                await leader.operation(n)
                # The writer flushes now and then, as etcd lets it.
                if n % 10 == 0 or n == total:
                    await leader.writer.flush()
            running = await leader.operation(total + 1, ranks=1024, end=False)
            await leader.writer.flush()
            # Events numbered past half of the reserved block: the next write
            # reserves another.
            leader.seq.durable = 5000 + hs.SEQ_BLOCK
            leader.seq.last = leader.seq.durable - 1
            await leader.writer.flush()
            assert not leader.deposed and leader.writer.failures == 0
            ceiling = leader.seq.durable
            assert ceiling == leader.seq.last + hs.SEQ_BLOCK

            # Bounded: the newest OPERATIONS_KEPT operations, nothing older.
            ops = await keys(client, hs.ops_prefix(cluster_name))
            spans = await keys(client, hs.spans_prefix(cluster_name))
            kept = range(total + 2 - OPERATIONS_KEPT, total + 2)
            assert sorted(ops) == [hs.ops_key(cluster_name, i) for i in kept]
            assert {k[: len(hs.spans_key(cluster_name, 0))] for k in spans} == {
                hs.spans_key(cluster_name, i) for i in kept
            }
            # The 1,024-rank operation's 4,096 spans: 8 keys of a few KiB.
            of_big = hs.spans_key(cluster_name, total + 1)
            assert len([k for k in spans if k.startswith(of_big)]) == 1 + 8
            everything = await keys(client, hs.history_prefix(cluster_name))
            assert max(len(v) for v in everything.values()) < 16 * 1024
            # status, seq; a summary, a head and a chunk each; the big one's 8 chunks.
            assert len(everything) == 2 + (OPERATIONS_KEPT - 1) * 3 + 10

            # A new leader loads it: every summary, the timeline, the
            # numbering, and the spans of the operation still running.
            loaded = await hs.HistoryStore(client, cluster_name).load()
            history = loaded.history
            assert loaded.seq_ceiling == ceiling and not loaded.unreadable
            assert [r.index for r in history.operations.values()] == list(kept)
            assert history.next_index == total + 2
            newest = history.newest_first(2)
            assert [(r.op_id, r.outcome) for r in newest] == [
                (running, "running"),
                (f"c-{total:06d}-grow", "completed"),
            ]
            assert newest[0].detail_loaded and len(newest[0].ranks) == RANK_SPANS_PER_OPERATION
            assert newest[0].spans_stored == RANK_SPANS_PER_OPERATION
            assert newest[0].phases[-1] is history.timeline[-1]  # one object, closed together
            ended = newest[1]
            assert not ended.detail_loaded and ended.ended is not None
            assert (ended.ended.stall_ms, ended.ended.joined, ended.survivors) == (
                12.5,
                (0,),
                (1, 2, 3),
            )
            # An ended operation's spans are read when asked for.
            await hs.HistoryStore(client, cluster_name).read_detail(ended)
            original = leader.history.operations[ended.op_id]
            assert [(p.phase, p.start_unix_ms, p.end_unix_ms) for p in ended.phases] == [
                (p.phase, p.start_unix_ms, p.end_unix_ms) for p in original.phases
            ]
            assert [(s.rank, s.step) for s in ended.ranks] == [
                (s.rank, s.step) for s in original.ranks
            ]
            assert [(s.phase, s.op_id) for s in history.timeline] == [
                (s.phase, s.op_id) for s in leader.history.timeline
            ]
            assert all(s.inherited for s in history.timeline)
        finally:
            await first.stop()
            await client.close()

    run(body(), timeout=60)


def test_a_deposed_leaders_history_writes_are_refused(etcd: str, cluster_name: str) -> None:
    async def body() -> None:
        client = etcd_keys.new_client(*etcd_keys.split_endpoint(etcd))
        first = lease(etcd, cluster_name, "a")
        second = lease(etcd, cluster_name, "b")
        await first.start()
        try:
            old = Leader(client, cluster_name, first, History())
            await old.operation(1)
            running = await old.operation(2, end=False)
            await old.writer.flush()
            before = await keys(client, hs.history_prefix(cluster_name))
            assert hs.ops_key(cluster_name, 2) in before

            # etcd drops the old leader's lease (it was frozen past its TTL,
            # or cut off) and a standby takes over.
            await client.revoke_lease(first.lease_id)
            await second.start()
            assert second.fence_revision > first.fence_revision

            # The old leader, unaware, goes on: every history write fails as
            # a whole, whether with the record, by the writer or a reservation.
            ended = sm.OperationEnded(running, sm.OpKind.GROW, "completed", 3, (0,), (), 1.0)
            with pytest.raises(StaleWrite):
                await old.apply([ended])
            old.history.operation_ended(ended, T0)
            old.history.rank_done(sm.RankDone(running, 3, sm.Step.RESUME, T0, T0, "done"), T0, T0)
            with pytest.raises(StaleWrite):
                await old.writer.flush()
            with pytest.raises(StaleWrite):
                await old.store.reserve(99_999, 1, 1, first.fence())
            # The writer's own task stops and says why (the runtime steps down).
            old.history.status_dirty = True
            await asyncio.wait_for(old.writer.run(), 5)
            assert len(old.deposed) == 1 and "refused by the fence" in old.deposed[0]
            assert await keys(client, hs.history_prefix(cluster_name)) == before

            # The new leader sees the old one's last written history, and
            # its own writes go through.
            loaded = await hs.HistoryStore(client, cluster_name).load()
            assert loaded.history.operations[running].outcome == "running"
            new = Leader(client, cluster_name, second, loaded.history)
            await new.store.reserve(7, 0, loaded.history.oldest_kept, second.fence())
            await new.apply([ended])
            loaded = await hs.HistoryStore(client, cluster_name).load()
            assert loaded.history.operations[running].outcome == "completed"
            assert loaded.seq_ceiling == 7
        finally:
            await second.stop()
            await first.stop()
            await client.close()

    run(body())


def test_the_writer_retries_while_etcd_is_away_and_loses_nothing(
    etcd: str, cluster_name: str, free_port: int
) -> None:
    async def until(cond: Any, what: str, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)

    async def body() -> None:
        client = etcd_keys.new_client(*etcd_keys.split_endpoint(etcd))
        away = etcd_keys.new_client("127.0.0.1", free_port)  # nothing listens there
        first = lease(etcd, cluster_name, "a")
        await first.start()
        try:
            leader = Leader(client, cluster_name, first, History())
            # The writer's own connection cannot reach etcd.
            leader.writer.store = hs.HistoryStore(away, cluster_name)
            task = asyncio.create_task(leader.writer.run())
            # The record writes (with the summaries) go on meanwhile.
            op_id = await leader.operation(1)
            await until(lambda: leader.writer.failures >= 2, "the writer to fail and retry")
            assert not task.done() and not leader.deposed
            stored = await keys(client, hs.history_prefix(cluster_name))
            assert list(stored) == [hs.ops_key(cluster_name, 1)]  # the summary only
            assert leader.history.dirty_ops == {op_id} and leader.history.status_dirty

            # etcd answers the writer again: everything it had is written.
            leader.writer.store = hs.HistoryStore(client, cluster_name)
            await until(
                lambda: leader.writer.failures == 0 and not leader.writer.pending,
                "the writer to catch up",
            )
            stored = await keys(client, hs.history_prefix(cluster_name))
            assert hs.status_key(cluster_name) in stored and hs.seq_key(cluster_name) in stored
            loaded = await hs.HistoryStore(client, cluster_name).load()
            record = loaded.history.operations[op_id]
            await hs.HistoryStore(client, cluster_name).read_detail(record)
            assert len(record.ranks) == 16 and len(record.phases) == 1
            assert loaded.seq_ceiling == hs.SEQ_BLOCK
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            await first.stop()
            await away.close()
            await client.close()

    run(body())
