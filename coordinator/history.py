"""What the coordinator remembers of its recent past: the phase timeline, rank
failures and operations with each rank's part in them.

It is fed by the state machine's observation actions (PhaseEntered,
OperationStarted, RankDone, OperationEnded, RankFailed) as the runtime carries
them out, and read by GetStatus, ListOperations, GetOperation and
`epctl timeline`. Bounded. It lives in memory and in etcd
(`coordinator.history_store`): a new leader loads its predecessor's, so it
answers for operations it did not run. It marks what changed (`dirty_ops`,
`status_dirty`) for the store's writer, and says how the operations that
actions start or end will look (`preview`) for the summaries written with the
cluster record. Times are wall-clock unix milliseconds, which other processes
compare.
"""

from __future__ import annotations

import copy
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from coordinator import state_machine as sm

# Phase spans and failures kept for GetStatus.
HISTORY = 256
# Operations kept for ListOperations and GetOperation (each with its spans).
OPERATIONS_KEPT = 128
# Per-rank spans kept per operation: a bound against a retarget storm.
RANK_SPANS_PER_OPERATION = 4096


@dataclass
class PhaseSpanRecord:
    phase: sm.Phase
    op_id: str
    epoch: int
    start_unix_ms: float
    end_unix_ms: float = 0.0
    # Loaded from a predecessor's history: its duration is not this
    # coordinator's to observe (metrics).
    inherited: bool = False


@dataclass(frozen=True)
class RankSpanRecord:
    rank: int
    step: sm.Step
    start_unix_ms: float
    end_unix_ms: float
    outcome: str


@dataclass
class OperationRecord:
    """One operation as the history knows it. One taken over from a previous
    coordinator whose history did not know it has no start action: its fields
    then stay empty. `index` orders operations across leaders (1, 2, ...; the
    etcd keys are named by it). `detail_loaded` is False for an operation
    loaded from etcd whose phase and rank spans have not been read yet
    (`coordinator.history_store` reads them when asked for)."""

    op_id: str
    kind: sm.OpKind
    start_unix_ms: float
    epoch: int = 0
    target_epoch: int = 0
    survivors: tuple[int, ...] = ()
    joining: tuple[int, ...] = ()
    leaving: tuple[int, ...] = ()
    ended: sm.OperationEnded | None = None
    end_unix_ms: float = 0.0
    phases: list[PhaseSpanRecord] = field(default_factory=list)
    ranks: list[RankSpanRecord] = field(default_factory=list)
    index: int = 0
    detail_loaded: bool = True
    # Rank spans etcd holds in full chunks (history_store): those are never
    # written again, since spans are only ever appended.
    spans_stored: int = 0

    @property
    def outcome(self) -> str:
        return self.ended.outcome if self.ended is not None else "running"

    @property
    def involved(self) -> tuple[int, ...]:
        """Every rank the operation concerned (one track each in a trace)."""
        known = set(self.survivors) | set(self.joining) | set(self.leaving)
        known |= {span.rank for span in self.ranks}
        return tuple(sorted(known))


@dataclass(frozen=True)
class Preview:
    """What the operations a batch of actions starts or ends will be once the
    actions are carried out (copies: nothing in the history changed), and the
    index of the oldest operation kept then (None: none kept)."""

    operations: tuple[OperationRecord, ...]
    oldest_kept: int | None


