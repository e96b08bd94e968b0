"""The operation history in etcd, so that a new leader answers for the
operations its predecessor ran, and the event stream's numbers go on upward.

    /ep-recovery/{cluster}/history/ops/{index:012d}         an operation's summary (JSON)
    /ep-recovery/{cluster}/history/spans/{index:012d}/head  its phase spans (zlib, JSON)
    /ep-recovery/{cluster}/history/spans/{index:012d}/r{n}  its rank spans, 512 a key
    /ep-recovery/{cluster}/history/status                   the GetStatus timeline, failures
    /ep-recovery/{cluster}/history/seq                      the WatchEvents numbering (JSON)

`index` numbers operations across leaders (1, 2, ...). Only the leader
writes, and every write is a transaction that carries the leader's fence
(`LeaderLease.fence`), as the cluster record's writes do: a deposed leader's
late write fails as a whole (`StaleWrite`).

What is written when, and why:

- An operation's summary (its kind, ranks, start, and at its end the outcome,
  epoch, stall and reason) goes into the same transaction as the cluster
  record write that starts or ends it (`summary_ops`). It is small (rank lists
  are stored as ranges, reasons are cut at REASON_CHARS), so it adds no round
  trip and next to no bytes to the dispatch loop's one write, and the history
  can never disagree with the record about which operations ran and how they
  ended. That transaction also deletes the keys of operations no longer kept.
- Everything else (an operation's phase spans and up to 4,096 rank spans,
  the timeline and failures, the numbering's reservation) is written by
  `HistoryWriter`, a task of its own: one transaction at a time, coalescing
  what changed meanwhile (FLUSH_DELAY_S). It is larger and changes with every
  ack, so writing it with the record would put its encoding and its bytes on
  every transition. A write that fails or hangs (etcd away) is retried in the
  background; the dispatch loop never waits for one. So a leader that dies
  may leave its last FLUSH_DELAY_S (or an etcd outage) of spans unwritten; an
  operation's start and end are never lost.
- Rank spans are only ever appended, so they are stored in chunks of
  SPANS_PER_KEY: a full chunk is written once, and each write encodes only the
  last, partial one. What a write costs the event loop grows with the spans
  added since the last one, not with the operation's size.

The event stream's `seq` must never go backwards across leaders, though each
leader numbers its own events without asking etcd. So a leader reserves
numbers ahead (`EventSeq`): it sends an event only while its seq is within the
ceiling etcd holds (the `seq` key, written fenced), and a new leader numbers
its events from above the ceiling its predecessor reserved. The reservation
is written at the take-over and then, SEQ_BLOCK numbers at a time, by the
writer once half of the block is used; a stream sees a gap of at most
SEQ_BLOCK at a failover, never a number again.

Bounds: OPERATIONS_KEPT operations, their spans as the in-memory history
keeps them (RANK_SPANS_PER_OPERATION: 9 keys of a few KiB at most), each
writer transaction at most WRITE_MAX_KEYS keys and about WRITE_BUDGET_BYTES,
well inside etcd's defaults (1.5 MiB a request, 128 operations a
transaction). A new leader reads the summaries, the timeline and the
numbering at its take-over (and the spans of an operation still running),
and an ended operation's spans only when GetOperation asks for them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd

from coordinator import etcd_keys
from coordinator import state_machine as sm
from coordinator.cluster_store import StaleWrite
from coordinator.history import (
    OPERATIONS_KEPT,
    History,
    OperationRecord,
    PhaseSpanRecord,
    RankSpanRecord,
)
from coordinator.logs import fields

log = logging.getLogger(__name__)

# Index digits in a key: fixed width, so keys sort as their indexes do.
INDEX_DIGITS = 12
# The writer waits this long after a change before it writes, so that a
# burst (the acks of every rank of a step) becomes one transaction.
FLUSH_DELAY_S = 0.1
# A writer transaction that has no answer this long is abandoned and retried.
WRITE_TIMEOUT_S = 10.0
# Backoff of a failing writer: from FLUSH_DELAY_S, doubling, at most this.
WRITE_BACKOFF_MAX_S = 2.0
# Numbers reserved for the event stream at a time.
SEQ_BLOCK = 4096
# Rank spans stored in one key.
SPANS_PER_KEY = 512
# One writer transaction puts at most this many keys, and stops adding
# operations' spans past this many bytes; the rest waits for the next one.
WRITE_MAX_KEYS = 96
WRITE_BUDGET_BYTES = 1024 * 1024
# Phase spans stored per operation (an operation has a handful).
PHASES_PER_OPERATION = 256
# Stored reasons (a failure's, an operation's) are cut at this many characters.
REASON_CHARS = 1024
# Spans of one operation read at once when GetOperation asks for them.
READ_TIMEOUT_S = 5.0
VERSION = 1


def history_prefix(cluster: str) -> bytes:
    return etcd_keys.cluster_prefix(cluster) + b"history/"


def ops_prefix(cluster: str) -> bytes:
    return history_prefix(cluster) + b"ops/"


def spans_prefix(cluster: str) -> bytes:
    return history_prefix(cluster) + b"spans/"


def ops_key(cluster: str, index: int) -> bytes:
    return ops_prefix(cluster) + f"{index:0{INDEX_DIGITS}d}".encode()


def spans_key(cluster: str, index: int) -> bytes:
    """Below it (a prefix, with "/"): every key of the operation's spans; as
    a range end: every operation before `index`."""
    return spans_prefix(cluster) + f"{index:0{INDEX_DIGITS}d}".encode()


def status_key(cluster: str) -> bytes:
    return history_prefix(cluster) + b"status"


def seq_key(cluster: str) -> bytes:
    return history_prefix(cluster) + b"seq"


def _index_of(prefix: bytes, key: bytes) -> int | None:
    tail = key[len(prefix) :] if key.startswith(prefix) else b""
    return int(tail) if len(tail) == INDEX_DIGITS and tail.isdigit() else None


# --- the numbering ----------------------------------------------------------------


@dataclass
class EventSeq:
    """The WatchEvents numbering of this leader. `last`: the seq of the last
    event numbered; `durable`: the ceiling etcd holds, the highest seq this
    leader may send (a successor numbers from above it)."""

    last: int = 0
    durable: int = 0

    def next(self) -> int:
        self.last += 1
        return self.last

    @property
    def sendable(self) -> bool:
        """Every number given out so far is within the reserved ceiling."""
        return self.last <= self.durable

    def wanted(self) -> int:
        """The ceiling to reserve now (0: none): another block once half of
        the current one is used."""
        return self.last + SEQ_BLOCK if self.durable - self.last < SEQ_BLOCK // 2 else 0


# --- encoding ---------------------------------------------------------------------


def pack_ranks(ranks: Iterable[int]) -> str:
    """Ranks as ranges: (0, 1, 2, 3, 5) -> "0-3,5"; a 1,024-rank survivor list
    is a few characters."""
    out: list[str] = []
    ordered = sorted(set(ranks))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def unpack_ranks(text: str) -> tuple[int, ...]:
    ranks: list[int] = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        ranks.extend(range(int(first), int(last or first) + 1))
    return tuple(ranks)


def _cut(text: str) -> str:
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def encode_summary(record: OperationRecord) -> bytes:
    ended = record.ended
    value: dict[str, Any] = {
        "v": VERSION,
        "index": record.index,
        "op_id": record.op_id,
        "kind": str(record.kind),
        "start_unix_ms": record.start_unix_ms,
        "epoch": record.epoch,
        "target_epoch": record.target_epoch,
        "survivors": pack_ranks(record.survivors),
        "joining": pack_ranks(record.joining),
        "leaving": pack_ranks(record.leaving),
        "end": None
        if ended is None
        else {
            "unix_ms": record.end_unix_ms,
            "outcome": ended.outcome,
            "epoch": ended.epoch,
            "joined": pack_ranks(ended.joined),
            "left": pack_ranks(ended.left),
            "stall_ms": ended.stall_ms,
            "reason": _cut(ended.reason),
            "retargets": ended.retargets,
        },
    }
    return json.dumps(value, separators=(",", ":")).encode()


def decode_summary(raw: bytes) -> OperationRecord:
    """The inverse of encode_summary, without spans (`detail_loaded` False);
    ValueError on a value it cannot read."""
    try:
        d = json.loads(raw)
        kind = sm.OpKind(d["kind"])
        record = OperationRecord(
            op_id=str(d["op_id"]),
            kind=kind,
            start_unix_ms=float(d["start_unix_ms"]),
            epoch=int(d["epoch"]),
            target_epoch=int(d["target_epoch"]),
            survivors=unpack_ranks(d["survivors"]),
            joining=unpack_ranks(d["joining"]),
            leaving=unpack_ranks(d["leaving"]),
            index=int(d["index"]),
            detail_loaded=False,
        )
        end = d["end"]
        if end is not None:
            record.end_unix_ms = float(end["unix_ms"])
            record.ended = sm.OperationEnded(
                record.op_id,
                kind,
                str(end["outcome"]),
                int(end["epoch"]),
                unpack_ranks(end["joined"]),
                unpack_ranks(end["left"]),
                float(end["stall_ms"]),
                str(end["reason"]),
                int(end["retargets"]),
            )
        return record
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"unreadable operation summary: {exc!r}") from exc


def encode_head(record: OperationRecord) -> bytes:
    """An operation's phase spans."""
    value = {
        "v": VERSION,
        "op_id": record.op_id,
        "phases": [
            [str(p.phase), p.epoch, p.start_unix_ms, p.end_unix_ms]
            for p in record.phases[:PHASES_PER_OPERATION]
        ],
    }
    return zlib.compress(json.dumps(value, separators=(",", ":")).encode())


