"""What the coordinator remembers of its recent past: the phase timeline, rank
failures and operations with each rank's part in them.

It is fed by the state machine's observation actions (PhaseEntered,
OperationStarted, RankDone, OperationEnded, RankFailed) as the runtime carries
them out, and read by GetStatus, ListOperations, GetOperation and
`epctl timeline`. Bounded and in memory: a restarted coordinator starts a new
history (the cluster record in etcd says where things stand, not how they got
there). Times are wall-clock unix milliseconds, which other processes compare.
"""

from __future__ import annotations

from collections import OrderedDict, deque
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
    coordinator has no start action: its fields then stay empty."""

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

    @property
    def outcome(self) -> str:
        return self.ended.outcome if self.ended is not None else "running"

    @property
    def involved(self) -> tuple[int, ...]:
        """Every rank the operation concerned (one track each in a trace)."""
        known = set(self.survivors) | set(self.joining) | set(self.leaving)
        known |= {span.rank for span in self.ranks}
        return tuple(sorted(known))


@dataclass
class History:
    timeline: deque[PhaseSpanRecord] = field(default_factory=lambda: deque(maxlen=HISTORY))
    failures: deque[tuple[sm.RankFailed, float, float]] = field(
        default_factory=lambda: deque(maxlen=HISTORY)
    )
    # By op_id, oldest first (operations never overlap, so start order is end order).
    operations: OrderedDict[str, OperationRecord] = field(default_factory=OrderedDict)

    def phase_entered(self, action: sm.PhaseEntered, at_ms: float) -> PhaseSpanRecord | None:
        """Open the new phase's span; returns the span it closed, if any."""
        closed: PhaseSpanRecord | None = None
        if self.timeline:
            closed = self.timeline[-1]
            closed.end_unix_ms = at_ms
        span = PhaseSpanRecord(action.phase, action.op_id, action.epoch, at_ms)
        self.timeline.append(span)
        record = self.operations.get(action.op_id) if action.op_id else None
        if record is not None:
            # The same object in both lists: closing it closes both.
            record.phases.append(span)
        return closed

    def operation_started(self, action: sm.OperationStarted, at_ms: float) -> OperationRecord:
        record = self._operation(action.op_id, action.kind, at_ms)
        record.epoch = action.epoch
        record.target_epoch = action.target_epoch
        record.survivors = action.survivors
        record.joining = action.joining
        record.leaving = action.leaving
        return record

    def rank_done(self, action: sm.RankDone, start_ms: float, end_ms: float) -> None:
        record = self.operations.get(action.op_id)
        if record is None or len(record.ranks) >= RANK_SPANS_PER_OPERATION:
            return
        record.ranks.append(
            RankSpanRecord(action.rank, action.step, start_ms, end_ms, action.outcome)
        )

    def operation_ended(self, action: sm.OperationEnded, at_ms: float) -> OperationRecord:
        record = self._operation(action.op_id, action.kind, at_ms)
        record.ended = action
        record.end_unix_ms = at_ms
        return record

    def failed(self, action: sm.RankFailed, suspected_ms: float, confirmed_ms: float) -> None:
        self.failures.append((action, suspected_ms, confirmed_ms))

    def ended_operations(self) -> list[OperationRecord]:
        """Finished operations, oldest first."""
        return [r for r in self.operations.values() if r.ended is not None]

    def newest_first(self, limit: int = 0) -> list[OperationRecord]:
        records = list(reversed(self.operations.values()))
        return records[:limit] if limit > 0 else records

    def _operation(self, op_id: str, kind: sm.OpKind, at_ms: float) -> OperationRecord:
        record = self.operations.get(op_id)
        if record is None:
            # An operation taken over from a previous coordinator ends without
            # having started here: it starts and ends at once.
            record = OperationRecord(op_id, kind, at_ms)
            self.operations[op_id] = record
            while len(self.operations) > OPERATIONS_KEPT:
                self.operations.popitem(last=False)
        return record