@dataclass
class History:
    timeline: deque[PhaseSpanRecord] = field(default_factory=lambda: deque(maxlen=HISTORY))
    failures: deque[tuple[sm.RankFailed, float, float]] = field(
        default_factory=lambda: deque(maxlen=HISTORY)
    )
    # By op_id, oldest first (operations never overlap, so start order is end order).
    operations: OrderedDict[str, OperationRecord] = field(default_factory=OrderedDict)
    # The index the next new operation gets.
    next_index: int = 1
    # What changed since the store's writer last took it: operations whose
    # phase or rank spans changed (by op_id), and the timeline or failures.
    dirty_ops: set[str] = field(default_factory=set)
    status_dirty: bool = False
    # Called on every change (the writer's wake-up); None: nobody listens.
    on_change: Callable[[], None] | None = None

    @classmethod
    def restored(
        cls,
        operations: Iterable[OperationRecord],
        timeline: Iterable[PhaseSpanRecord],
        failures: Iterable[tuple[sm.RankFailed, float, float]],
    ) -> History:
        """A history loaded from etcd: `operations` oldest first (the newest
        OPERATIONS_KEPT are kept), the timeline's spans oldest first (marked
        inherited). Nothing in it is dirty."""
        history = cls()
        for span in timeline:
            span.inherited = True
            history.timeline.append(span)
        history.failures.extend(failures)
        kept = list(operations)[-OPERATIONS_KEPT:]
        for record in kept:
            history.operations[record.op_id] = record
            history.link_phases(record)
        history.next_index = max((r.index for r in kept), default=0) + 1
        return history

    def link_phases(self, record: OperationRecord) -> None:
        """Make the operation's phase spans the timeline's own objects where
        both hold the same span (loaded separately), so that closing the
        timeline's last span closes the operation's too."""
        in_timeline = {
            (s.op_id, s.phase, s.epoch, s.start_unix_ms): s
            for s in self.timeline
            if s.op_id == record.op_id
        }
        record.phases = [
            in_timeline.get((s.op_id, s.phase, s.epoch, s.start_unix_ms), s) for s in record.phases
        ]

    def phase_entered(self, action: sm.PhaseEntered, at_ms: float) -> PhaseSpanRecord | None:
        """Open the new phase's span; returns the span it closed, if any."""
        closed: PhaseSpanRecord | None = None
        if self.timeline:
            closed = self.timeline[-1]
            closed.end_unix_ms = at_ms
            self._op_changed(closed.op_id)
        span = PhaseSpanRecord(action.phase, action.op_id, action.epoch, at_ms)
        self.timeline.append(span)
        record = self.operations.get(action.op_id) if action.op_id else None
        if record is not None:
            # The same object in both lists: closing it closes both.
            record.phases.append(span)
            self._op_changed(record.op_id)
        self._status_changed()
        return closed

    def operation_started(self, action: sm.OperationStarted, at_ms: float) -> OperationRecord:
        record = self._operation(action.op_id, action.kind, at_ms)
        _started(record, action)
        self._op_changed(record.op_id)
        return record

    def rank_done(self, action: sm.RankDone, start_ms: float, end_ms: float) -> None:
        record = self.operations.get(action.op_id)
        if record is None or len(record.ranks) >= RANK_SPANS_PER_OPERATION:
            return
        record.ranks.append(
            RankSpanRecord(action.rank, action.step, start_ms, end_ms, action.outcome)
        )
        self._op_changed(record.op_id)

    def operation_ended(self, action: sm.OperationEnded, at_ms: float) -> OperationRecord:
        record = self._operation(action.op_id, action.kind, at_ms)
        _ended(record, action, at_ms)
        self._op_changed(record.op_id)
        return record

    def failed(self, action: sm.RankFailed, suspected_ms: float, confirmed_ms: float) -> None:
        self.failures.append((action, suspected_ms, confirmed_ms))
        self._status_changed()

    def preview(self, actions: Sequence[sm.Action], unix_ms: Callable[[float], float]) -> Preview:
        """How operation_started and operation_ended will leave the operations
        that `actions` start or end (`unix_ms` turns an action's time into
        what the runtime passes them), without changing anything."""
        changes = [a for a in actions if isinstance(a, sm.OperationStarted | sm.OperationEnded)]
        if not changes:
            return Preview((), None)  # nearly every batch: nothing to copy
        touched: dict[str, OperationRecord] = {}
        indexes = [r.index for r in self.operations.values()]
        next_index = self.next_index
        for action in changes:
            at_ms = unix_ms(action.at)
            record = touched.get(action.op_id)
            if record is None:
                existing = self.operations.get(action.op_id)
                if existing is None:
                    record = OperationRecord(action.op_id, action.kind, at_ms, index=next_index)
                    indexes.append(next_index)
                    next_index += 1
                else:
                    record = copy.copy(existing)
                touched[action.op_id] = record
            if isinstance(action, sm.OperationStarted):
                _started(record, action)
            else:
                _ended(record, action, at_ms)
        kept = indexes[-OPERATIONS_KEPT:]
        return Preview(tuple(touched.values()), kept[0] if kept else None)

    def take_dirty(self) -> tuple[list[OperationRecord], bool]:
        """The operations (kept, their spans loaded) whose spans changed and
        whether the timeline or failures did, since the last call; all marked
        clean. `mark_dirty` puts back what could not be written."""
        records = [
            record
            for op_id in self.dirty_ops
            if (record := self.operations.get(op_id)) is not None and record.detail_loaded
        ]
        status = self.status_dirty
        self.dirty_ops = set()
        self.status_dirty = False
        return sorted(records, key=lambda r: r.index), status

    def mark_dirty(self, records: Iterable[OperationRecord], status: bool) -> None:
        self.dirty_ops.update(r.op_id for r in records)
        self.status_dirty = self.status_dirty or status
        self._notify()

    @property
    def oldest_kept(self) -> int | None:
        """The index of the oldest operation kept; None when there is none."""
        first = next(iter(self.operations.values()), None)
        return first.index if first is not None else None

    def _op_changed(self, op_id: str) -> None:
        record = self.operations.get(op_id) if op_id else None
        if record is not None and record.detail_loaded:
            self.dirty_ops.add(op_id)
            self._notify()

    def _status_changed(self) -> None:
        self.status_dirty = True
        self._notify()

    def _notify(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def ended_operations(self) -> list[OperationRecord]:
        """Finished operations, oldest first."""
        return [r for r in self.operations.values() if r.ended is not None]

    def newest_first(self, limit: int = 0) -> list[OperationRecord]:
        records = list(reversed(self.operations.values()))
        return records[:limit] if limit > 0 else records

    def _operation(self, op_id: str, kind: sm.OpKind, at_ms: float) -> OperationRecord:
        record = self.operations.get(op_id)
        if record is None:
            # An operation taken over from a previous coordinator whose
            # history did not know it ends without having started here: it
            # starts and ends at once.
            record = OperationRecord(op_id, kind, at_ms, index=self.next_index)
            self.next_index += 1
            self.operations[op_id] = record
            while len(self.operations) > OPERATIONS_KEPT:
                gone, _ = self.operations.popitem(last=False)
                self.dirty_ops.discard(gone)
        return record


def _started(record: OperationRecord, action: sm.OperationStarted) -> None:
    record.epoch = action.epoch
    record.target_epoch = action.target_epoch
    record.survivors = action.survivors
    record.joining = action.joining
    record.leaving = action.leaving


def _ended(record: OperationRecord, action: sm.OperationEnded, at_ms: float) -> None:
    record.ended = action
    record.end_unix_ms = at_ms