def encode_chunk(record: OperationRecord, chunk: int) -> bytes:
    """Rank spans chunk*SPANS_PER_KEY onwards (up to SPANS_PER_KEY of them),
    as columns, times in whole microseconds after the operation's start:
    compact, and zlib finds their repetitions."""
    spans = record.ranks[chunk * SPANS_PER_KEY : (chunk + 1) * SPANS_PER_KEY]
    t0 = record.start_unix_ms
    steps: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    value = {
        "v": VERSION,
        "op_id": record.op_id,
        "t0": t0,
        "rank": [s.rank for s in spans],
        "step": [steps.setdefault(s.step, len(steps)) for s in spans],
        "outcome": [outcomes.setdefault(s.outcome, len(outcomes)) for s in spans],
        "start_us": [int((s.start_unix_ms - t0) * 1000.0 + 0.5) for s in spans],
        "dur_us": [int((s.end_unix_ms - s.start_unix_ms) * 1000.0 + 0.5) for s in spans],
        "steps": [str(step) for step in steps],
        "outcomes": list(outcomes),
    }
    return zlib.compress(json.dumps(value, separators=(",", ":")).encode())


def decode_head(raw: bytes, op_id: str) -> list[PhaseSpanRecord]:
    """The inverse of encode_head; ValueError on a value it cannot read."""
    try:
        d = json.loads(zlib.decompress(raw))
        if d["op_id"] != op_id:
            raise ValueError(f"spans of {d['op_id']!r}, not {op_id!r}")
        return [
            PhaseSpanRecord(sm.Phase(p), op_id, int(e), float(s), float(x), inherited=True)
            for p, e, s, x in d["phases"]
        ]
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        raise ValueError(f"unreadable phase spans: {exc!r}") from exc


def decode_chunk(raw: bytes, op_id: str) -> list[RankSpanRecord]:
    """The inverse of encode_chunk; ValueError on a value it cannot read."""
    try:
        d = json.loads(zlib.decompress(raw))
        if d["op_id"] != op_id:
            raise ValueError(f"spans of {d['op_id']!r}, not {op_id!r}")
        t0 = float(d["t0"])
        steps = [sm.Step(s) for s in d["steps"]]
        outcomes = [str(o) for o in d["outcomes"]]
        return [
            RankSpanRecord(
                int(rank),
                steps[step],
                t0 + start / 1000.0,
                t0 + (start + dur) / 1000.0,
                outcomes[outcome],
            )
            for rank, step, outcome, start, dur in zip(
                d["rank"], d["step"], d["outcome"], d["start_us"], d["dur_us"], strict=True
            )
        ]
    except (KeyError, TypeError, ValueError, IndexError, zlib.error) as exc:
        raise ValueError(f"unreadable rank spans: {exc!r}") from exc


def detail_values(record: OperationRecord) -> tuple[list[tuple[bytes, bytes]], int]:
    """What to write of an operation's spans, as (key suffix, value) pairs:
    the head, and every chunk from the first not yet stored in full; and how
    many spans are stored in full chunks once they are written."""
    n = len(record.ranks)
    values = [(b"head", encode_head(record))]
    first = record.spans_stored // SPANS_PER_KEY
    last = (n + SPANS_PER_KEY - 1) // SPANS_PER_KEY
    for chunk in range(first, last):
        values.append((f"r{chunk:04d}".encode(), encode_chunk(record, chunk)))
    return values, n - n % SPANS_PER_KEY


def encode_status(history: History) -> bytes:
    value = {
        "v": VERSION,
        "timeline": [
            [str(s.phase), s.op_id, s.epoch, s.start_unix_ms, s.end_unix_ms]
            for s in history.timeline
        ],
        "failures": [
            [f.rank, _cut(f.reason), suspected, confirmed]
            for f, suspected, confirmed in history.failures
        ],
    }
    return zlib.compress(json.dumps(value, separators=(",", ":")).encode(), 6)


def decode_status(
    raw: bytes,
) -> tuple[list[PhaseSpanRecord], list[tuple[sm.RankFailed, float, float]]]:
    try:
        d = json.loads(zlib.decompress(raw))
        timeline = [
            PhaseSpanRecord(sm.Phase(p), str(op), int(e), float(s), float(x))
            for p, op, e, s, x in d["timeline"]
        ]
        failures = [
            (sm.RankFailed(int(rank), str(reason), None, 0.0), float(sus), float(conf))
            for rank, reason, sus, conf in d["failures"]
        ]
        return timeline, failures
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        raise ValueError(f"unreadable history status: {exc!r}") from exc


def encode_seq(ceiling: int, last: int) -> bytes:
    return json.dumps({"ceiling": ceiling, "last": last}, separators=(",", ":")).encode()


def decode_seq(raw: bytes) -> int:
    """The stored ceiling; ValueError on a value it cannot read."""
    try:
        ceiling = int(json.loads(raw)["ceiling"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"unreadable event numbering: {exc!r}") from exc
    if ceiling < 0:
        raise ValueError(f"negative event numbering ceiling {ceiling}")
    return ceiling


# --- the store ----------------------------------------------------------------------


@dataclass
class Loaded:
    history: History
    # The ceiling the predecessor reserved: this leader numbers from above it.
    seq_ceiling: int
    # Values that could not be read (skipped), by key.
    unreadable: list[str]


class HistoryStore:
    def __init__(self, client: aetcd.Client, cluster: str) -> None:
        self.client = client
        self.cluster = cluster

    # --- what goes with the cluster record ---

    def summary_ops(
        self, operations: Iterable[OperationRecord], oldest_kept: int | None
    ) -> list[Any]:
        """Transaction operations for the record write that starts or ends
        `operations`: their summaries, and the deletion of every operation
        older than `oldest_kept` (None: nothing to delete)."""
        txn = self.client.transactions
        # (etcd refuses a transaction that puts a key it also deletes.)
        ops: list[Any] = [
            txn.put(ops_key(self.cluster, r.index), encode_summary(r))
            for r in operations
            if oldest_kept is None or r.index >= oldest_kept
        ]
        if ops and oldest_kept is not None:
            ops.extend(self._older_than(oldest_kept))
        return ops

    def _older_than(self, oldest_kept: int) -> list[Any]:
        """Deletes of every key of the operations before `oldest_kept`."""
        txn = self.client.transactions
        return [
            txn.delete(ops_key(self.cluster, 0), range_end=ops_key(self.cluster, oldest_kept)),
            txn.delete(spans_key(self.cluster, 0), range_end=spans_key(self.cluster, oldest_kept)),
        ]

    # --- fenced writes of their own ---

    async def write(self, success: Sequence[Any], fence: Sequence[Any]) -> None:
        """One transaction: `success` when every compare of `fence` holds;
        StaleWrite (nothing written) when one does not."""
        if not success:
            return
        written, _ = await self.client.transaction(
            compare=list(fence), success=list(success), failure=[]
        )
        if not written:
            raise StaleWrite(history_prefix(self.cluster), None, 0)

    async def reserve(
        self, ceiling: int, last: int, oldest_kept: int | None, fence: Sequence[Any]
    ) -> None:
        """The take-over's write: the numbering's first reservation, and the
        deletion of what a predecessor left beyond the bounds."""
        success = [self.client.transactions.put(seq_key(self.cluster), encode_seq(ceiling, last))]
        if oldest_kept is not None:
            success.extend(self._older_than(oldest_kept))
        await self.write(success, fence)

    def writer_ops(
        self,
        history: History,
        records: Sequence[OperationRecord],
        status: bool,
        seq: tuple[int, int] | None,
    ) -> tuple[list[Any], list[tuple[OperationRecord, int]], list[OperationRecord]]:
        """The writer's transaction: the spans of `records` (as many as fit),
        the status when `status`, the reservation `seq` (ceiling, last).
        Also: each record written with the spans it will have stored in full
        chunks, and the records left for the next transaction."""
        txn = self.client.transactions
        success: list[Any] = []
        size = 0
        if seq is not None:
            success.append(txn.put(seq_key(self.cluster), encode_seq(*seq)))
        if status:
            raw = encode_status(history)
            size += len(raw)
            success.append(txn.put(status_key(self.cluster), raw))
        written: list[tuple[OperationRecord, int]] = []
        left: list[OperationRecord] = []
        for record in records:
            if left:
                left.append(record)
                continue
            values, stored = detail_values(record)
            more = sum(len(v) for _, v in values)
            if written and (
                size + more > WRITE_BUDGET_BYTES or len(success) + len(values) > WRITE_MAX_KEYS
            ):
                left.append(record)
                continue
            size += more
            prefix = spans_key(self.cluster, record.index) + b"/"
            success.extend(txn.put(prefix + suffix, value) for suffix, value in values)
            written.append((record, stored))
        oldest = history.oldest_kept
        if written and oldest is not None:
            # An operation dropped while this was being written may have
            # been written after its deletion: gone again.
            success.append(
                txn.delete(spans_key(self.cluster, 0), range_end=spans_key(self.cluster, oldest))
            )
        return success, written, left

    # --- reading ---

    async def load(self, *, spans_of_running: bool = True) -> Loaded:
        """The history as etcd holds it: the newest OPERATIONS_KEPT
        summaries, the timeline and failures, the numbering; and the spans of
        operations that have not ended (the new leader goes on with them).
        Unreadable values are skipped (logged): they never stop a take-over."""
        unreadable: list[str] = []
        summaries: list[OperationRecord] = []
        for kv in await self.client.get_prefix(ops_prefix(self.cluster)):
            index = _index_of(ops_prefix(self.cluster), bytes(kv.key))
            try:
                if index is None:
                    raise ValueError("not an operation key")
                record = decode_summary(bytes(kv.value))
                if record.index != index:
                    raise ValueError(f"index {record.index} under key {index}")
                summaries.append(record)
            except ValueError as exc:
                unreadable.append(bytes(kv.key).decode(errors="replace"))
                log.warning(
                    "unreadable history value skipped",
                    extra=fields(key=bytes(kv.key).decode(errors="replace"), error=str(exc)),
                )
        summaries.sort(key=lambda r: r.index)
        summaries = summaries[-OPERATIONS_KEPT:]
        timeline: list[PhaseSpanRecord] = []
        failures: list[tuple[sm.RankFailed, float, float]] = []
        got = await self.client.get(status_key(self.cluster))
        if got is not None:
            try:
                timeline, failures = decode_status(bytes(got.value))
            except ValueError as exc:
                unreadable.append(status_key(self.cluster).decode())
                log.warning("unreadable history status skipped", extra=fields(error=str(exc)))
        ceiling = 0
        got = await self.client.get(seq_key(self.cluster))
        if got is not None:
            try:
                ceiling = decode_seq(bytes(got.value))
            except ValueError as exc:
                # Only a hand-written value gets here; the numbers start
                # again, as they did before the history was kept in etcd.
                unreadable.append(seq_key(self.cluster).decode())
                log.error(
                    "unreadable event numbering; numbering from 0", extra=fields(error=str(exc))
                )
        if spans_of_running:
            for record in summaries:
                if record.ended is None:
                    await self.read_detail(record)
        history = History.restored(summaries, timeline, failures)
        return Loaded(history, ceiling, unreadable)

    async def read_detail(self, record: OperationRecord) -> None:
        """Read an operation's phase and rank spans into it (none when etcd
        has none: its leader died before writing them). aetcd errors and
        TimeoutError go to the caller; an unreadable value counts as none."""
        prefix = spans_key(self.cluster, record.index) + b"/"
        got = await asyncio.wait_for(self.client.get_prefix(prefix), READ_TIMEOUT_S)
        values = {bytes(kv.key)[len(prefix) :]: bytes(kv.value) for kv in got}
        phases: list[PhaseSpanRecord] = []
        ranks: list[RankSpanRecord] = []
        try:
            if b"head" in values:
                phases = decode_head(values[b"head"], record.op_id)
            chunks = sorted(k for k in values if k.startswith(b"r"))
            for expected, key in enumerate(chunks):
                if key != f"r{expected:04d}".encode():
                    break  # a hole: what follows it cannot be placed
                ranks.extend(decode_chunk(values[key], record.op_id))
        except ValueError as exc:
            log.warning(
                "unreadable operation spans skipped",
                extra=fields(op_id=record.op_id, error=str(exc)),
            )
        if not record.detail_loaded:
            record.phases, record.ranks = phases, ranks
            record.spans_stored = len(ranks) - len(ranks) % SPANS_PER_KEY
            record.detail_loaded = True


# --- the writer -----------------------------------------------------------------------


class HistoryWriter:
    """Writes what the history marks as changed, and the numbering's
    reservations, in the background: one fenced transaction at a time. It
    never blocks the dispatch loop; a failing etcd makes it retry with
    backoff. A fence that fails means this leader was deposed: `on_deposed`
    is called with the reason and the writer ends."""

    def __init__(
        self,
        store: HistoryStore,
        history: History,
        seq: EventSeq,
        fence: Callable[[], Sequence[Any]],
        on_deposed: Callable[[str], None],
    ) -> None:
        self.store = store
        self.history = history
        self.seq = seq
        self._fence = fence
        self._on_deposed = on_deposed
        self._wake = asyncio.Event()
        self.writes = 0
        self.failures = 0
        history.on_change = self.poke

    def poke(self) -> None:
        self._wake.set()

    @property
    def pending(self) -> bool:
        return bool(self.history.dirty_ops or self.history.status_dirty or self.seq.wanted())

    async def run(self) -> None:
        if self.pending:
            self.poke()
        backoff = FLUSH_DELAY_S
        while True:
            await self._wake.wait()
            await asyncio.sleep(backoff if self.failures else FLUSH_DELAY_S)
            self._wake.clear()
            try:
                await asyncio.wait_for(self.flush(), WRITE_TIMEOUT_S)
            except StaleWrite as exc:
                self._on_deposed(f"history write refused by the fence: {exc}")
                return
            except Exception as exc:
                # etcd away or slow (TimeoutError, aetcd's errors), or a bug:
                # retried, never fatal to the coordinator.
                self.failures += 1
                backoff = min(WRITE_BACKOFF_MAX_S, FLUSH_DELAY_S * 2**self.failures)
                expected = isinstance(exc, TimeoutError | aetcd.ClientError)
                level = logging.WARNING if self.failures == 1 else logging.DEBUG
                log.log(
                    level if expected else logging.ERROR,
                    "history write failed, retrying",
                    extra=fields(failures=self.failures, error=repr(exc)),
                    exc_info=not expected,
                )
                self.poke()
                continue
            if self.failures:
                log.info("history writes get through again", extra=fields(failures=self.failures))
                self.failures = 0
            if self.pending:
                self.poke()  # what did not fit this one, or changed meanwhile

    async def flush(self) -> None:
        """One transaction of what changed; what it could not write is
        marked changed again."""
        records, status = self.history.take_dirty()
        wanted = self.seq.wanted()
        seq = (wanted, self.seq.last) if wanted else None
        try:
            success, written, left = self.store.writer_ops(self.history, records, status, seq)
            await self.store.write(success, self._fence())
        except BaseException:
            self.history.mark_dirty(records, status)
            raise
        for record, stored in written:
            record.spans_stored = max(record.spans_stored, stored)
        if left:
            self.history.mark_dirty(left, False)
        if wanted:
            self.seq.durable = max(self.seq.durable, wanted)
        self.writes += 1
