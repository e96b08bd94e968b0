"""The recovery state machine is pure: events in, actions out. These tests play
the ranks themselves.

Part 1, scenarios: a small driver registers founders, kills ranks, rejoins
them, and checks each phase of the timeline, the pitfalls of the seed PR's
review (rank 0 recovered, state that re-triggers recovery, ranks that pause at
different iterations) and every refusal.

Part 2, a property test: a simulated cluster of 2..6 ranks whose ranks behave
like the real agent (worker_agent/agent.py) while hypothesis picks the order of
every delivery and injects faults. After every `handle()` the checker asserts
DESIGN.md's invariants (the numbers below are the invariant numbers); at the end
of every example the faults stop and the cluster must converge.
"""

from __future__ import annotations

import contextlib
import sys
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import Phase as HypothesisPhase
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from coordinator.plan import transfer_plan
from coordinator.state_machine import (
    DEFAULT_DEADLINES_S,
    DEFAULT_HANG_TIMEOUT_S,
    DEFAULT_LEASE_REBIND_S,
    DEFAULT_RECONNECT_WINDOW_S,
    HANG_CHECK_INTERVAL_S,
    MAX_LEARNED_HOLD_LEAD_S,
    PHASE_OF,
    STEP_FAILURE_WINDOW_S,
    Abort,
    AbortOperation,
    Accept,
    Acked,
    Action,
    AdminAnswered,
    AdminCommand,
    AdminRequested,
    Admit,
    ClusterRecord,
    Code,
    CommandBody,
    CommandFailed,
    Drain,
    Event,
    GroupsReady,
    Halted,
    Held,
    Hold,
    JoinerReady,
    LeaseExpired,
    LeaseRenewed,
    Leave,
    Operation,
    OperationEnded,
    OperationStarted,
    OpKind,
    PastTarget,
    Persist,
    Phase,
    PhaseEntered,
    Prefetch,
    ProgressReported,
    RankDone,
    RankFailed,
    RankRegistered,
    Rebuild,
    RecoveryStateMachine,
    Refuse,
    Reload,
    Reloaded,
    Reply,
    Resume,
    Resumed,
    Resync,
    Resynced,
    Retry,
    Role,
    Send,
    SessionClosed,
    SetAutoRejoin,
    Step,
    StepFailed,
    Tick,
    store_prefix,
)
from protos.types import CheckpointLoad, Placement

CLUSTER = "prod-a"
FP = "moe-16e/bf16/v1"

T = TypeVar("T")

# Property test size: each of the two runs takes ~10 s on the 2-core CI machine.
SIM_EXAMPLES = 300
SIM_STEPS = 60


def ring_placement(n: int, spr: int = 2, layers: int = 2, version: int = 1) -> Placement:
    """Expert e of a layer on global slots e, e + E, ... with E = n*spr // 2 >=
    spr: every expert on two distinct ranks, so any single rank can die."""
    total = n * spr
    experts = total // 2
    return Placement(
        version,
        spr,
        tuple(tuple((s + layer) % experts for s in range(total)) for layer in range(layers)),
    )


def full_placement(n: int, spr: int = 2, layers: int = 1) -> Placement:
    """Every rank holds every expert: any single member can serve a joiner."""
    return Placement(1, spr, tuple(tuple(range(spr)) * n for _ in range(layers)))


def stale_placement(n: int) -> Placement:
    """What a relaunched joiner may believe: an old version, another layout. The
    coordinator must never use it."""
    return Placement(0, 1, (tuple(range(n)),))


def of_type(actions: Iterable[object], kind: type[T]) -> list[T]:
    return [a for a in actions if isinstance(a, kind)]


def sent(actions: Iterable[object], kind: type[Any] | None = None) -> list[Send]:
    """The Send actions, optionally only those carrying a `kind` command."""
    return [a for a in of_type(actions, Send) if kind is None or isinstance(a.command, kind)]


def restamp(event: Event, session: str) -> Event:
    """The same message, sent on another session."""
    return replace(event, session=session)  # type: ignore[arg-type]


def stack_depth() -> int:
    frame: FrameType | None = sys._getframe()
    depth = 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def phases(actions: Iterable[object]) -> list[Phase]:
    return [a.phase for a in of_type(actions, PhaseEntered)]


# =============================================================================
# Part 1: scenarios
# =============================================================================


class Driver:
    """Plays the ranks of one cluster by hand and checks after every event
    that the last persisted record is the machine's record (invariant 5)."""

    def __init__(self, n: int, placement: Placement | None = None) -> None:
        self.n = n
        self.placement = placement or ring_placement(n)
        self.machine = RecoveryStateMachine(CLUSTER, n)
        self.now = 0.0
        self.sessions: dict[int, str] = {}
        self.incarnations: dict[int, str] = {}
        self.leases: dict[int, int] = {}
        self._gen = 0
        self.persisted = self.machine.record()

    def handle(self, event: Event) -> list[Action]:
        self.now += 0.01
        actions = self.machine.handle(event, self.now)
        records = [a.record for a in of_type(actions, Persist)]
        if records:
            self.persisted = records[-1]
        assert self.machine.record() == self.persisted
        return actions

    def register(
        self,
        rank: int,
        *,
        rejoin: bool = False,
        cluster: str = CLUSTER,
        fingerprint: str = FP,
        placement: Placement | None = None,
        incarnation: str | None = None,
        key_lease: int | None = None,
        proven: bool = True,
    ) -> list[Action]:
        """`key_lease`: the lease etcd says holds the rank's key (default: the
        hello's own, as for a real agent)."""
        self._gen += 1
        session = f"s{rank}.{self._gen}"
        incarnation = incarnation or f"inc{rank}.{self._gen}"
        lease = 100 + self._gen
        if placement is None:
            placement = stale_placement(self.n) if rejoin else self.placement
        actions = self.handle(
            RankRegistered(
                rank,
                session,
                cluster,
                incarnation,
                lease,
                fingerprint,
                rejoin,
                placement,
                lease if key_lease is None else key_lease,
                proven,
            )
        )
        if of_type(actions, Accept):
            self.sessions[rank] = session
            self.incarnations[rank] = incarnation
            self.leases[rank] = lease
        return actions

    def ack(self, send: Send, reply: Reply, **override: Any) -> list[Action]:
        fields: dict[str, Any] = {
            "rank": send.rank,
            "session": send.session,
            "epoch": send.epoch,
            "op_id": send.op_id,
            "command_id": send.command_id,
            "reply": reply,
        }
        fields.update(override)
        return self.handle(Acked(**fields))

    def ack_all(self, sends: Sequence[Send], reply: Callable[[Send], Reply]) -> list[Action]:
        out: list[Action] = []
        for s in sends:
            out += self.ack(s, reply(s))
        return out

    def progress(self, rank: int, iteration: int) -> list[Action]:
        return self.handle(ProgressReported(rank, self.sessions[rank], iteration, self.now))

    def form(self) -> None:
        out: list[Action] = []
        for r in range(self.n):
            out += self.register(r)
        resumes = sent(self.ack_all(sent(out, Rebuild), lambda s: GroupsReady()), Resume)
        self.ack_all(resumes, lambda s: Resumed())
        assert self.machine.phase == Phase.STEADY

    def kill(self, rank: int) -> list[Action]:
        """A confirmed death: the session breaks, then the lease expires."""
        out = self.handle(SessionClosed(rank, self.sessions[rank]))
        return out + self.handle(LeaseExpired(rank, self.leases[rank]))

    def shrink(self, actions: list[Action], last_completed: Callable[[Send], int]) -> None:
        """Carry out the shrink that `actions` started, to DEGRADED."""
        aborts = sent(actions, Abort)
        assert aborts, actions
        rebuilds = sent(self.ack_all(aborts, lambda s: Halted(last_completed(s))), Rebuild)
        resumes = sent(self.ack_all(rebuilds, lambda s: GroupsReady()), Resume)
        self.ack_all(resumes, lambda s: Resumed())

    def pause_for(self, rank: int) -> list[Send]:
        """Lose `rank`, shrink, rejoin it, and stop where the survivors are told
        to hold (PAUSING); the Hold orders."""
        self.shrink(self.kill(rank), lambda s: 7)
        self.register(rank, rejoin=True)
        holds = sent(self.ready(rank), Hold)
        assert holds and self.machine.phase == Phase.PAUSING
        return holds

    def rebuilds_for(self, rank: int) -> list[Send]:
        """The joiner says it is ready and the prefetch is carried out; the
        Rebuild orders that follow (everyone still serves)."""
        out = self.handle(JoinerReady(rank, self.sessions[rank]))
        rebuilds = sent(self.ack_all(sent(out, Prefetch), lambda s: Resynced()), Rebuild)
        assert rebuilds and self.machine.phase == Phase.REBUILDING
        return rebuilds

    def ready(self, rank: int) -> list[Action]:
        """The joiner says it is ready; the prefetch and the group build that
        follow (everyone serves meanwhile) are carried out."""
        out = self.handle(JoinerReady(rank, self.sessions[rank]))
        prefetches = sent(out, Prefetch)
        if not prefetches:
            return out
        assert self.machine.phase == Phase.ADMITTING
        out += self.ack_all(prefetches, lambda s: Resynced())
        rebuilds = sent(out, Rebuild)
        if not rebuilds:
            return out
        assert self.machine.phase == Phase.REBUILDING
        return out + self.ack_all(rebuilds, lambda s: GroupsReady())

    def grow(self, rank: int) -> dict[type[Any], list[Send]]:
        """Rejoin `rank` and carry the grow through; the sends of each step."""
        steps: dict[type[Any], list[Send]] = {}
        out = self.register(rank, rejoin=True)
        out += self.handle(JoinerReady(rank, self.sessions[rank]))
        steps[Prefetch] = sent(out, Prefetch)
        out += self.ack_all(steps[Prefetch], lambda s: Resynced())
        steps[Rebuild] = sent(out, Rebuild)
        out = self.ack_all(steps[Rebuild], lambda s: GroupsReady())
        steps[Hold] = sent(out, Hold)
        out = self.ack_all(steps[Hold], lambda s: Held(s.command.iteration))
        steps[Resync] = sent(out, Resync)
        out = self.ack_all(steps[Resync], lambda s: Resynced())
        steps[Resume] = sent(out, Resume)
        self.ack_all(steps[Resume], lambda s: Resumed())
        return steps


def test_a_resume_does_not_count_as_progress() -> None:
    # A joiner reported iteration 0 while it waited; after the resume it
    # reports the cluster's iteration. That jump is no rate: with it, the next
    # hold target would run far ahead (found by the fanout bench).
    d = Driver(4)
    d.form()
    for r in range(4):
        d.progress(r, 500)
    d.shrink(d.kill(3), lambda s: 500)
    d.register(3, rejoin=True)
    d.progress(3, 0)
    out = d.ready(3)
    out = d.ack_all(sent(out, Hold), lambda s: Held(s.command.iteration))
    resumes = sent(d.ack_all(sent(out, Resync), lambda s: Resynced()), Resume)
    d.ack_all(resumes, lambda s: Resumed())
    assert d.machine.phase == Phase.STEADY
    d.progress(3, resumes[0].command.iteration + 1)
    d.progress(3, resumes[0].command.iteration + 2)
    progress = d.machine.ranks[3].progress
    assert progress is not None and progress.rate < 1000  # 100 it/s at most here


def test_founders_form_epoch_1() -> None:
    d = Driver(4)
    out: list[Action] = []
    for r in range(3):
        out += d.register(r)
        assert d.machine.phase == Phase.FORMING
    assert not sent(out)  # nothing happens until every founder is there
    assert [a.role for a in of_type(out, Accept)] == [Role.MEMBER] * 3
    out = d.register(3)
    rebuilds = sent(out, Rebuild)
    assert sorted(s.rank for s in rebuilds) == [0, 1, 2, 3]
    op_id = rebuilds[0].op_id
    assert op_id.endswith("form")
    for s in rebuilds:
        assert s.command == Rebuild(1, (0, 1, 2, 3), store_prefix(CLUSTER, 1))
        assert (s.epoch, s.op_id, s.command_id) == (1, op_id, rebuilds[0].command_id)
    assert "epoch-1" in rebuilds[0].command.store_prefix
    out = d.ack_all(rebuilds, lambda s: GroupsReady())
    resumes = sent(out, Resume)
    assert [s.command for s in resumes] == [Resume(0, (0, 1, 2, 3))] * 4
    assert d.machine.epoch == 1  # committed just before RESUME is sent
    out = d.ack_all(resumes, lambda s: Resumed())
    assert phases(out) == [Phase.STEADY]
    ended = of_type(out, OperationEnded)
    assert [(e.kind, e.outcome, e.epoch, e.joined) for e in ended] == [
        (OpKind.FORM, "completed", 1, (0, 1, 2, 3))
    ]
    record = d.machine.record()
    assert (record.epoch, record.members, record.phase, record.operation) == (
        1,
        (0, 1, 2, 3),
        Phase.STEADY,
        None,
    )
    assert record.placement == d.placement


def test_kill_detected_by_session_and_peer_step_failure_shrinks_to_degraded() -> None:
    d = Driver(4)
    d.form()
    # The session alone is suspicion, not a verdict.
    out = d.handle(SessionClosed(2, d.sessions[2]))
    assert not of_type(out, RankFailed) and not sent(out)
    assert d.machine.rank_state(2) == "suspect"
    assert d.machine.phase == Phase.STEADY
    # A survivor's collective failing at the same epoch confirms it.
    out = d.handle(StepFailed(0, d.sessions[0], 1, 41, "all_to_all timed out"))
    assert [a.rank for a in of_type(out, RankFailed)] == [2]
    assert phases(out) == [Phase.HALTING]
    aborts = sent(out, Abort)
    assert sorted(s.rank for s in aborts) == [0, 1, 3]
    assert all(s.command == Abort(1) and s.epoch == 2 for s in aborts)
    out = d.ack_all(aborts, lambda s: Halted({0: 41, 1: 42, 3: 41}[s.rank]))
    assert phases(out) == [Phase.SHRINKING]
    rebuilds = sent(out, Rebuild)
    assert {s.command for s in rebuilds} == {Rebuild(2, (0, 1, 3), store_prefix(CLUSTER, 2))}
    out = d.ack_all(rebuilds, lambda s: GroupsReady())
    resumes = sent(out, Resume)
    # Everyone restarts from the cut: the smallest iteration any survivor completed.
    assert {s.command for s in resumes} == {Resume(41, (0, 1, 3))}
    assert d.machine.epoch == 2
    out = d.ack_all(resumes, lambda s: Resumed())
    assert phases(out) == [Phase.DEGRADED]
    assert d.machine.record().members == (0, 1, 3)
    assert d.machine.rank_state(2) == "failed"
    [ended] = of_type(out, OperationEnded)
    assert (ended.kind, ended.outcome, ended.left) == (OpKind.SHRINK, "completed", (2,))


def test_a_lease_that_expires_under_an_open_session_gets_the_rebind_window() -> None:
    """A frozen rank (SIGSTOP: its socket stays open) loses its lease and never
    binds a new one: it is failed once lease_rebind_s has passed, not before,
    and its session is ended so that its agent stops if it ever thaws."""
    d = Driver(3)
    d.form()
    assert d.handle(LeaseExpired(1, d.leases[1])) == []
    assert d.machine.rank_state(1) == "suspect"
    d.now += DEFAULT_LEASE_REBIND_S - 0.1
    assert d.handle(Tick()) == []  # still within the window
    d.now += 0.2
    out = d.handle(Tick())
    assert phases(out) == [Phase.HALTING]
    [ended] = [a for a in of_type(out, Refuse) if a.rank == 1]
    assert ended.end_session and "no new lease" in ended.message
    d.shrink(out, lambda s: 10)
    assert d.machine.phase == Phase.DEGRADED
    assert d.machine.record().members == (0, 2)
    # A late session-close of the dead rank changes nothing.
    assert d.handle(SessionClosed(1, d.sessions[1])) == []


def test_a_rank_that_binds_a_new_lease_in_time_stays_a_member() -> None:
    """An etcd outage expires every lease; the ranks live on, renew their
    leases and bind their open sessions to them: nobody is failed."""
    d = Driver(3)
    d.form()
    for r in range(3):
        assert d.handle(LeaseExpired(r, d.leases[r])) == []
    for r in range(3):
        d.leases[r] += 1000
        out = d.handle(LeaseRenewed(r, d.sessions[r], d.leases[r], d.leases[r]))
        assert not of_type(out, RankFailed)
    d.now += DEFAULT_LEASE_REBIND_S + 1
    assert d.handle(Tick()) == []
    assert [d.machine.rank_state(r) for r in range(3)] == ["serving"] * 3
    # The old leases' deletes arriving late change nothing either.
    assert d.handle(LeaseExpired(0, d.leases[0] - 1000)) == []
    # A renewal that names a lease that does not hold the key proves nothing.
    out = d.handle(LeaseExpired(2, d.leases[2]))
    out = d.handle(LeaseRenewed(2, d.sessions[2], 999, 998))
    assert [r.code for r in of_type(out, Refuse)] == [Code.PERMISSION_DENIED]
    assert d.machine.rank_state(2) == "suspect"


def test_a_report_on_a_session_that_no_longer_counts_is_told_to_stop() -> None:
    """A process whose rank was failed while it lived keeps reporting on its
    session (the ending refusal was lost): each report is answered with a
    refusal that ends the session, so the process stops instead of holding
    on. A report on a session nobody knows gets the same answer."""
    d = Driver(3)
    d.form()
    d.handle(LeaseExpired(1, d.leases[1]))
    d.now += DEFAULT_LEASE_REBIND_S + 1
    d.handle(Tick())
    assert d.machine.rank_state(1) == "failed"
    before = d.machine.record()
    out = d.handle(ProgressReported(1, d.sessions[1], 99, d.now))
    assert [(r.rank, r.session, r.end_session) for r in of_type(out, Refuse)] == [
        (1, d.sessions[1], True)
    ]
    assert "removed from the cluster" in out[0].message  # type: ignore[union-attr]
    assert d.machine.record() == before
    [refusal] = d.handle(ProgressReported(2, "s-unknown", 5, d.now))
    assert isinstance(refusal, Refuse) and "replaced" in refusal.message
    assert d.handle(ProgressReported(0, d.sessions[0], 5, d.now)) == []  # a live one: quiet


def test_a_lease_lost_and_then_a_closed_session_is_a_death_at_once() -> None:
    d = Driver(3)
    d.form()
    assert d.handle(LeaseExpired(1, d.leases[1])) == []
    out = d.handle(SessionClosed(1, d.sessions[1]))
    assert phases(out) == [Phase.HALTING]
    assert [f.rank for f in of_type(out, RankFailed)] == [1]


def test_rejoin_runs_the_whole_timeline_back_to_steady() -> None:
    d = Driver(4)
    d.form()
    d.shrink(d.kill(3), lambda s: 7)
    for r in (0, 1, 2):
        d.progress(r, 100 + r)
    out = d.register(3, rejoin=True)
    assert [a.role for a in of_type(out, Accept)] == [Role.JOINER]
    assert phases(out) == [Phase.ADMITTING]
    assert not sent(out)  # survivors keep serving while the joiner warms up
    out = d.handle(JoinerReady(3, d.sessions[3]))
    prefetches = sent(out, Prefetch)
    assert prefetches and not phases(out)  # still admitting: everyone serves
    out = d.ack_all(prefetches, lambda s: Resynced())
    # The next epoch's groups are built while everyone serves, before the pause.
    assert phases(out) == [Phase.REBUILDING]
    assert not sent(out, Hold)
    rebuilds = sent(out, Rebuild)
    assert {s.command for s in rebuilds} == {Rebuild(3, (0, 1, 2, 3), store_prefix(CLUSTER, 3))}
    out = d.ack_all(rebuilds, lambda s: GroupsReady())
    assert phases(out) == [Phase.PAUSING]
    holds = sent(out, Hold)
    assert sorted(s.rank for s in holds) == [0, 1, 2]  # not the joiner
    target = holds[0].command.iteration
    assert {s.command for s in holds} == {Hold(target)}
    assert target > 102
    out = d.ack_all(holds, lambda s: Held(target))
    assert phases(out) == [Phase.RESYNCING]
    resyncs = sent(out, Resync)
    assert sorted(s.rank for s in resyncs) == [0, 1, 2, 3]
    assert len({s.command for s in resyncs}) == 1  # one plan
    resync = resyncs[0].command
    assert resync.placement == d.placement  # the coordinator's, not the joiner's
    assert resync.plan == transfer_plan(d.placement, (0, 1, 2), (3,))
    assert d.machine.epoch == 2  # not committed before RESUME
    out = d.ack_all(resyncs, lambda s: Resynced())
    assert phases(out) == [Phase.RESUMING]
    resumes = sent(out, Resume)
    assert {s.command for s in resumes} == {Resume(target, (0, 1, 2, 3))}
    assert d.machine.epoch == 3
    out = d.ack_all(resumes, lambda s: Resumed(stall_ms=3.0))
    assert phases(out) == [Phase.STEADY]
    [ended] = of_type(out, OperationEnded)
    assert (ended.kind, ended.outcome, ended.epoch, ended.joined, ended.stall_ms) == (
        OpKind.GROW,
        "completed",
        3,
        (3,),
        3.0,
    )
    assert d.machine.rank_state(3) == "serving"
    assert d.machine.joiners == set()


def test_a_survivor_silent_past_the_pause_deadline_is_declared_hung() -> None:
    # Rank 2 is alive by its lease but never reaches the target (SIGSTOP, a
    # stuck collective). At the deadline it is failed, the admission rolls
    # back, and the others rebuild without it.
    d = Driver(4)
    d.form()
    holds = d.pause_for(3)
    target = holds[0].command.iteration
    for send in holds:
        if send.rank != 2:
            d.ack(send, Held(target))
    limit = DEFAULT_DEADLINES_S[Phase.PAUSING]
    assert limit is not None
    d.now += limit / 2
    assert d.handle(Tick()) == []  # before the deadline nothing moves
    d.now += limit
    out = d.handle(Tick())
    [failed] = of_type(out, RankFailed)
    assert failed.rank == 2 and "pausing passed its deadline" in failed.reason
    [ended] = of_type(out, OperationEnded)
    assert (ended.kind, ended.outcome) == (OpKind.GROW, "rolled_back")
    assert "waiting for ranks [2]" in ended.reason
    assert [s.rank for s in sent(out, Retry)] == [3]  # the joiner tries again later
    assert sorted(s.rank for s in sent(out, Abort)) == [0, 1]  # a shrink without 2
    assert d.machine.phase == Phase.HALTING


def test_a_survivor_still_iterating_at_the_pause_deadline_is_not_declared_hung() -> None:
    # Rank 1's engine runs on but its Held never came (the hold was retargeted
    # past it again and again, a slow fan-out): alive, not hung. Rank 2 is
    # silent. Only rank 2 is failed; the admission rolls back without failing 1.
    d = Driver(4)
    d.form()
    holds = d.pause_for(3)
    d.ack(next(s for s in holds if s.rank == 0), Held(holds[0].command.iteration))
    limit = DEFAULT_DEADLINES_S[Phase.PAUSING]
    assert limit is not None
    d.now += limit / 2
    d.progress(1, holds[0].command.iteration - 1)
    d.now += limit
    out = d.handle(Tick())
    assert [f.rank for f in of_type(out, RankFailed)] == [2]
    [ended] = of_type(out, OperationEnded)
    assert ended.outcome == "rolled_back" and "waiting for ranks [2]" in ended.reason
    assert "rank [1] iterating: not hung" in ended.reason
    assert sorted(s.rank for s in sent(out, Abort)) == [0, 1]  # 1 stays a member
    assert not d.machine.ranks[1].failed


def test_a_rollback_in_rebuilding_releases_the_abandoned_epochs_group_builds() -> None:
    # A survivor dies while the others build the admission's groups (epoch 3);
    # they wait in that build for it. The rollback's Abort must cover epoch 3,
    # not only the committed epoch 2, or they wait out the group timeout and
    # miss the halting deadline (seen in the soak: the whole cluster failed).
    d = Driver(4)
    d.form()
    d.shrink(d.kill(3), lambda s: 7)
    d.register(3, rejoin=True)
    rebuilds = d.rebuilds_for(3)
    assert {s.command.epoch for s in rebuilds} == {3}
    out = d.kill(2)
    aborts = sent(out, Abort)
    assert sorted(s.rank for s in aborts) == [0, 1]
    assert {s.command.epoch for s in aborts} == {3}
    assert all(s.epoch == 4 for s in aborts)


def test_survivors_without_every_expert_reload_it_instead_of_shrinking_in_a_loop() -> None:
    # Ranks 0 and 2 hold the only replicas of experts 0 and 1 (the ring
    # placement). A plain shrink to the others would fail at its resume, then
    # roll back to another shrink, forever (seen in the soak: 140 shrinks a
    # second). The shrink re-lays the lost experts onto the survivors instead
    # (RELOAD) and completes once; with no slot to spare the cluster is lost
    # (test_a_shrink_that_cannot_spare_a_slot_for_a_lost_expert_loses_the_cluster).
    d = Driver(4)
    d.form()
    d.shrink(d.kill(0), lambda s: 7)
    out = d.kill(2)
    rebuilds = sent(d.ack_all(sent(out, Abort), lambda s: Halted(7)), Rebuild)
    reloads = sent(d.ack_all(rebuilds, lambda s: GroupsReady()), Reload)
    assert sorted(s.rank for s in reloads) == [1, 3]
    resumes = sent(d.ack_all(reloads, lambda s: Reloaded()), Resume)
    d.ack_all(resumes, lambda s: Resumed())
    assert d.machine.phase == Phase.DEGRADED and d.machine.op is None
    assert d.machine.members == (1, 3) and d.machine.epoch == 3


def test_a_member_not_yet_back_after_a_take_over_is_not_convicted_by_a_failed_step() -> None:
    # After a take-over every member is suspect until it reconnects. One real
    # death makes its peers' steps fail; that must convict only a member whose
    # session closed, not every member still on its way to the new leader
    # (seen in the soak: three of four ranks failed at once).
    d = Driver(4)
    d.form()
    _take_over(d, [0, 1, 2, 3])
    for r in (0, 2):
        d.register(r, incarnation=d.incarnations[r])
    out = d.handle(StepFailed(2, d.sessions[2], d.machine.epoch, 10, "gloo: peer 3 closed"))
    assert of_type(out, RankFailed) == []
    assert d.machine.members == (0, 1, 2, 3)


def _run_to(d: Driver, iterations: dict[int, int], seconds: float) -> None:
    """Each rank in `iterations` reports its way there, spread over `seconds`."""
    for step in range(1, 11):
        d.now += seconds / 10
        for rank, last in iterations.items():
            d.progress(rank, 10 + (last - 10) * step // 10)


def test_a_member_stuck_while_its_peers_run_on_is_declared_hung() -> None:
    # Rank 2's engine thread is stuck (its agent and lease are alive); the
    # others keep going (an engine not in lockstep). After the hang timeout,
    # it is failed like a dead rank, told to stop, and the others shrink.
    d = Driver(4)
    d.form()
    _run_to(d, {r: 10 for r in range(4)}, 0.1)
    _run_to(d, {0: 400, 1: 400, 3: 400}, DEFAULT_HANG_TIMEOUT_S / 2)
    assert d.handle(Tick()) == []  # silent, but not for long enough yet
    _run_to(d, {0: 800, 1: 800, 3: 800}, DEFAULT_HANG_TIMEOUT_S / 2 + 1)
    out = d.handle(Tick())
    [failed] = of_type(out, RankFailed)
    assert failed.rank == 2 and "no progress for 30 s past iteration 10" in failed.reason
    [ended] = of_type(out, Refuse)
    assert (ended.rank, ended.session, ended.end_session) == (2, d.sessions[2], True)
    assert ended.code == Code.FAILED_PRECONDITION and "declared hung" in ended.message
    assert sorted(s.rank for s in sent(out, Abort)) == [0, 1, 3]
    assert d.machine.phase == Phase.HALTING


def test_the_hang_scan_runs_at_most_once_a_second() -> None:
    # Each scan visits every member: at 1,024 ranks, one per Tick (4 a second)
    # was a sixth of the coordinator's idle CPU. The timeout is 30 s.
    d = Driver(4)
    d.form()
    _run_to(d, {r: 10 for r in range(4)}, 0.1)
    _run_to(d, {0: 800, 1: 800, 3: 800}, DEFAULT_HANG_TIMEOUT_S / 2)
    progress = d.machine.ranks[2].progress
    assert progress is not None
    d.now = progress.at + DEFAULT_HANG_TIMEOUT_S - 0.2
    assert d.handle(Tick()) == []  # a scan: rank 2 not silent for long enough yet
    scanned_at = d.now
    d.now = progress.at + DEFAULT_HANG_TIMEOUT_S + 0.1
    assert d.handle(Tick()) == []  # silent long enough, but no scan is due
    d.now = scanned_at + HANG_CHECK_INTERVAL_S
    [failed] = of_type(d.handle(Tick()), RankFailed)
    assert failed.rank == 2


def test_in_lockstep_the_member_whose_step_did_not_fail_is_the_hung_one() -> None:
    # In EP lockstep the peers of a stuck rank block in their next collective
    # and nobody's iteration moves; their collectives time out and they report
    # failed steps. The one that reported nothing is stuck.
    d = Driver(4)
    d.form()
    _run_to(d, {r: 10 for r in range(4)}, 0.1)
    for rank in (0, 1, 3):
        d.handle(StepFailed(rank, d.sessions[rank], d.machine.epoch, 10, "gloo timeout"))
    assert d.machine.phase == Phase.STEADY  # a failed step alone convicts no one
    d.now += DEFAULT_HANG_TIMEOUT_S + 1
    out = d.handle(Tick())
    assert [f.rank for f in of_type(out, RankFailed)] == [2]
    assert d.machine.phase == Phase.HALTING


def test_a_peer_whose_failure_report_is_late_is_not_taken_for_the_hung_one() -> None:
    # Ranks 0 and 1 report their timed-out collective; rank 3's report is
    # still on its way (a loaded host). Rank 3 is as silent as the stuck rank
    # 2 but must not be failed with it: the check waits for the stragglers.
    d = Driver(4)
    d.form()
    _run_to(d, {r: 10 for r in range(4)}, 0.1)
    d.now += DEFAULT_HANG_TIMEOUT_S + 1  # everyone silent, nobody failed yet
    assert d.handle(Tick()) == []
    for rank in (0, 1):
        d.handle(StepFailed(rank, d.sessions[rank], d.machine.epoch, 10, "gloo timeout"))
    d.now += DEFAULT_HANG_TIMEOUT_S / 2
    assert d.handle(Tick()) == []  # the reports are too fresh to trust yet
    d.handle(StepFailed(3, d.sessions[3], d.machine.epoch, 10, "gloo timeout"))
    d.now += DEFAULT_HANG_TIMEOUT_S / 2 + 1
    out = d.handle(Tick())
    assert [f.rank for f in of_type(out, RankFailed)] == [2]
    assert d.machine.phase == Phase.HALTING


def test_an_idle_cluster_is_not_hung_and_the_check_can_be_off() -> None:
    d = Driver(4)
    d.form()
    _run_to(d, {r: 10 for r in range(4)}, 0.1)
    d.now += 100 * DEFAULT_HANG_TIMEOUT_S  # nobody moves: no requests
    assert d.handle(Tick()) == []
    off = Driver(4)
    off.machine.hang_timeout_s = None
    off.form()
    _run_to(off, {r: 10 for r in range(4)}, 0.1)
    _run_to(off, {0: 900, 1: 900, 3: 900}, 2 * DEFAULT_HANG_TIMEOUT_S)
    assert off.handle(Tick()) == []


def test_silence_counts_from_the_end_of_the_last_operation() -> None:
    # Held ranks report nothing; a shrink whose halt took longer than the hang
    # timeout must not make the slowest reporter look hung right after it.
    d = Driver(4)
    d.form()
    _run_to(d, {r: 10 for r in range(4)}, 0.1)
    out = d.kill(3)
    d.now += DEFAULT_HANG_TIMEOUT_S + 10
    d.shrink(out, lambda s: 10)
    assert d.machine.phase == Phase.DEGRADED
    d.progress(0, 13)
    d.progress(1, 13)
    assert d.handle(Tick()) == []  # rank 2 has not reported since the resume yet
    assert d.machine.phase == Phase.DEGRADED


def test_no_deadline_while_a_joiner_loads_and_deadlines_are_configurable() -> None:
    d = Driver(4)
    d.form()
    d.shrink(d.kill(3), lambda s: 7)
    d.register(3, rejoin=True)
    assert d.machine.phase == Phase.ADMITTING
    d.now += 10_000
    assert d.handle(Tick()) == []  # admitting has no deadline by default
    machine = RecoveryStateMachine(CLUSTER, 4, deadlines_s={Phase.ADMITTING: 5.0})
    assert machine.deadlines_s[Phase.ADMITTING] == 5.0
    assert machine.deadlines_s[Phase.PAUSING] == DEFAULT_DEADLINES_S[Phase.PAUSING]


def _take_over(d: Driver, live: list[int], **settings: Any) -> list[Action]:
    """A new coordinator (`settings`: its machine's) restores what the old one
    persisted; `live` ranks' keys are still in etcd. The Driver goes on with
    the new machine."""
    record = ClusterRecord.from_json(d.persisted.to_json())
    assert record == d.persisted
    d.machine = RecoveryStateMachine(CLUSTER, d.n, **settings)
    d.now += 1.0
    out = d.machine.restore(record, {r: (d.incarnations[r], d.leases[r]) for r in live}, d.now)
    d.persisted = [a.record for a in of_type(out, Persist)][-1]
    return out


def test_a_new_coordinator_takes_over_a_steady_cluster_without_a_recovery() -> None:
    d = Driver(4)
    d.form()
    out = _take_over(d, [0, 1, 2, 3])
    assert phases(out) == [Phase.STEADY] and not sent(out)
    assert (d.machine.epoch, d.machine.members) == (1, (0, 1, 2, 3))
    # Every rank reconnects (same process, same lease) and stays a member.
    for r in range(4):
        out = d.register(r, incarnation=d.incarnations[r])
        assert [(a.rank, a.role) for a in of_type(out, Accept)] == [(r, Role.MEMBER)]
        assert not sent(out)
    assert d.machine.phase == Phase.STEADY and d.machine.op is None
    # And the next failure is handled as usual, with fresh command ids.
    before = d.persisted.next_command_id
    aborts = sent(d.kill(2), Abort)
    assert sorted(a.rank for a in aborts) == [0, 1, 3]
    assert all(a.command_id >= before for a in aborts)


def test_a_new_coordinator_rolls_back_an_admission_in_flight_under_its_id() -> None:
    d = Driver(4)
    d.form()
    holds = d.pause_for(3)
    op_id = holds[0].op_id
    assert d.persisted.phase == Phase.PAUSING
    out = _take_over(d, [0, 1, 2, 3])
    [ended] = of_type(out, OperationEnded)
    assert (ended.op_id, ended.outcome) == (op_id, "rolled_back")
    assert "coordinator restarted during pausing" in ended.reason
    assert d.machine.phase == Phase.HALTING  # survivors (maybe held) rebuild epoch 2's set
    assert d.machine.members == (0, 1, 2)
    # The abort reaches each survivor when it reconnects; it covers the
    # abandoned admission's epoch (3) too, whose groups may be half built.
    for r in (0, 1, 2):
        out = d.register(r, incarnation=d.incarnations[r])
        assert [s.command for s in sent(out)] == [Abort(3)]
        d.ack(sent(out)[0], Halted(7))
    assert d.machine.phase == Phase.SHRINKING


def test_a_member_whose_key_vanished_while_no_coordinator_ran_is_failed() -> None:
    d = Driver(4)
    d.form()
    out = _take_over(d, [0, 1, 3])
    # It may be renewing a lease an etcd outage took: the window first.
    assert not of_type(out, RankFailed) and d.machine.phase == Phase.STEADY
    d.now += DEFAULT_RECONNECT_WINDOW_S - 0.1
    assert not of_type(d.handle(Tick()), RankFailed)
    d.now += 0.2
    out = d.handle(Tick())
    assert [f.rank for f in of_type(out, RankFailed)] == [2]
    assert d.machine.phase == Phase.HALTING


def test_a_member_relaunched_while_no_coordinator_led_is_a_joiner_not_a_member() -> None:
    """Rank 3 died and its supervisor relaunched it (--rejoin) while the leader
    was frozen: its key now names the new process. The new leader must not
    take that process for the member (its engine has none of the state; its
    Halted(0) once set the shrink's cut to 0 and looped the cluster)."""
    d = Driver(4)
    d.form()
    d.kill(3)
    relaunched = "inc3.relaunched"
    record = ClusterRecord.from_json(d.persisted.to_json())
    d.machine = RecoveryStateMachine(CLUSTER, 4)
    live = {r: (d.incarnations[r], d.leases[r]) for r in (0, 1, 2)}
    out = d.machine.restore(record, {**live, 3: (relaunched, 999)}, d.now)
    d.persisted = [a.record for a in of_type(out, Persist)][-1]
    assert [(f.rank, f.reason) for f in of_type(out, RankFailed)] == [
        (3, "replaced by a new incarnation while no coordinator ran")
    ]
    assert sorted(s.rank for s in sent(out, Abort)) == []  # survivors reconnect first
    assert d.machine.op is not None and d.machine.op.survivors == (0, 1, 2)
    out = d.register(3, rejoin=True, incarnation=relaunched)
    assert [(a.rank, a.role) for a in of_type(out, Accept)] == [(3, Role.JOINER)]


def test_a_member_whose_key_vanished_comes_back_with_a_new_lease() -> None:
    """An etcd outage took rank 2's lease while no coordinator led; the new
    leader knows its incarnation from the record and takes it back."""
    d = Driver(4)
    d.form()
    _take_over(d, [0, 1, 3])
    for r in range(4):
        out = d.register(r, incarnation=d.incarnations[r])  # rank 2: a new lease
        assert [(a.rank, a.role) for a in of_type(out, Accept)] == [(r, Role.MEMBER)]
    d.now += DEFAULT_RECONNECT_WINDOW_S + 1
    assert d.handle(Tick()) == []
    assert d.machine.phase == Phase.STEADY and d.machine.members == (0, 1, 2, 3)


def test_a_new_leader_waits_for_the_members_before_a_deadline_convicts_them() -> None:
    """The leader froze during a shrink's halt; the new one waits the
    reconnection window before its deadline declares the silent ones hung."""
    d = Driver(4)
    d.form()
    d.kill(3)  # halting: waiting for the survivors' Halted
    _take_over(d, [0, 1, 2], deadlines_s={Phase.HALTING: 2.0}, reconnect_window_s=5.0)
    d.now += 2.5
    assert not of_type(d.handle(Tick()), RankFailed)
    d.now += 3.0
    assert [f.rank for f in of_type(d.handle(Tick()), RankFailed)] == [0, 1, 2]


def test_a_record_of_another_cluster_is_refused() -> None:
    d = Driver(4)
    d.form()
    other = RecoveryStateMachine("other", 4)
    with pytest.raises(ValueError, match="persisted record is for cluster"):
        other.restore(d.persisted, {}, 0.0)
    with pytest.raises(ValueError, match="unreadable cluster record"):
        ClusterRecord.from_json(b'{"cluster": "x"}')


def _admin(d: Driver, request_id: str, command: Any) -> tuple[AdminAnswered, list[Action]]:
    out = d.handle(AdminRequested(request_id, command))
    [answer] = of_type(out, AdminAnswered)
    return answer, out


def test_an_operator_aborts_an_admission_and_a_retry_changes_nothing() -> None:
    d = Driver(4)
    d.form()
    holds = d.pause_for(3)
    op_id = holds[0].op_id
    answer, _ = _admin(d, "r1", SetAutoRejoin(False))
    assert answer.code is None and d.persisted.auto_rejoin is False
    answer, out = _admin(d, "r2", AbortOperation(op_id, "bad weights"))
    assert (answer.code, answer.replayed) == (None, False)
    [ended] = of_type(out, OperationEnded)
    assert (ended.op_id, ended.outcome) == (op_id, "rolled_back")
    assert "aborted by an operator: bad weights" in ended.reason
    assert [s.rank for s in sent(out, Retry)] == [3]
    record = d.persisted
    # The retry of the same call: the same answer, nothing else.
    again, out = _admin(d, "r2", AbortOperation(op_id, "bad weights"))
    assert (again.code, again.message, again.replayed) == (None, answer.message, True)
    assert out == [again] and d.persisted == record
    # The same id for another request is refused.
    other, out = _admin(d, "r2", SetAutoRejoin(True))
    assert other.code == Code.INVALID_ARGUMENT and out == [other]
    # The survivors rebuild without the joiner; with automatic rejoin off it
    # then waits, registered and ready, until an operator turns it back on.
    assert d.machine.op is not None and d.machine.op.kind == OpKind.SHRINK


def test_aborting_what_cannot_be_aborted_is_refused_and_changes_nothing() -> None:
    d = Driver(4)
    d.form()
    record = d.persisted
    answer, out = _admin(d, "a", AbortOperation("nope"))
    assert answer.code == Code.NOT_FOUND and "not in flight" in answer.message
    assert out == [answer] and d.persisted == record
    shrink_op = sent(d.kill(1), Abort)[0].op_id
    record = d.persisted
    answer, out = _admin(d, "b", AbortOperation(shrink_op))
    assert answer.code == Code.FAILED_PRECONDITION and "cannot be aborted" in answer.message
    assert out == [answer] and d.persisted == record
    answer, out = _admin(d, "", SetAutoRejoin(False))
    assert answer.code == Code.INVALID_ARGUMENT and d.persisted == record


def _drain(d: Driver, rank: int, request_id: str = "drain") -> tuple[str, list[Send]]:
    """An operator drains `rank` of an idle cluster; (the op id, the Hold orders)."""
    answer, out = _admin(d, request_id, Drain(rank))
    assert answer.code is None, answer
    assert phases(out) == [Phase.PAUSING]
    return answer.op_id, sent(out, Hold)


def _complete_drain(d: Driver, holds: list[Send]) -> list[Action]:
    """Carry a drain from its Hold orders to its end; every action on the way."""
    target = holds[0].command.iteration
    out = d.ack_all(holds, lambda s: Held(target))
    resumes = sent(d.ack_all(sent(out, Rebuild), lambda s: GroupsReady()), Resume)
    return d.ack_all(resumes, lambda s: Resumed(stall_ms=2.0))


def test_an_operator_drains_a_member_everyone_holds_at_one_cut_and_it_leaves() -> None:
    d = Driver(4)
    d.form()
    for r in range(4):
        d.progress(r, 50 + r)
    answer, out = _admin(d, "d1", Drain(3))
    assert (answer.code, answer.replayed) == (None, False)
    [started] = of_type(out, OperationStarted)
    assert answer.op_id == started.op_id and started.op_id.endswith("-drain")
    assert (started.kind, started.epoch, started.target_epoch) == (OpKind.DRAIN, 1, 2)
    assert (started.survivors, started.joining, started.leaving) == ((0, 1, 2), (), (3,))
    assert phases(out) == [Phase.PAUSING]
    # The drained rank holds too: it is in the old groups, and stopping it at
    # the same boundary leaves no peer inside a collective with it.
    holds = sent(out, Hold)
    assert sorted(s.rank for s in holds) == [0, 1, 2, 3]
    target = holds[0].command.iteration
    assert {s.command for s in holds} == {Hold(target)} and target > 53
    out = d.ack_all(holds, lambda s: Held(target))
    assert phases(out) == [Phase.SHRINKING]
    assert sorted((a.rank, a.step, a.outcome) for a in of_type(out, RankDone)) == [
        (r, Step.HOLD, "done") for r in range(4)
    ]
    rebuilds = sent(out, Rebuild)
    assert {s.command for s in rebuilds} == {Rebuild(2, (0, 1, 2), store_prefix(CLUSTER, 2))}
    assert sorted(s.rank for s in rebuilds) == [0, 1, 2]
    out = d.ack_all(rebuilds, lambda s: GroupsReady())
    assert {(s.rank, s.command) for s in sent(out, Resume)} == {
        (r, Resume(target, (0, 1, 2))) for r in (0, 1, 2)
    }
    [leave] = sent(out, Leave)
    assert (leave.rank, leave.epoch, leave.op_id) == (3, 2, started.op_id)
    assert "drained by an operator" in leave.command.reason
    assert (d.persisted.epoch, d.persisted.members, d.persisted.drained) == (2, (0, 1, 2), (3,))
    out = d.ack_all(sent(out, Resume), lambda s: Resumed(stall_ms=2.0))
    assert phases(out) == [Phase.DEGRADED]
    [ended] = of_type(out, OperationEnded)
    assert (ended.kind, ended.outcome, ended.epoch, ended.left) == (
        OpKind.DRAIN,
        "completed",
        2,
        (3,),
    )
    # Its agent stops: the session ends and the lease is revoked. Neither is a
    # failure, and nothing starts.
    assert d.handle(SessionClosed(3, d.sessions[3])) == []
    assert d.handle(LeaseExpired(3, d.leases[3])) == []
    assert d.machine.rank_state(3) == "drained"
    # The same call again: the first answer, nothing else.
    record = d.persisted
    again, out = _admin(d, "d1", Drain(3))
    assert (again.code, again.op_id, again.replayed) == (None, started.op_id, True)
    assert out == [again] and d.persisted == record


def test_a_drained_rank_waits_for_an_admit_even_with_automatic_rejoin_on() -> None:
    d = Driver(4)
    d.form()
    _, holds = _drain(d, 2)
    _complete_drain(d, holds)
    assert d.machine.auto_rejoin
    # While the drained process lives, a second one for its rank is refused.
    [refused] = of_type(d.register(2, rejoin=True), Refuse)
    assert refused.code == Code.ALREADY_EXISTS
    d.handle(SessionClosed(2, d.sessions[2]))  # it left
    out = d.register(2, rejoin=True)
    assert [a.role for a in of_type(out, Accept)] == [Role.JOINER]
    assert not of_type(out, OperationStarted) and d.machine.phase == Phase.DEGRADED
    out = d.ready(2)
    assert out == [] and d.machine.op is None
    assert d.machine.rank_state(2) == "joining" and d.machine.ranks[2].ready
    answer, out = _admin(d, "a1", Admit(2))
    assert answer.code is None and "admitting rank 2" in answer.message
    [started] = of_type(out, OperationStarted)
    assert (started.kind, started.joining, answer.op_id) == (OpKind.GROW, (2,), started.op_id)
    assert d.persisted.drained == ()  # the operator took it back
    out = d.ack_all(sent(out, Prefetch), lambda s: Resynced())
    out = d.ack_all(sent(out, Rebuild), lambda s: GroupsReady())
    holds = sent(out, Hold)
    assert sorted(s.rank for s in holds) == [0, 1, 3]
    out = d.ack_all(holds, lambda s: Held(s.command.iteration))
    out = d.ack_all(sent(out, Resync), lambda s: Resynced())
    out = d.ack_all(sent(out, Resume), lambda s: Resumed())
    assert d.machine.phase == Phase.STEADY and d.machine.members == (0, 1, 2, 3)


def test_a_drained_process_reconnecting_is_refused() -> None:
    # Its Leave was lost with its session: the hello of the same process is
    # refused, which stops its agent.
    d = Driver(3, full_placement(3))
    d.form()
    _, holds = _drain(d, 1)
    target = holds[0].command.iteration
    out = d.ack_all(holds, lambda s: Held(target))
    d.handle(SessionClosed(1, d.sessions[1]))  # after its Held: the cut is safe
    out = d.ack_all(sent(out, Rebuild), lambda s: GroupsReady())
    assert not sent(out, Leave)  # no session to send it on
    d.ack_all(sent(out, Resume), lambda s: Resumed())
    out = d.register(1, incarnation=d.incarnations[1])
    [refused] = of_type(out, Refuse)
    assert refused.code == Code.FAILED_PRECONDITION and refused.end_session
    assert "was drained" in refused.message
    assert d.machine.rank_state(1) == "drained" and not of_type(out, RankFailed)


def test_a_removed_member_that_comes_back_with_rejoin_is_refused_not_readmitted() -> None:
    # Rank 1 is a relaunched process (--rejoin), admitted. Then it is cut off
    # (its session and its lease go silent, a partition) and the others
    # shrink without it. When the partition heals, that same process
    # reconnects, still with --rejoin and its lease renewed: it must be
    # refused (its agent stops), not admitted again as if it were a fresh
    # relaunch. A relaunch (a new incarnation) is admitted; and a coordinator
    # that takes over later refuses the removed process too.
    d = Driver(4)
    d.form()
    d.shrink(d.kill(1), lambda s: 7)
    d.grow(1)
    removed = d.incarnations[1]
    assert d.machine.members == (0, 1, 2, 3)
    out = d.handle(LeaseExpired(1, d.leases[1]))  # session still open: suspect
    for _ in range(int(DEFAULT_LEASE_REBIND_S / 0.01) + 2):
        out += d.handle(Tick())
    assert [f.reason for f in of_type(out, RankFailed)] == [
        f"lease expired and no new lease within {DEFAULT_LEASE_REBIND_S:g} s"
    ]
    d.shrink(out, lambda s: 9)
    assert d.machine.members == (0, 2, 3) and d.persisted.removed == ((1, removed),)

    out = d.register(1, rejoin=True, incarnation=removed)
    [refused] = of_type(out, Refuse)
    assert refused.code == Code.FAILED_PRECONDITION and refused.end_session
    assert "was removed" in refused.message and "relaunch rank 1" in refused.message
    assert not of_type(out, Accept) and 1 not in d.machine.joiners

    _take_over(d, [0, 2, 3])
    for r in (0, 2, 3):
        d.register(r, incarnation=d.incarnations[r])
    out = d.register(1, rejoin=True, incarnation=removed)
    assert of_type(out, Refuse) and not of_type(out, Accept)
    d.grow(1)  # a relaunch: a new incarnation
    assert d.machine.members == (0, 1, 2, 3)


def test_a_joiner_whose_session_blipped_before_admission_may_register_again() -> None:
    # Only members are removed for good: a joiner that lost its session
    # before it was admitted served nobody, and comes back as a joiner.
    d = Driver(4)
    d.form()
    d.shrink(d.kill(3), lambda s: 7)
    d.register(3, rejoin=True)
    joiner = d.incarnations[3]
    d.handle(SessionClosed(3, d.sessions[3]))
    out = d.register(3, rejoin=True, incarnation=joiner)
    assert [(a.rank, a.role) for a in of_type(out, Accept)] == [(3, Role.JOINER)]
    assert d.machine.removed.get(3) != joiner  # only the member it replaced


def test_a_survivor_dying_during_a_drain_rolls_it_back_and_the_rank_stays() -> None:
    d = Driver(4, full_placement(4))
    d.form()
    op_id, holds = _drain(d, 3)
    d.ack(holds[0], Held(holds[0].command.iteration))
    out = d.kill(1)
    [ended] = of_type(out, OperationEnded)
    assert (ended.op_id, ended.outcome, ended.left) == (op_id, "rolled_back", ())
    aborts = sent(out, Abort)
    assert sorted(s.rank for s in aborts) == [0, 2, 3]  # 3 is still a member
    d.shrink(out, lambda s: 9)
    assert (d.machine.members, d.persisted.drained) == ((0, 2, 3), ())


def test_the_drained_rank_dying_before_the_cut_turns_the_drain_into_a_shrink() -> None:
    d = Driver(4)
    d.form()
    op_id, holds = _drain(d, 3)
    for s in holds:
        if s.rank != 3:
            d.ack(s, Held(s.command.iteration))
    out = d.kill(3)  # its peers may be stuck in a collective with it
    [ended] = of_type(out, OperationEnded)
    assert (ended.op_id, ended.outcome) == (op_id, "rolled_back")
    assert [f.rank for f in of_type(out, RankFailed)] == [3]
    assert sorted(s.rank for s in sent(out, Abort)) == [0, 1, 2]
    d.shrink(out, lambda s: 9)
    assert d.machine.members == (0, 1, 2) and d.machine.rank_state(3) == "failed"
    # It died rather than leaving: a relaunch is admitted as any failed rank is.
    d.register(3, rejoin=True)
    assert d.machine.phase == Phase.ADMITTING


def test_an_operator_aborts_a_drain_and_everyone_goes_on_together() -> None:
    d = Driver(4)
    d.form()
    op_id, _ = _drain(d, 0)
    answer, out = _admin(d, "ab", AbortOperation(op_id, "changed my mind"))
    assert (answer.code, answer.op_id) == (None, op_id)
    assert sorted(s.rank for s in sent(out, Abort)) == [0, 1, 2, 3]
    d.shrink(out, lambda s: 12)
    assert d.machine.members == (0, 1, 2, 3) and d.persisted.drained == ()
    assert d.machine.phase == Phase.STEADY


def test_a_new_coordinator_keeps_a_drained_rank_out() -> None:
    d = Driver(4)
    d.form()
    _, holds = _drain(d, 3)
    _complete_drain(d, holds)
    d.handle(SessionClosed(3, d.sessions[3]))
    _take_over(d, [0, 1, 2])
    assert d.machine.drained == {3} and d.machine.rank_state(3) == "drained"
    for r in (0, 1, 2):
        d.register(r, incarnation=d.incarnations[r])
    d.register(3, rejoin=True)
    d.ready(3)
    assert d.machine.op is None and d.machine.phase == Phase.DEGRADED


def _refused(d: Driver, request_id: str, command: AdminCommand, code: Code, *words: str) -> None:
    """The call is refused with `code`, a message containing `words`, and no change."""
    record, before = d.persisted, d.machine.record()
    answer, out = _admin(d, request_id, command)
    assert out == [answer] and d.persisted == record and d.machine.record() == before
    assert answer.code == code, answer
    for word in words:
        assert word in answer.message, (word, answer.message)


def test_drain_and_admit_refusals_name_the_problem_and_change_nothing() -> None:
    forming = Driver(4)
    forming.register(0)
    _refused(forming, "f1", Drain(0), Code.FAILED_PRECONDITION, "has not formed", "rank 0")
    _refused(forming, "f2", Admit(1), Code.FAILED_PRECONDITION, "rank 1", "not waiting")

    d = Driver(4)
    d.form()

    def refused(request_id: str, command: AdminCommand, code: Code, *words: str) -> None:
        _refused(d, request_id, command, code, *words)

    for bad in (-1, 4, 2**63, -(2**63)):
        refused(f"o{bad}", Drain(bad), Code.INVALID_ARGUMENT, f"rank {bad}", "outside")
        refused(f"p{bad}", Admit(bad), Code.INVALID_ARGUMENT, f"rank {bad}", "outside")
    refused("m", Admit(0), Code.FAILED_PRECONDITION, "already a member")
    # A suspect member: its fate decides the next operation.
    d.handle(SessionClosed(2, d.sessions[2]))
    refused("s", Drain(0), Code.FAILED_PRECONDITION, "[2]", "not yet confirmed")
    out = d.handle(LeaseExpired(2, d.leases[2]))
    op = d.machine.op
    assert op is not None
    refused("busy", Drain(0), Code.FAILED_PRECONDITION, op.op_id, "in flight")
    d.shrink(out, lambda s: 3)
    refused("nm", Drain(2), Code.NOT_FOUND, "rank 2", "not a member", "failed")
    refused("fa", Admit(2), Code.FAILED_PRECONDITION, "rank 2", "not waiting")
    # Ring placement over 4 ranks: ranks 0 and 2 hold experts 0 and 1; with 2
    # gone, rank 0 holds their only replica.
    refused("lost", Drain(0), Code.FAILED_PRECONDITION, "expert 0 of layer 0", "no replica")
    answer, _ = _admin(d, "off", SetAutoRejoin(False))
    assert answer.code is None
    d.register(2, rejoin=True)
    refused("nr", Admit(2), Code.FAILED_PRECONDITION, "rank 2", "not announced it is ready")
    d.ready(2)
    answer, _ = _admin(d, "ok", Admit(2))
    assert answer.code is None

    # The last member cannot be drained.
    two = Driver(2, full_placement(2))
    two.form()
    _, holds = _drain(two, 1)
    _complete_drain(two, holds)
    answer, out = _admin(two, "last", Drain(0))
    assert answer.code == Code.FAILED_PRECONDITION and "last member" in answer.message


def test_an_operations_actions_tell_its_start_and_each_ranks_part() -> None:
    d = Driver(3, full_placement(3))
    d.form()
    d.shrink(d.kill(2), lambda s: 5)
    out = d.register(2, rejoin=True)
    [started] = of_type(out, OperationStarted)
    assert (started.kind, started.survivors, started.joining) == (OpKind.GROW, (0, 1), (2,))
    out = d.ready(2)
    ready, *done = of_type(out, RankDone)
    prefetched = [r for r in done if r.step == Step.PREFETCH]
    built = [r for r in done if r.step == Step.REBUILD]
    # Then the next epoch's groups, by every participant, still while serving.
    assert {(r.rank, r.outcome) for r in built} == {(rank, "done") for rank in (0, 1, 2)}
    assert (ready.op_id, ready.rank, ready.step, ready.outcome) == (
        started.op_id,
        2,
        Step.WAIT_READY,
        "done",
    )
    # The prefetch: the joiner and its sources, while the survivors serve.
    assert {(r.rank, r.step, r.outcome) for r in prefetched} == {
        (rank, Step.PREFETCH, "done") for rank in (0, 1, 2)
    }
    assert ready.started_at == started.at < ready.at
    holds = sent(out, Hold)
    out = d.ack(holds[0], Held(holds[0].command.iteration))
    [held] = of_type(out, RankDone)
    # The hold order went out when the last group-build answer came in.
    last_build = max(r.at for r in built)
    assert (held.rank, held.step) == (holds[0].rank, Step.HOLD)
    assert held.started_at == last_build
    out = d.ack(holds[1], CommandFailed("boom"))
    assert [(a.rank, a.outcome) for a in of_type(out, RankDone)] == [(holds[1].rank, "failed")]


@st.composite
def admin_calls(draw: st.DrawFn) -> AdminCommand:
    return draw(
        st.one_of(
            st.builds(AbortOperation, st.text(max_size=40), st.text(max_size=40)),
            st.builds(SetAutoRejoin, st.booleans()),
            st.builds(Drain, st.one_of(st.integers(-8, 8), st.integers())),
            st.builds(Admit, st.one_of(st.integers(-8, 8), st.integers())),
        )
    )


def _cluster_in(state: str) -> Driver:
    """A 4-rank cluster (ring placement) in a state where some calls must be refused."""
    d = Driver(4)
    if state == "forming":
        d.register(0)
        d.register(1)
        return d
    d.form()
    if state == "shrinking":
        d.kill(1)
    elif state == "waiting":
        # Automatic rejoin off; rank 3 failed, was shrunk away and relaunched,
        # registered but not ready.
        _admin(d, "setup-off", SetAutoRejoin(False))
        d.shrink(d.kill(3), lambda s: 4)
        d.register(3, rejoin=True)
    return d


def _must_refuse(state: str, command: AdminCommand) -> bool:
    """Whether `command` (with a valid request id) must be refused in `state`.
    Abort names a random op id, which never matches one in flight."""
    match command:
        case SetAutoRejoin():
            return False
        case Drain(rank=rank):
            # In `waiting`, draining 1 would lose experts 2 and 3 (3 is gone).
            drainable = {"steady": {0, 1, 2, 3}, "waiting": {0, 2}}.get(state, set())
            return rank not in drainable
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    state=st.sampled_from(["forming", "steady", "shrinking", "waiting"]),
    request_id=st.text(max_size=140),
    command=admin_calls(),
)
def test_bad_admin_requests_are_refused_with_a_message_and_change_nothing(
    state: str, request_id: str, command: AdminCommand
) -> None:
    d = _cluster_in(state)
    assume(request_id != "setup-off")  # used to set the state up
    valid_id = 1 <= len(request_id) <= 128
    assume(not valid_id or _must_refuse(state, command))
    record, before = d.persisted, d.machine.record()
    answer, out = _admin(d, request_id, command)
    assert out == [answer]  # no command, no persist: nothing moved
    assert d.persisted == record and d.machine.record() == before
    assert answer.code in (Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION)
    assert answer.message and answer.command == command
    # The message names the problem.
    if not valid_id:
        assert "request_id" in answer.message
    elif isinstance(command, Drain | Admit) and not 0 <= command.rank < 4:
        assert answer.code == Code.INVALID_ARGUMENT
        assert f"rank {command.rank} is outside the cluster" in answer.message
    elif isinstance(command, Drain | Admit):
        assert f"rank {command.rank}" in answer.message or "in flight" in answer.message
    elif isinstance(command, AbortOperation):
        assert command.op_id == "" or repr(command.op_id) in answer.message


def test_recovering_rank_0_takes_metadata_and_weights_from_healthy_ranks() -> None:
    """The seed PR broadcast placement from rank 0, which breaks when rank 0 is
    the one recovered. Here every source is a healthy rank."""
    d = Driver(4)
    d.form()
    d.shrink(d.kill(0), lambda s: 5)
    steps = d.grow(0)
    for s in steps[Resync]:
        resync = s.command
        assert resync.metadata_source in (1, 2, 3)
        assert resync.plan.transfers
        for t in resync.plan.transfers:
            assert t.src_rank in (1, 2, 3)
            assert t.dst_rank == 0
    assert d.machine.phase == Phase.STEADY


def test_after_a_rejoin_nothing_starts_by_itself() -> None:
    """The seed PR left state behind that re-triggered recovery forever. After
    a completed grow, progress reports, duplicate acks and duplicate readiness
    start nothing and send nothing."""
    d = Driver(3)
    d.form()
    d.shrink(d.kill(1), lambda s: 5)
    steps = d.grow(1)
    before = d.machine.record()
    assert before.phase == Phase.STEADY
    for i in range(200):
        for r in range(3):
            out = d.progress(r, 1000 + i)
            assert out == []
    out = d.ready(1)
    assert out == []
    for sends in steps.values():
        for s in sends:
            replies: dict[type[Any], Reply] = {
                Hold: Held(getattr(s.command, "iteration", 0)),
                Prefetch: Resynced(),
                Rebuild: GroupsReady(),
                Resync: Resynced(),
                Resume: Resumed(),
            }
            reply = replies[type(s.command)]
            out = d.ack(s, reply)
            assert not sent(out)
            assert [type(a) for a in out] == [Refuse]
    assert d.machine.record() == before
    assert d.machine.op is None
    assert d.machine.phase == Phase.STEADY


def test_the_next_hold_starts_with_the_lead_the_last_one_needed() -> None:
    # A hold that needed retargets (the order reached the ranks too late)
    # teaches the coordinator its fan-out: the next admission starts with the
    # widened lead instead of retargeting all over again.
    d = Driver(4)
    d.form()
    assert d.machine.hold_lead_now_s == d.machine.hold_lead_s
    d.shrink(d.kill(2), lambda s: 5)
    d.register(2, rejoin=True)
    holds = sent(d.ready(2), Hold)
    first = holds[0].command.iteration
    out = d.ack(holds[0], PastTarget(first + 3))
    retarget = sent(out, Hold)
    out = d.ack_all(retarget, lambda s: Held(s.command.iteration))
    out = d.ack_all(sent(out, Resync), lambda s: Resynced())
    d.ack_all(sent(out, Resume), lambda s: Resumed())
    assert d.machine.phase == Phase.STEADY
    assert d.machine.hold_lead_now_s == 2 * d.machine.hold_lead_s
    # Capped: a storm of retargets does not push holds seconds ahead.
    storm = Operation("x", OpKind.GROW, (0, 1), (2,), (), 9, 0.0, hold_attempt=3)
    for _ in range(10):
        d.machine._learn_hold_lead(storm)
    assert d.machine.hold_lead_now_s == MAX_LEARNED_HOLD_LEAD_S


def test_the_hold_target_follows_the_progress_the_group_builds_report() -> None:
    # Progress reports may be seconds apart in a large cluster; the acks of the
    # groups built just before the hold say where each survivor is now.
    d = Driver(4)
    d.form()
    d.shrink(d.kill(3), lambda s: 50)
    for r in (0, 1, 2):
        d.progress(r, 50)
    d.register(3, rejoin=True)
    rebuilds = d.rebuilds_for(3)
    clock = d.now + 5.0
    holds = sent(d.ack_all(rebuilds, lambda s: GroupsReady(1.0, 5000 + s.rank, clock)), Hold)
    target = holds[0].command.iteration
    assert target > 5002  # past where every survivor said it was
    # A build that reports no progress (an older agent) changes nothing.
    assert GroupsReady(1.0).iteration is None


def test_past_target_retargets_every_survivor_and_refuses_older_held() -> None:
    d = Driver(4)
    d.form()
    d.shrink(d.kill(2), lambda s: 5)
    for r in (0, 1, 3):
        d.progress(r, 50)
    d.register(2, rejoin=True)
    holds = sent(d.ready(2), Hold)
    first = holds[0].command.iteration
    assert first > 50
    # Rank 0 acks in time; rank 3 was already past the target.
    by_rank = {s.rank: s for s in holds}
    assert sent(d.ack(by_rank[0], Held(first))) == []
    out = d.ack(by_rank[3], PastTarget(first + 7))
    retarget = sent(out, Hold)
    assert sorted(s.rank for s in retarget) == [0, 1, 3]  # every survivor, again
    second = retarget[0].command.iteration
    assert {s.command for s in retarget} == {Hold(second)}
    assert second > first + 7
    assert len({s.command_id for s in retarget}) == 1
    assert retarget[0].command_id > holds[0].command_id
    # Older Held acks (rank 1's, or rank 0's again) are refused and change nothing.
    before = d.machine.record()
    for rank in (1, 0):
        out = d.ack(by_rank[rank], Held(first))
        assert [type(a) for a in out] == [Refuse]
        assert out[0].code == Code.FAILED_PRECONDITION
        assert d.machine.record() == before
    # A Held for the new command at the old iteration is refused too.
    out = d.ack(retarget[0], Held(first))
    assert [type(a) for a in out] == [Refuse] and d.machine.record() == before
    out = d.ack_all(retarget, lambda s: Held(second))
    assert phases(out) == [Phase.RESYNCING]
    resyncs = sent(out, Resync)
    resumes = sent(d.ack_all(resyncs, lambda s: Resynced()), Resume)
    # The cut is the retargeted iteration every survivor is held at.
    assert {s.command.iteration for s in resumes} == {second}
    out = d.ack_all(resumes, lambda s: Resumed())
    [ended] = of_type(out, OperationEnded)
    assert ended.retargets == 1


# --- refusals -------------------------------------------------------------------


def assert_refused(
    d: Driver, actions: list[Action], code: Code, *, end_session: bool, before: ClusterRecord
) -> Refuse:
    """Exactly one Refuse, nothing sent, nothing changed. (The machine's very
    first handle() persists its initial record even when nothing changed.)"""
    actions = [a for a in actions if not (isinstance(a, Persist) and a.record == before)]
    assert [type(a) for a in actions] == [Refuse], actions
    refusal = actions[0]
    assert isinstance(refusal, Refuse)
    assert refusal.code == code
    assert refusal.end_session is end_session
    assert d.machine.record() == before
    return refusal


@pytest.mark.parametrize("rank", [-1, 4, 17])
def test_refuses_a_rank_outside_the_cluster(rank: int) -> None:
    d = Driver(4)
    d.form()
    before = d.machine.record()
    refusal = assert_refused(
        d, d.register(rank, rejoin=True), Code.INVALID_ARGUMENT, end_session=True, before=before
    )
    assert f"rank {rank}" in refusal.message
    assert "world size 4" in refusal.message


@pytest.mark.parametrize("rejoin", [False, True])
def test_refuses_a_second_process_for_a_live_rank(rejoin: bool) -> None:
    d = Driver(3)
    d.form()
    before = d.machine.record()
    refusal = assert_refused(
        d, d.register(1, rejoin=rejoin), Code.ALREADY_EXISTS, end_session=True, before=before
    )
    assert "rank 1" in refusal.message and d.incarnations[1] in refusal.message
    assert d.machine.rank_state(1) == "serving"


def test_refuses_a_second_founder_while_forming() -> None:
    d = Driver(3)
    d.register(0)
    before = d.machine.record()
    assert_refused(d, d.register(0), Code.ALREADY_EXISTS, end_session=True, before=before)


def test_refuses_a_joiner_with_another_engine_fingerprint() -> None:
    d = Driver(3)
    d.form()
    d.shrink(d.kill(2), lambda s: 3)
    before = d.machine.record()
    refusal = assert_refused(
        d,
        d.register(2, rejoin=True, fingerprint="moe-16e/fp8/v2"),
        Code.FAILED_PRECONDITION,
        end_session=True,
        before=before,
    )
    assert "moe-16e/fp8/v2" in refusal.message and FP in refusal.message


def test_refuses_another_cluster() -> None:
    d = Driver(3)
    d.form()
    before = d.machine.record()
    refusal = assert_refused(
        d, d.register(1, cluster="prod-b"), Code.INVALID_ARGUMENT, end_session=True, before=before
    )
    assert "prod-b" in refusal.message and CLUSTER in refusal.message


def test_a_hello_must_come_from_the_holder_of_its_ranks_lease() -> None:
    d = Driver(3)
    d.form()
    d.shrink(d.kill(1), lambda s: 3)
    before = d.machine.record()
    # No key at all (the lease expired, or the process never took one).
    refusal = assert_refused(
        d, d.register(1, rejoin=True, key_lease=0), Code.FAILED_PRECONDITION,
        end_session=True, before=before,
    )  # fmt: skip
    assert "rank 1 has no key in etcd" in refusal.message
    # Another rank's lease: the session would speak for a rank it does not hold.
    refusal = assert_refused(
        d, d.register(1, rejoin=True, key_lease=d.leases[0]), Code.PERMISSION_DENIED,
        end_session=True, before=before,
    )  # fmt: skip
    assert "does not hold rank 1's key" in refusal.message
    assert f"{d.leases[0]:x}" not in refusal.message  # no lease id helps a forger
    # The right lease but not the proof its key names (values read from
    # GetStatus or etcd): refused, and the live member keeps its session.
    session = d.sessions[2]
    refusal = assert_refused(
        d, d.register(2, incarnation=d.incarnations[2], key_lease=None, proven=False),
        Code.UNAUTHENTICATED, end_session=True, before=before,
    )  # fmt: skip
    assert "does not carry the proof" in refusal.message
    assert d.machine.ranks[2].session == session
    # A live member's own process reconnecting with a lease that is not the
    # key's: refused as well, and the member keeps its session.
    assert_refused(
        d, d.register(2, incarnation=d.incarnations[2], key_lease=d.leases[0]),
        Code.PERMISSION_DENIED, end_session=True, before=before,
    )  # fmt: skip
    assert d.machine.ranks[2].session == session
    # A second process for a live rank is told it exists before its lease is looked at.
    assert_refused(
        d, d.register(2, key_lease=0), Code.ALREADY_EXISTS, end_session=True, before=before
    )
    # The holder of the key's lease gets in.
    assert of_type(d.register(1, rejoin=True), Accept)


def test_refuses_rejoin_before_forming_and_plain_start_after() -> None:
    d = Driver(3)
    before = d.machine.record()
    refusal = assert_refused(
        d, d.register(0, rejoin=True), Code.FAILED_PRECONDITION, end_session=True, before=before
    )
    assert "without --rejoin" in refusal.message
    d.form()
    d.shrink(d.kill(1), lambda s: 3)
    before = d.machine.record()
    refusal = assert_refused(
        d, d.register(1, rejoin=False), Code.FAILED_PRECONDITION, end_session=True, before=before
    )
    assert "--rejoin" in refusal.message


def test_refuses_a_founder_with_another_placement() -> None:
    d = Driver(3)
    d.register(0)
    before = d.machine.record()
    assert_refused(
        d,
        d.register(1, placement=ring_placement(3, version=2)),
        Code.FAILED_PRECONDITION,
        end_session=True,
        before=before,
    )
    assert_refused(
        d,
        d.handle(RankRegistered(2, "x", CLUSTER, "i", 9, FP, False, None, 9, proven=True)),
        Code.INVALID_ARGUMENT,
        end_session=True,
        before=before,
    )


def test_refuses_stale_and_foreign_acks_in_band() -> None:
    d = Driver(3)
    d.form()
    d.shrink(d.kill(0), lambda s: 3)
    for r in (1, 2):
        d.progress(r, 10)
    d.register(0, rejoin=True)
    holds = sent(d.ready(0), Hold)
    hold = holds[0]
    before = d.machine.record()
    # Stale epoch: names the epoch it carries and the operation's.
    refusal = assert_refused(
        d,
        d.ack(hold, Held(hold.command.iteration), epoch=hold.epoch - 1),
        Code.FAILED_PRECONDITION,
        end_session=False,
        before=before,
    )
    assert f"stale epoch {hold.epoch - 1}" in refusal.message
    assert str(hold.epoch) in refusal.message
    assert (refusal.op_id, refusal.command_id) == (hold.op_id, hold.command_id)
    # Another operation, a stale command, a reply that does not answer HOLD.
    assert_refused(
        d,
        d.ack(hold, Held(hold.command.iteration), op_id="prod-a-000001-form"),
        Code.FAILED_PRECONDITION,
        end_session=False,
        before=before,
    )
    assert_refused(
        d,
        d.ack(hold, Held(hold.command.iteration), command_id=hold.command_id - 1),
        Code.FAILED_PRECONDITION,
        end_session=False,
        before=before,
    )
    assert_refused(
        d, d.ack(hold, GroupsReady()), Code.INVALID_ARGUMENT, end_session=False, before=before
    )
    # An ack on a session that is not the rank's current one is dropped silently.
    assert d.ack(hold, Held(hold.command.iteration), session="gone") == []
    assert d.machine.record() == before


def test_refuses_an_ack_when_no_operation_is_in_flight() -> None:
    d = Driver(2)
    d.form()
    before = d.machine.record()
    refusal = assert_refused(
        d,
        d.handle(Acked(0, d.sessions[0], 1, "prod-a-000001-form", 2, Resumed())),
        Code.FAILED_PRECONDITION,
        end_session=False,
        before=before,
    )
    assert "no operation is in flight" in refusal.message


# --- bugs found by the property test, reproduced by hand --------------------------


def test_founder_dying_after_the_form_commit_is_shrunk_away() -> None:
    d = Driver(3)
    out: list[Action] = []
    for r in range(3):
        out += d.register(r)
    resumes = sent(d.ack_all(sent(out, Rebuild), lambda s: GroupsReady()), Resume)
    assert d.machine.epoch == 1 and d.machine.record().members == (0, 1, 2)
    d.ack(resumes[0], Resumed())
    d.ack(resumes[1], Resumed())
    # Rank 2 dies before acking RESUME; ranks 0 and 1 already serve epoch 1.
    out = d.kill(2)
    # Where things stand: epoch 1 with members (0, 1, 2) of which 2 is dead.
    # The only consistent next step is a shrink of the survivors.
    assert d.machine.phase == Phase.HALTING, phases(out)
    assert sorted(s.rank for s in sent(out, Abort)) == [0, 1]
    d.shrink(out, lambda s: 0)
    assert d.machine.record().members == (0, 1)
    assert d.machine.phase == Phase.DEGRADED


def test_joiner_committed_before_a_survivor_dies_stays_a_member() -> None:
    d = Driver(3)
    d.form()
    d.shrink(d.kill(2), lambda s: 5)
    d.register(2, rejoin=True)
    out = d.ready(2)
    out = d.ack_all(sent(out, Hold), lambda s: Held(s.command.iteration))
    resumes = sent(d.ack_all(sent(out, Resync), lambda s: Resynced()), Resume)
    assert d.machine.epoch == 3 and d.machine.record().members == (0, 1, 2)
    by_rank = {s.rank: s for s in resumes}
    d.ack(by_rank[0], Resumed())
    d.ack(by_rank[2], Resumed())
    # Survivor 1 dies before acking RESUME: epoch 3 (with rank 2) is committed.
    out = d.kill(1)
    # Rank 2 is a member of the committed epoch: no Retry for it...
    assert not sent(out, Retry), sent(out, Retry)
    assert sorted(s.rank for s in sent(out, Abort)) == [0, 2]
    assert d.machine.rank_state(2) == "serving"
    # ...and after the shrink nothing else starts (the real agent answers a
    # Retry with JoinerReady; send it anyway to show it is harmless).
    d.ready(2)
    d.shrink(out, lambda s: 60)
    assert d.machine.record().members == (0, 2)
    assert d.machine.op is None and d.machine.phase == Phase.DEGRADED
    d.ready(2)
    assert d.machine.op is None and d.machine.phase == Phase.DEGRADED


def test_experts_that_lose_every_replica_are_reloaded_onto_survivors() -> None:
    """Ranks 0 and 2 held the only replicas of experts 0 and 1. The shrink does
    not lose the cluster: it re-lays them onto spare slots of ranks 1 and 3,
    which load them from the checkpoint (RELOAD, the one plan), and commits
    the new placement with the epoch. The rejoin then takes its experts from
    the reloaded copies."""
    placement = Placement(1, 2, ((0, 1, 2, 3, 0, 1, 2, 3),))
    d = Driver(4, placement)
    d.form()
    d.shrink(d.kill(0), lambda s: 5)  # experts 0 and 1 live on rank 2 still
    assert d.machine.placement == placement
    out = d.kill(2)
    rebuilds = sent(d.ack_all(sent(out, Abort), lambda s: Halted(5)), Rebuild)
    reloads = sent(d.ack_all(rebuilds, lambda s: GroupsReady()), Reload)
    assert sorted(s.rank for s in reloads) == [1, 3]
    new = Placement(2, 2, ((0, 1, 0, 3, 0, 1, 2, 1),))
    assert {s.command for s in reloads} == {  # type: ignore[misc]
        Reload(new, (CheckpointLoad(0, 2, 0, 1), CheckpointLoad(0, 7, 1, 3)))
    }
    assert d.machine.placement == placement  # not committed before the resume
    resumes = sent(d.ack_all(reloads, lambda s: Reloaded(1, 2.0)), Resume)
    assert d.persisted.placement == new  # committed with the epoch
    d.ack_all(resumes, lambda s: Resumed())
    assert d.machine.phase == Phase.DEGRADED and d.machine.members == (1, 3)

    d.register(0, rejoin=True)
    out = d.handle(JoinerReady(0, d.sessions[0]))
    [prefetch] = {s.command for s in sent(out, Prefetch)}
    assert isinstance(prefetch, Prefetch)
    assert [(t.dst_slot, t.src_slot, t.src_rank) for t in prefetch.plan.transfers] == [
        (0, 2, 1),
        (1, 7, 3),
    ]


def test_a_shrink_that_cannot_spare_a_slot_for_a_lost_expert_loses_the_cluster() -> None:
    placement = Placement(1, 2, ((0, 1, 2, 3, 0, 1, 2, 3),))
    d = Driver(4, placement)
    d.form()
    d.shrink(d.kill(0), lambda s: 5)
    d.shrink(d.kill(3), lambda s: 6)  # ranks 1 {2,3} and 2 {0,1}: every expert once
    out = d.kill(2)  # rank 1 alone cannot hold four experts in two slots
    assert not sent(out, Abort) and d.machine.phase == Phase.FORMING
    [ended] = [r for r in of_type(out, Refuse) if r.rank == 1]
    assert "no survivor slot can be spared" in ended.message


def test_a_lost_cluster_forms_again_from_relaunched_ranks() -> None:
    """Every member lost (here: the survivors lack an expert): ranks relaunched
    with --rejoin, as supervisors do, form the cluster again without an
    operator, in a later epoch. A cluster that never formed still refuses them."""
    # 3 ranks x 2 slots, experts 0,1,2: rank 0 {0,1}, rank 1 {2,0}, rank 2 {1,2}.
    d = Driver(3, ring_placement(3, layers=1))
    d.form()
    d.shrink(d.kill(1), lambda s: 5)
    out = d.kill(2)  # expert 2 lived on ranks 1 and 2 only
    assert not sent(out, Abort)  # no shrink to a member set that cannot serve
    assert d.machine.phase == Phase.FORMING and d.machine.record().members == ()
    [ended] = [r for r in of_type(out, Refuse) if r.rank == 0]  # rank 0 must restart
    assert ended.end_session and "forms again" in ended.message
    lost_epoch = d.machine.last_epoch
    out = []
    for r in range(3):
        out += d.register(r, rejoin=True, placement=d.placement)
    assert [a.role for a in of_type(out, Accept)] == [Role.MEMBER] * 3
    resumes = sent(d.ack_all(sent(out, Rebuild), lambda s: GroupsReady()), Resume)
    assert {s.command.iteration for s in resumes} == {0}  # type: ignore[union-attr]
    d.ack_all(resumes, lambda s: Resumed())
    assert d.machine.phase == Phase.STEADY and d.machine.members == (0, 1, 2)
    assert d.machine.epoch > lost_epoch

    never = Driver(3)
    before = never.machine.record()
    refusal = assert_refused(
        never,
        never.register(0, rejoin=True),
        Code.FAILED_PRECONDITION,
        end_session=True,
        before=before,
    )
    assert "has not formed yet" in refusal.message


def test_two_founders_dying_after_the_form_commit_do_not_crash_the_machine() -> None:
    d = Driver(4)
    out: list[Action] = []
    for r in range(4):
        out += d.register(r)
    resumes = sent(d.ack_all(sent(out, Rebuild), lambda s: GroupsReady()), Resume)
    for s in resumes[:2]:
        d.ack(s, Resumed())
    # Ranks 2 and 3 lose their sessions before acking RESUME of epoch 1...
    d.handle(SessionClosed(2, d.sessions[2]))
    d.handle(SessionClosed(3, d.sessions[3]))
    # ...and rank 1's next step fails: both suspects are confirmed at once.
    out = d.handle(StepFailed(1, d.sessions[1], 1, 0, "all_to_all failed"))
    assert sorted(a.rank for a in of_type(out, RankFailed)) == [2, 3]
    assert d.machine.phase == Phase.HALTING
    assert d.machine.op is not None and d.machine.op.survivors == (0, 1)


def test_a_joiner_is_never_a_survivor_of_a_rollback_shrink() -> None:
    d = Driver(3, ring_placement(3, spr=1, layers=1))  # every rank holds expert 0
    d.form()
    out = d.kill(1)  # shrink to (0, 2) under way
    assert sorted(s.rank for s in sent(out, Abort)) == [0, 2]
    d.register(1, rejoin=True)  # the relaunched process is a joiner
    assert d.machine.rank_state(1) == "joining"
    out = d.kill(0)  # the shrink loses a survivor
    aborts = sent(out, Abort)
    assert [s.rank for s in aborts] == [2], aborts
    assert d.machine.op is not None and d.machine.op.survivors == (2,)
    d.shrink(out, lambda s: 4)
    assert d.machine.record().members == (2,)
    # The joiner is admitted the proper way: through a grow with a plan.
    d.ready(1)
    assert d.machine.phase == Phase.PAUSING


def test_a_failed_command_on_a_live_rank_rolls_the_operation_back() -> None:
    d = Driver(3)
    d.form()
    d.shrink(d.kill(2), lambda s: 5)
    d.register(2, rejoin=True)
    rebuilds = {s.rank: s for s in d.rebuilds_for(2)}
    d.ack(rebuilds[1], GroupsReady())
    d.ack(rebuilds[2], GroupsReady())
    out = d.ack(rebuilds[0], CommandFailed("store 10.0.0.1:29500 unreachable"))
    # Every rank is alive and has answered: nothing else will ever arrive.
    ended = of_type(out, OperationEnded)
    assert [e.outcome for e in ended] == ["rolled_back"], out
    assert "rank 0" in ended[0].reason and "unreachable" in ended[0].reason
    assert sent(out, Retry) and sent(out, Abort)  # joiner starts over, survivors roll back


def test_an_older_step_failure_does_not_condemn_a_session_blip() -> None:
    d = Driver(4)
    d.form()
    # Rank 3 died; rank 0's collective failed first (why, it cannot tell).
    d.handle(StepFailed(0, d.sessions[0], 1, 10, "all_to_all timed out"))
    # Later, rank 1's session blips; its process lives and reconnects.
    d.now += STEP_FAILURE_WINDOW_S
    out = d.handle(SessionClosed(1, d.sessions[1]))
    assert not of_type(out, RankFailed), out
    assert d.machine.rank_state(1) == "suspect"
    out = d.register(1, incarnation=d.incarnations[1])
    assert [(a.rank, a.role) for a in of_type(out, Accept)] == [(1, Role.MEMBER)]
    # Rank 3's death is still found, by its lease.
    d.handle(SessionClosed(3, d.sessions[3]))
    out = d.handle(LeaseExpired(3, d.leases[3]))
    assert sorted(s.rank for s in sent(out, Abort)) == [0, 1, 2]


def test_a_peer_failure_reported_just_before_the_session_close_confirms_at_once() -> None:
    # The race measured on real processes: the survivor's failed collective
    # reaches the coordinator a millisecond before the dead rank's session close.
    d = Driver(4)
    d.form()
    d.handle(StepFailed(0, d.sessions[0], 1, 10, "connection reset by peer"))
    out = d.handle(SessionClosed(3, d.sessions[3]))
    assert [(f.rank, f.reason) for f in of_type(out, RankFailed)] == [
        (3, "session closed and peers' collectives failed")
    ]
    assert sorted(s.rank for s in sent(out, Abort)) == [0, 1, 2]


def test_a_session_blip_during_a_shrink_does_not_evict_a_live_member() -> None:
    d = Driver(4)
    d.form()
    out = d.kill(0)
    assert sorted(s.rank for s in sent(out, Abort)) == [1, 2, 3]
    # The Abort makes the survivors' steps raise: the agent reports StepFailed.
    d.handle(StepFailed(2, d.sessions[2], 1, 5, "collectives aborted"))
    out = d.handle(SessionClosed(1, d.sessions[1]))  # a network blip
    out += d.handle(StepFailed(3, d.sessions[3], 1, 5, "collectives aborted"))
    assert not of_type(out, RankFailed), out
    out = d.register(1, incarnation=d.incarnations[1])  # reconnects
    assert [(a.rank, a.role) for a in of_type(out, Accept)] == [(1, Role.MEMBER)]
    assert [s.command for s in sent(out)] == [Abort(1)]  # the pending command again


# =============================================================================
# Part 2: a simulated cluster under hypothesis
# =============================================================================


@dataclass
class Proc:
    """One engine process with its agent, as worker_agent/agent.py behaves.

    mode: "waiting" (registered, not admitted, in the agent's serve loop),
    "running" (serving; the agent checks the hold target at each boundary),
    "held" (stopped at the hold target, serving commands), "failed" (its step
    raised, serving commands until RESUME).
    """

    rank: int
    session: str
    incarnation: str
    lease_id: int
    rejoin: bool
    holder: bool  # holds the weights of its slots: a founder, or admitted once
    alive: bool = True
    welcomed: bool = False
    admitted: bool = False
    mode: str = "waiting"
    iteration: int = 0
    epoch: int = 0
    hold: Send | None = None
    queue: list[Send] = field(default_factory=list)
    group: dict[int, str] = field(default_factory=dict)  # member -> incarnation
    acks: list[Acked] = field(default_factory=list)
    done: set[int] = field(default_factory=set)  # command ids carried out
    left: bool = False  # drained: told to leave, and gone


Down = Accept | Refuse | Send
Channel = tuple[str, str]


class ClusterSim(RuleBasedStateMachine):
    """A cluster of 2..6 simulated ranks around one machine.

    The wire: per session, one FIFO stream each way (like a gRPC stream), plus
    etcd's lease expiries; hypothesis picks which stream delivers next. Ranks
    answer as the agent does: Hold -> Held at the target, or PastTarget at once
    if already there; Abort -> StepFailed (a serving engine's step raises), then
    Halted(last completed); Rebuild -> GroupsReady (CommandFailed if a member is
    dead: its group never forms); Resync -> Resynced; Resume -> Resumed and
    serve; Retry -> JoinerReady. Faults: kills (the session closes, the lease
    expires later; unsent messages may be lost), relaunches with or without
    --rejoin (new incarnation, session and lease), progress reports, duplicate
    acks and garbage acks that can never count.

    Checked after every handle() (`_check`, `_check_send`), by DESIGN.md number:
      1 (one authority, pure form): a refusal is the only action and leaves
        record() unchanged (in-band acks and refused hellos alike).
      2 (one timeline): the committed epoch never decreases and moves only by
        an operation's commit, once per operation, to exactly its
        participants; every command carries its operation's id and target
        epoch; target epochs of successive operations strictly increase; one
        command id is one command; Rebuild's store prefix names its epoch.
      3 (one cut): a Hold's target is, when issued, past every iteration its
        survivors reported (progress or PastTarget) and past the operation's
        previous target; a grow's Resume names the iteration every survivor
        acked Held at (and, on delivery, each survivor is held exactly there);
        a shrink's Resume names the smallest Halted iteration.
      4 (one plan): every Resync of an operation is identical, equals the plan
        computed from the coordinator's placement (joiners send a stale one),
        and names only survivors (committed members, not failed, not joining)
        as transfer sources and metadata source.
      5 (where things stand): the last Persist equals record(); the phase
        matches the operation, or the membership when idle; no rank whose
        failure was confirmed is committed, or sent a command, before it is
        admitted again; a Retry never goes to a committed member.
    Liveness (`teardown`): faults stop, everything in flight is delivered and
    engines run to their targets: the machine must go idle with every member
    alive and serving its epoch; then every dead rank is relaunched and the
    cluster must be STEADY with all ranks. Both within SETTLE_PER_RANK
    deliveries per rank plus what was in flight.
    """

    # Deliveries allowed for the cluster to settle once faults stop (see teardown).
    SETTLE_PER_RANK = 60

    def __init__(self) -> None:
        super().__init__()
        self.machine: RecoveryStateMachine | None = None
        self.in_handle = False

    # --- setup -------------------------------------------------------------------

    @initialize(
        n=st.integers(2, 6),
        spr=st.integers(1, 3),
        layers=st.integers(1, 2),
        start=st.sampled_from(["registering", "steady", "admitting"]),
        victim=st.integers(0, 5),
    )
    def setup(self, n: int, spr: int, layers: int, start: str, victim: int) -> None:
        """`start`: founders registering; a formed cluster; or a cluster that
        lost rank `victim`, shrank, and sees its relaunch register (so the
        random part begins in the middle of a grow)."""
        self.n = n
        self.placement = ring_placement(n, spr, layers)
        if self.FULL_REPLICATION:
            self.placement = full_placement(n, spr, layers)
        self.machine = RecoveryStateMachine(CLUSTER, n)
        self.now = 0.0
        self.gen = 0
        self.procs: dict[int, Proc] = {}
        self.by_session: dict[str, Proc] = {}
        self.up: dict[str, deque[Event]] = {}
        self.down: dict[str, deque[Down]] = {}
        self.etcd: list[LeaseExpired] = []
        # Checker's memory.
        self.persisted = self.machine.record()
        self.failed: dict[int, bool] = {}
        self.accepted: dict[int, str] = {}
        self.reported: dict[tuple[int, str], int] = {}
        self.op_epochs: dict[str, int] = {}
        self.max_op_epoch = 0
        self.commands: dict[int, tuple[str, CommandBody]] = {}
        self.sent_to: dict[int, dict[int, str]] = {}
        self.resyncs: dict[str, Resync] = {}
        self.holds: dict[str, list[tuple[int, int]]] = {}
        self.aborts: dict[str, int] = {}
        self.counted: dict[tuple[str, int], dict[int, Reply]] = {}
        self.committed_by: set[str] = set()
        self.op_kinds: dict[str, OpKind] = {}
        self.seen_ops: list[str] = []
        self.max_settle = 0
        self.wasted = 0
        for r in range(n):
            self._launch(r, rejoin=False).holder = True
        if start != "registering":
            self._settle("form")
            assert self.machine.phase == Phase.STEADY
        if start == "admitting":
            self._die(self.procs[victim % n], drop=False)
            self._settle("shrink")
            assert self.machine.phase == Phase.DEGRADED
            self._launch(victim % n, rejoin=True)

    # --- the wire ----------------------------------------------------------------

    def _launch(self, rank: int, rejoin: bool) -> Proc:
        self.gen += 1
        session, incarnation = f"s{rank}.{self.gen}", f"i{rank}.{self.gen}"
        # A founder loads the weights from disk once it is accepted as one; a
        # joiner holds them once admitted. Until then a process holds nothing.
        proc = Proc(rank, session, incarnation, 1000 + self.gen, rejoin, holder=False)
        self.procs[rank] = proc
        self.by_session[session] = proc
        # A relaunched process presents the placement of its checkpoint, as the
        # engines do: a joiner's is never used, but a lost cluster's next
        # formation may be founded by relaunched processes.
        placement = self.placement
        hello = RankRegistered(
            rank,
            session,
            CLUSTER,
            incarnation,
            proc.lease_id,
            FP,
            rejoin,
            placement,
            proc.lease_id,
            proven=True,
        )
        self.up[session] = deque([hello])
        self.down[session] = deque()
        return proc

    def _to_coordinator(self, proc: Proc, event: Event) -> None:
        if proc.alive:
            self.up[proc.session].append(event)

    def _ack(self, proc: Proc, send: Send, reply: Reply) -> None:
        ack = Acked(proc.rank, proc.session, send.epoch, send.op_id, send.command_id, reply)
        proc.acks.append(ack)
        self._to_coordinator(proc, ack)

    def _channels(self) -> list[Channel]:
        chans: list[Channel] = [("up", s) for s, q in self.up.items() if q]
        chans += [("down", s) for s, q in self.down.items() if q]
        chans += [("etcd", str(i)) for i in range(len(self.etcd))]
        return chans

    def _deliver(self, chan: Channel) -> None:
        kind, key = chan
        if kind == "up":
            self._handle(self.up[key].popleft())
        elif kind == "etcd":
            self._handle(self.etcd.pop(int(key)))
        else:
            self._deliver_down(self.down[key].popleft(), self.by_session[key])

    # --- the agent ---------------------------------------------------------------

    def _deliver_down(self, msg: Down, proc: Proc) -> None:
        if not proc.alive:
            return
        if isinstance(msg, Accept):
            proc.welcomed = True
            proc.holder |= msg.role == Role.MEMBER and not proc.admitted
            if msg.role == Role.JOINER:
                if proc.admitted:
                    # Re-welcomed as a joiner after a reconnect: it lost its
                    # place (see the reconnect rule) and starts over.
                    proc.admitted, proc.mode, proc.hold, proc.group = False, "waiting", None, {}
                self._to_coordinator(proc, JoinerReady(proc.rank, proc.session))
        elif isinstance(msg, Refuse):
            assert msg.end_session  # in-band refusals are not routed
            if msg.session != proc.session:
                return  # a session the agent already left (a reconnect): not heard
            self._die(proc, drop=True, session_closed=False)
        else:
            self._command(proc, msg)

    def _command(self, proc: Proc, send: Send) -> None:
        cmd = send.command
        if isinstance(cmd, Leave):
            # WorkerAgent._on_leave: at once, on the agent's thread; the session
            # ends and the lease is revoked.
            proc.left = True
            self._die(proc, drop=False)
            return
        if isinstance(cmd, Hold):
            # WorkerAgent._on_hold: record the order, answer PastTarget at once
            # if the engine already reached it; a held engine is released.
            proc.hold = send
            if proc.iteration >= cmd.iteration:
                self._ack(proc, send, PastTarget(proc.iteration))
            elif proc.mode == "held":
                proc.mode = "running"
            return
        if isinstance(cmd, Prefetch):
            # WorkerAgent: a source sends from a thread of its own while it
            # serves; a joiner receives while it waits. Either answers now.
            if send.command_id not in proc.done:
                proc.done.add(send.command_id)
                ok = self._peers_alive(send, cmd.members)
                self._ack(proc, send, Resynced() if ok else CommandFailed("peer gone"))
            return
        if isinstance(cmd, Rebuild):
            # WorkerAgent._rebuild: on a thread of its own, whether the engine
            # serves (a grow's survivors) or waits; the engine switches to the
            # groups at the resume. A group with a dead member never forms.
            if send.command_id not in proc.done and not (send.epoch < proc.epoch and send.op_id):
                proc.done.add(send.command_id)
                ok = self._peers_alive(send, cmd.members)
                self._ack(proc, send, GroupsReady() if ok else CommandFailed("group timed out"))
            return
        if isinstance(cmd, Abort) and proc.mode == "running" and cmd.epoch >= proc.epoch:
            # abort_collectives makes the step raise: StepFailed, then serve.
            # (Only epochs up to cmd.epoch: a late copy of an old abort, re-sent
            # on a reconnect, leaves a newer epoch's groups alone.)
            proc.mode = "failed"
            self._to_coordinator(
                proc, StepFailed(proc.rank, proc.session, proc.epoch, proc.iteration, "aborted")
            )
        proc.queue.append(send)
        self._serve(proc)

    def _peers_alive(self, send: Send, members: Iterable[int]) -> bool:
        to = self.sent_to.get(send.command_id, {})
        return all(r in to and self.by_session[to[r]].alive for r in members)

    def _serve(self, proc: Proc) -> None:
        """WorkerAgent._serve: orders run in arrival order while not serving."""
        while proc.mode != "running" and proc.queue:
            send = proc.queue.pop(0)
            cmd = send.command
            if send.epoch < proc.epoch and send.op_id:
                continue  # stale epoch: ignored
            if send.command_id in proc.done:
                continue  # a copy re-sent on reconnect, already carried out
            proc.done.add(send.command_id)
            if isinstance(cmd, Abort):
                self._ack(proc, send, Halted(proc.iteration))
            elif isinstance(cmd, Resync):
                to = self.sent_to.get(send.command_id, {})
                ok = self._peers_alive(send, to)
                self._ack(proc, send, Resynced() if ok else CommandFailed("peer gone"))
            elif isinstance(cmd, Resume):
                if self.op_kinds.get(send.op_id) == OpKind.GROW and proc.admitted:
                    # (3) a grow's survivors restart from the iteration they hold at.
                    assert proc.mode == "held" and proc.iteration == cmd.iteration, (
                        proc,
                        cmd,
                    )
                proc.epoch = send.epoch
                proc.iteration = cmd.iteration
                proc.hold = None
                proc.admitted = proc.holder = True
                proc.mode = "running"
                proc.group = {m: self.procs[m].incarnation for m in cmd.members}
                self._ack(proc, send, Resumed())
            elif isinstance(cmd, Retry):
                self._to_coordinator(proc, JoinerReady(proc.rank, proc.session))

    def _group_broken(self, proc: Proc) -> bool:
        return any(
            not self.procs[m].alive or self.procs[m].incarnation != inc
            for m, inc in proc.group.items()
        )

    def _advance(self, proc: Proc, k: int, report: bool) -> bool:
        """The engine runs k iterations; False when it could not run."""
        if not proc.alive or proc.mode != "running":
            return False
        if self._group_broken(proc):
            # The all-to-all with a dead peer fails.
            proc.mode = "failed"
            self._to_coordinator(
                proc, StepFailed(proc.rank, proc.session, proc.epoch, proc.iteration, "a2a")
            )
            self._serve(proc)
            return True
        hold = proc.hold
        target = hold.command.iteration if hold is not None else None
        assert hold is None or isinstance(hold.command, Hold)
        if (
            hold is not None
            and target is not None
            and proc.iteration < target <= proc.iteration + k
        ):
            proc.iteration = target
            proc.mode = "held"
            self._ack(proc, hold, Held(target))
            self._serve(proc)
        else:
            proc.iteration += k
        if report:
            self._to_coordinator(
                proc, ProgressReported(proc.rank, proc.session, proc.iteration, self.now)
            )
        return True

    def _die(self, proc: Proc, drop: bool, session_closed: bool = True) -> None:
        proc.alive = False
        q = self.up[proc.session]
        if drop:
            q.clear()
        if session_closed:
            q.append(SessionClosed(proc.rank, proc.session))
        self.down[proc.session].clear()
        self.etcd.append(LeaseExpired(proc.rank, proc.lease_id))

    def _covered_without(self, victim: Proc) -> bool:
        m = self.machine
        assert m is not None
        # A rank being drained, or drained, will not serve its experts.
        leaving = set(m.drained)
        if m.op is not None and m.op.kind == OpKind.DRAIN:
            leaving |= set(m.op.leaving)
        holders = [
            p.rank
            for p in self.procs.values()
            if p.alive and p.holder and p is not victim and p.rank not in leaving
        ]
        for layer in self.placement.layers:
            have = {layer[s] for r in holders for s in self.placement.slots_of_rank(r)}
            if have != set(layer):
                return False
        return True

    # --- the coordinator, and the checker ------------------------------------------

    def _handle(self, event: Event) -> list[Action]:
        m = self.machine
        assert m is not None
        self.in_handle = True
        before = m.record()
        pre = m.op
        pre_ids = (pre.op_id, pre.command_id, pre.target_epoch) if pre else None
        pre_hold = pre is not None and pre.step == Step.HOLD
        pre_awaiting = set(pre.awaiting) if pre else set()
        rank = getattr(event, "rank", None)  # admin requests and ticks name none
        pre_session = m.ranks[rank].session if rank in m.ranks else None
        self.now += 0.01
        actions: list[Action] | None = None
        # handle() needs a few dozen frames; an unbounded recursion in it is cut
        # short so that its chain of exceptions stays small.
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(stack_depth() + 300)
        try:
            with contextlib.suppress(RecursionError):
                actions = m.handle(event, self.now)
        finally:
            sys.setrecursionlimit(limit)
        # Raised outside the handler, without the chain of contexts: it is too
        # deep for hypothesis to compare failures.
        assert actions is not None, f"handle({event}) recursed without end"
        after = m.record()
        self._check(event, before, after, actions, pre_ids, pre_awaiting, pre_session, pre_hold)
        for a in actions:
            # Welcomes, commands and refused hellos travel to the rank; in-band
            # refusals are only logged by the agent.
            to_rank = isinstance(a, Accept | Send) or (isinstance(a, Refuse) and a.end_session)
            if to_rank and isinstance(a, Accept | Send | Refuse) and a.session in self.down:
                self.down[a.session].append(a)
        self.in_handle = False
        return actions

    def _check(
        self,
        event: Event,
        before: ClusterRecord,
        after: ClusterRecord,
        actions: list[Action],
        pre_ids: tuple[str, int, int] | None,
        pre_awaiting: set[int],
        pre_session: str | None,
        pre_hold: bool,
    ) -> None:
        m = self.machine
        assert m is not None
        # (5) etcd says where things stand: the last Persist is the record.
        records = [a.record for a in of_type(actions, Persist)]
        assert len(records) <= 1
        if records:
            self.persisted = records[-1]
        assert after == self.persisted, (after, self.persisted)

        # (1) refused messages change nothing and send nothing. (A Refuse to
        # another session ends that session: a rank declared hung, or the
        # survivors of a lost cluster.)
        refusals = [
            r for r in of_type(actions, Refuse) if r.session == getattr(event, "session", "")
        ]
        if refusals:
            others = [a for a in actions if not (isinstance(a, Persist) and a.record == before)]
            assert others == refusals[:1], actions
            assert after == before
            # A refused hello ends its session, and so does a report on a
            # session that no longer speaks for its rank (it must stop).
            assert refusals[0].end_session == isinstance(event, RankRegistered | ProgressReported)

        # (1) a refused admin call changes nothing and sends nothing.
        if isinstance(event, AdminRequested):
            [answer] = of_type(actions, AdminAnswered)
            if answer.code is not None:
                assert [a for a in actions if not isinstance(a, Persist)] == [answer], actions
                assert after == before

        # What reached the coordinator: iterations reported on the current session,
        # acks that counted.
        current = pre_session is not None and getattr(event, "session", None) == pre_session
        if isinstance(event, ProgressReported) and current:
            self.reported[(event.rank, event.session)] = event.iteration
        if isinstance(event, Acked) and current and not refusals and pre_ids:
            counts = (event.op_id, event.command_id, event.epoch) == pre_ids
            counts = counts and event.rank in pre_awaiting
            if counts and pre_hold and isinstance(event.reply, PastTarget):
                self.reported[(event.rank, event.session)] = event.reply.iteration
            if counts and isinstance(event.reply, Held | Halted):
                self.counted.setdefault((event.op_id, event.command_id), {})[event.rank] = (
                    event.reply
                )

        # Actions in order: failures, admissions, and every command.
        rolled_back = {
            a.op_id for a in of_type(actions, OperationEnded) if a.outcome != "completed"
        }
        for a in actions:
            if isinstance(a, RankFailed):
                # A drained rank that left is gone, not failed.
                assert not self.procs[a.rank].left, a
                self.failed[a.rank] = True
            elif isinstance(a, Accept):
                self.failed[a.rank] = False
                self.accepted[a.rank] = a.session
            elif isinstance(a, Send):
                self._check_send(a, before, after, rolled_back)

        # (2) one timeline: the committed epoch never goes back; it moves only by
        # an operation's commit, once per operation, to exactly its participants.
        assert after.epoch >= before.epoch
        assert after.last_epoch >= before.last_epoch >= after.epoch
        if after.epoch > before.epoch:
            op = after.operation
            assert op is not None and op.step == Step.RESUME, after
            assert op.target_epoch == after.epoch
            assert after.members == tuple(sorted(op.survivors + op.joining))
            assert op.op_id not in self.committed_by
            self.committed_by.add(op.op_id)
            # (5) no rank whose failure was confirmed (and not followed by a
            # new admission) is committed.
            for r in after.members:
                assert not self.failed.get(r), (r, after)
        if after.operation is not None:
            op = after.operation
            self.op_kinds[op.op_id] = op.kind
            if op.op_id not in self.seen_ops:
                self.seen_ops.append(op.op_id)
            if op.step == Step.RESUME:
                assert op.target_epoch == after.epoch
            else:
                assert op.target_epoch > after.epoch
            assert after.phase == PHASE_OF[(op.kind, op.step)]
        else:
            # (5) the phase in etcd matches the membership.
            if not after.members:
                assert after.phase == Phase.FORMING, after
            else:
                idle = Phase.STEADY if len(after.members) == self.n else Phase.DEGRADED
                assert after.phase == idle, after

    def _check_send(
        self, send: Send, before: ClusterRecord, after: ClusterRecord, rolled_back: set[str]
    ) -> None:
        m = self.machine
        assert m is not None
        # (5) only the current, admitted process of a rank gets commands; a rank
        # whose failure was confirmed gets none until it is admitted again.
        assert self.accepted.get(send.rank) == send.session, send
        assert not self.failed.get(send.rank), send
        cmd = send.command
        if isinstance(cmd, Retry):
            assert send.op_id == ""
            # Only a joiner is told to start its admission over, never a member
            # of the committed epoch.
            assert send.rank not in after.members, (send, after)
            return
        # (2) every command carries its operation's id and target epoch; target
        # epochs of successive operations strictly increase.
        if send.op_id not in self.op_epochs:
            assert send.epoch > self.max_op_epoch and send.epoch > before.epoch
            self.op_epochs[send.op_id] = send.epoch
            self.max_op_epoch = send.epoch
        assert self.op_epochs[send.op_id] == send.epoch
        # One command id, one command: all outstanding copies are identical.
        first = self.commands.setdefault(send.command_id, (send.op_id, cmd))
        assert first == (send.op_id, cmd), (first, send)
        self.sent_to.setdefault(send.command_id, {})[send.rank] = send.session
        op = m.op
        if send.op_id in rolled_back and (op is None or op.op_id != send.op_id):
            # An operation begun and abandoned within one handle() (e.g. a
            # StepFailed confirming two suspects one after the other): its
            # commands go out, and are refused as stale when acked. Wasteful,
            # not wrong; the next operation's commands follow in this batch.
            self.wasted += 1
            return
        assert op is not None and op.op_id == send.op_id, (send, op)
        self.op_kinds[op.op_id] = op.kind
        assert send.epoch == op.target_epoch
        survivors, participants = op.survivors, op.participants
        assert not set(survivors) & set(op.joining)
        # Everyone in the old groups holds at the cut: a drained rank too.
        hold_ranks = set(survivors) | (set(op.leaving) if op.kind == OpKind.DRAIN else set())
        match cmd:
            case Leave():
                # Only a drained rank, once out of the committed epoch.
                assert op.kind == OpKind.DRAIN and send.rank in op.leaving
                assert send.rank not in after.members and after.epoch == send.epoch
            case Hold(iteration):
                assert send.rank in hold_ranks
                holds = self.holds.setdefault(send.op_id, [])
                if not holds or holds[-1][0] != send.command_id:
                    # (3) one cut: when issued, past every iteration the
                    # ranks holding reported, and past this operation's last target.
                    for r in hold_ranks:
                        seen = self.reported.get((r, self.accepted.get(r, "")))
                        assert seen is None or iteration > seen, (r, seen, iteration)
                    assert not holds or iteration > holds[-1][1]
                    holds.append((send.command_id, iteration))
            case Abort(epoch):
                assert send.rank in survivors
                # Every epoch below the operation's: the committed one and
                # any abandoned operation's, whose groups may be half built.
                assert epoch == send.epoch - 1 >= after.epoch
                self.aborts[send.op_id] = send.command_id
            case Rebuild(epoch, members, prefix):
                assert send.rank in participants
                assert epoch == send.epoch and members == participants
                # (2) the store prefix names the epoch: generations never mix.
                assert prefix == store_prefix(CLUSTER, epoch)
                assert f"/epoch-{epoch}/" in prefix
            case Prefetch(plan, epoch, members, prefix):
                # (4) the same plan the pause's Resync carries, moved while the
                # survivors serve: only to the joiners and the plan's sources,
                # on a staging group of the target epoch's own prefix.
                assert op.kind == OpKind.GROW and epoch == op.target_epoch
                assert plan == transfer_plan(self.placement, survivors, op.joining)
                assert members == tuple(
                    sorted({t.src_rank for t in plan.transfers} | set(op.joining))
                )
                assert send.rank in members
                assert prefix == store_prefix(CLUSTER, epoch) + "prefetch/"
                for rank in {t.src_rank for t in plan.transfers}:
                    assert rank in survivors and rank in after.members
                    assert not m.ranks[rank].failed and not self.failed.get(rank)
            case Resync(plan, source, placement):
                assert send.rank in participants
                # (4) one plan, the same for every participant, computed from the
                # coordinator's placement (not a joiner's stale one).
                first_resync = self.resyncs.setdefault(send.op_id, cmd)
                assert first_resync == cmd
                assert placement == self.placement
                assert plan == transfer_plan(self.placement, survivors, op.joining)
                # Every source and the metadata source are survivors: committed
                # members, not failed, not joining.
                for rank in {t.src_rank for t in plan.transfers} | {source}:
                    assert rank in survivors and rank in after.members
                    assert rank not in op.joining and rank not in m.joiners
                    assert not m.ranks[rank].failed and not self.failed.get(rank)
                for t in plan.transfers:
                    assert t.dst_rank in op.joining
            case Resume(iteration, members):
                assert send.rank in participants and members == participants
                assert after.epoch == send.epoch  # committed before RESUME
                if op.kind in (OpKind.GROW, OpKind.DRAIN):
                    # (3) a grow or drain resumes at the iteration every rank held at.
                    hold_id, target = self.holds[send.op_id][-1]
                    held = self.counted.get((send.op_id, hold_id), {})
                    assert set(held) == hold_ranks, (held, hold_ranks)
                    assert {h.iteration for h in held.values() if isinstance(h, Held)} == {
                        iteration
                    }
                    assert iteration == target
                elif op.kind == OpKind.SHRINK:
                    halted = self.counted.get((send.op_id, self.aborts[send.op_id]), {})
                    assert set(halted) == set(survivors)
                    assert iteration == min(
                        h.last_completed for h in halted.values() if isinstance(h, Halted)
                    )
                else:
                    assert iteration == 0
            case _:
                raise AssertionError(f"unexpected command {cmd}")

    # --- rules: deliveries ---------------------------------------------------------

    @rule(i=st.integers(0, 10**6))
    def deliver(self, i: int) -> None:
        chans = self._channels()
        if chans:
            self._deliver(chans[i % len(chans)])

    @rule(k=st.integers(1, 40), run=st.booleans())
    def flush(self, k: int, run: bool) -> None:
        """Up to k deliveries rotating over the streams; with `run`, engines
        also move when nothing is in flight."""
        for j in range(k):
            chans = self._channels()
            if chans:
                self._deliver(chans[j % len(chans)])
            elif not (run and self._engines_move()):
                return

    # --- rules: the engines ---------------------------------------------------------

    @rule(i=st.integers(0, 10**6), k=st.integers(1, 8), report=st.booleans())
    def run_engine(self, i: int, k: int, report: bool) -> None:
        running = [p for p in self.procs.values() if p.alive and p.mode == "running"]
        if running:
            self._advance(running[i % len(running)], k, report)

    @rule(report=st.booleans())
    def run_to_targets(self, report: bool) -> None:
        """Every serving engine with a hold order ahead runs up to it."""
        for p in sorted(self.procs.values(), key=lambda p: p.rank):
            hold = p.hold
            if p.alive and p.mode == "running" and hold is not None:
                assert isinstance(hold.command, Hold)
                if hold.command.iteration > p.iteration:
                    self._advance(p, hold.command.iteration - p.iteration, report)

    @rule(i=st.integers(0, 10**6))
    def report_progress(self, i: int) -> None:
        running = [p for p in self.procs.values() if p.alive and p.mode != "waiting"]
        if running:
            p = running[i % len(running)]
            self._to_coordinator(p, ProgressReported(p.rank, p.session, p.iteration, self.now))

    # --- rules: faults -----------------------------------------------------------------

    RECONNECTS = False
    FULL_REPLICATION = False

    @precondition(lambda self: self.RECONNECTS)
    @rule(i=st.integers(0, 10**6))
    def reconnect(self, i: int) -> None:
        """The session breaks but the process lives (a network blip): the agent
        reconnects with the same incarnation and lease. Commands in flight to
        the old session are lost; its unsent messages go out on the new one."""
        live = [p for p in self.procs.values() if p.alive and p.welcomed]
        if not live:
            return
        p = live[i % len(live)]
        old = p.session
        self.gen += 1
        p.session = f"s{p.rank}.{self.gen}"
        self.by_session[p.session] = p
        # What the agent had queued goes out on the new session; a hello is
        # its session's own (the service refuses a second one in-band).
        carried = [
            restamp(ev, p.session) for ev in self.up[old] if not isinstance(ev, RankRegistered)
        ]
        self.up[old].clear()
        self.up[old].append(SessionClosed(p.rank, old))
        self.down[old].clear()
        placement = self.placement
        hello = RankRegistered(
            p.rank,
            p.session,
            CLUSTER,
            p.incarnation,
            p.lease_id,
            FP,
            p.rejoin,
            placement,
            p.lease_id,
            proven=True,
        )
        self.up[p.session] = deque([hello, *carried])
        self.down[p.session] = deque()

    @precondition(lambda self: self.RECONNECTS)
    @rule(i=st.integers(0, 10**6))
    def lease_dropped(self, i: int) -> None:
        """etcd drops a live rank's lease (an outage outlived it): the delete
        reaches the coordinator while the session stays open; the agent takes
        a new lease and says so on its session (LeaseRenewed), which may reach
        the coordinator before or after the delete, or after a reconnect."""
        live = [p for p in self.procs.values() if p.alive and p.welcomed]
        if not live:
            return
        p = live[i % len(live)]
        self.etcd.append(LeaseExpired(p.rank, p.lease_id))
        self.gen += 1
        p.lease_id = 1000 + self.gen
        self._to_coordinator(p, LeaseRenewed(p.rank, p.session, p.lease_id, p.lease_id))

    @rule(i=st.integers(0, 10**6), drop=st.booleans())
    def kill(self, i: int, drop: bool) -> None:
        """A process dies. Never the last holder of an expert: no peer could
        send it to a joiner then (a PlanError, tested on its own above)."""
        self._kill_one(i, drop)

    def _kill_one(self, i: int, drop: bool) -> None:
        victims = [
            p for p in self.procs.values() if p.alive and (not p.holder or self._covered_without(p))
        ]
        if victims:
            self._die(victims[i % len(victims)], drop)

    @precondition(lambda self: self.machine is not None and self.machine.op is not None)
    @rule(i=st.integers(0, 10**6), drop=st.booleans())
    def kill_mid_operation(self, i: int, drop: bool) -> None:
        """The same, more often where it hurts most: while an operation runs."""
        self._kill_one(i, drop)

    @rule(i=st.integers(0, 10**6), rejoin=st.booleans())
    def relaunch(self, i: int, rejoin: bool) -> None:
        """A new process for a dead rank: new incarnation, session and lease.
        With the wrong --rejoin flag it is refused and exits."""
        dead = [r for r, p in sorted(self.procs.items()) if not p.alive]
        if dead:
            self._launch(dead[i % len(dead)], rejoin)

    @rule(i=st.integers(0, 10**6), admit=st.booleans(), outside=st.booleans())
    def operator(self, i: int, admit: bool, outside: bool) -> None:
        """An operator drains a rank or admits one, whatever state the cluster
        is in (the machine refuses what does not fit; the checker asserts a
        refusal changes nothing), sometimes naming a rank outside the world.
        Like `kill`, it never drains the last live holder of an expert."""
        rank = (self.n + i % 3 if i % 2 else -1 - i % 3) if outside else i % self.n
        proc = self.procs.get(rank)
        if not admit and proc is not None and proc.holder and not self._covered_without(proc):
            return
        self.gen += 1
        command = Admit(rank) if admit else Drain(rank)
        self._handle(AdminRequested(f"operator-{self.gen}", command))

    @rule(i=st.integers(0, 10**6), j=st.integers(0, 10**6))
    def duplicate(self, i: int, j: int) -> None:
        """A rank sends an ack (or its readiness) a second time."""
        live = [p for p in self.procs.values() if p.alive and p.welcomed]
        if not live:
            return
        p = live[i % len(live)]
        if p.acks:
            self._to_coordinator(p, replace(p.acks[j % len(p.acks)], session=p.session))
        elif not p.admitted and p.rejoin:
            self._to_coordinator(p, JoinerReady(p.rank, p.session))

    @rule(
        i=st.integers(0, 10**6),
        kind=st.sampled_from(["bogus-op", "old-op", "stale-epoch", "wrong-type", "wrong-hold"]),
        x=st.integers(0, 50),
    )
    def garbage_ack(self, i: int, kind: str, x: int) -> None:
        """An ack that can never count: another operation, a stale epoch, a
        reply that does not answer the step, a Held at the wrong iteration. The
        checker asserts the refusal changes nothing."""
        m = self.machine
        assert m is not None
        live = [p for p in self.procs.values() if p.alive and p.welcomed]
        if not live:
            return
        p = live[i % len(live)]
        op = m.op
        ack: Acked | None = None
        if kind == "bogus-op" or op is None:
            ack = Acked(p.rank, p.session, m.epoch, f"bogus-{x}", x, Held(x))
        elif kind == "old-op":
            old = [o for o in self.seen_ops if o != op.op_id]
            op_id = old[x % len(old)] if old else f"bogus-{x}"
            ack = Acked(p.rank, p.session, op.target_epoch, op_id, op.command_id, GroupsReady())
        elif kind == "stale-epoch":
            epoch = op.target_epoch - 1 - x % 3
            ack = Acked(p.rank, p.session, epoch, op.op_id, op.command_id, Halted(x))
        elif kind == "wrong-type" and op.step != Step.WAIT_READY:
            expected = {
                Step.PREFETCH: (Resynced,),
                Step.HOLD: (Held, PastTarget),
                Step.ABORT: (Halted,),
                Step.REBUILD: (GroupsReady,),
                Step.RESYNC: (Resynced,),
                Step.RESUME: (Resumed,),
            }[op.step]
            replies: list[Reply] = [
                Held(x),
                PastTarget(x),
                Halted(x),
                GroupsReady(),
                Resynced(),
                Resumed(),
            ]
            wrong = [r for r in replies if not isinstance(r, expected)]
            ack = Acked(
                p.rank,
                p.session,
                op.target_epoch,
                op.op_id,
                op.command_id,
                wrong[x % len(wrong)],
            )
        elif kind == "wrong-hold" and op.step == Step.HOLD and op.hold_iteration is not None:
            ack = Acked(
                p.rank,
                p.session,
                op.target_epoch,
                op.op_id,
                op.command_id,
                Held(op.hold_iteration + 1 + x),
            )
        if ack is not None:
            self._to_coordinator(p, ack)

    # --- the end: faults stop, the cluster converges -------------------------------------

    def _settle(self, stage: str) -> int:
        """Deliver everything in flight (rotating over the streams) and let the
        engines run to their hold targets until nothing moves. Bounded."""
        in_flight = sum(len(q) for q in self.up.values()) + sum(len(q) for q in self.down.values())
        limit = self.SETTLE_PER_RANK * self.n + in_flight + len(self.etcd)
        delivered = 0
        while True:
            chans = self._channels()
            if chans:
                if delivered >= limit:
                    m = self.machine
                    assert m is not None
                    raise AssertionError(
                        f"{stage}: no quiescence after {limit} deliveries: "
                        f"{m.record()} joiners={m.joiners}"
                    )
                self._deliver(chans[delivered % len(chans)])
                delivered += 1
                continue
            if not self._engines_move():
                self.max_settle = max(self.max_settle, delivered)
                return delivered

    def _engines_move(self) -> bool:
        """Time passes: engines with a hold order ahead run up to it, engines
        on a broken group fail their step. False when none had to move."""
        moved = False
        for p in sorted(self.procs.values(), key=lambda p: p.rank):
            if not p.alive or p.mode != "running":
                continue
            hold = p.hold
            behind = hold is not None and hold.command.iteration > p.iteration
            if self._group_broken(p) or behind:
                gap = hold.command.iteration - p.iteration if hold and behind else 1
                moved |= self._advance(p, gap, report=False)
        return moved

    def teardown(self) -> None:
        m = self.machine
        if m is None or self.in_handle:
            return  # a failure inside handle() is the one to report
        # Stage A: nothing is relaunched. The machine must finish what it started
        # and stop with every committed member alive (dead ones shrunk away).
        self._settle("settle")
        record = m.record()
        assert m.op is None, record
        for r in record.members:
            p = self.procs[r]
            assert p.alive and m.ranks[r].session == p.session, (r, record)
            assert p.mode == "running" and p.epoch == record.epoch, (p, record)
        for p in self.procs.values():
            if p.alive and p.welcomed and record.members and p.rank not in m.drained:
                assert p.rank in record.members, (p, record)  # joiners admitted
        # Stage B: every dead rank is relaunched (with --rejoin once the cluster
        # has formed, as an operator would), an operator admits the drained
        # ones, and the cluster is whole again.
        for _ in range(3):
            dead = [r for r, p in sorted(self.procs.items()) if not p.alive]
            if not dead and not m.drained:
                break
            for r in dead:
                self._launch(r, rejoin=bool(m.record().members))
            self._settle("rejoin")
            for r in sorted(m.drained):
                self.gen += 1
                out = self._handle(AdminRequested(f"teardown-{self.gen}", Admit(r)))
                [answer] = of_type(out, AdminAnswered)
                assert answer.code is None, answer
                self._settle("admit")
        record = m.record()
        assert record.phase == Phase.STEADY, record
        assert record.members == tuple(range(self.n)) and record.operation is None
        for p in self.procs.values():
            assert p.alive and p.mode == "running" and p.epoch == record.epoch, p
            assert p.group == {r: self.procs[r].incarnation for r in range(self.n)}


class BlippingClusterSim(ClusterSim):
    """The same cluster, plus session blips: a live process loses its session
    and reconnects with the same incarnation (the `_reattach` path).

    Its agent does what worker_agent/agent.py does: it carries out a command
    once (the copy re-sent on reconnect is skipped), announces readiness again
    whenever it is welcomed as a joiner, and exits when a reconnect is refused
    (a supervisor relaunches it).

    Every rank holds every expert here: a blip can still get a live member
    evicted (BUG-6), and with fewer replicas that eviction can take the last
    copy of an expert out of the cluster, which no grow can bring back.
    """

    RECONNECTS = True
    FULL_REPLICATION = True


def run_simulation(sim: type[ClusterSim]) -> None:
    run_state_machine_as_test(
        sim,
        settings=settings(
            max_examples=SIM_EXAMPLES,
            stateful_step_count=SIM_STEPS,
            deadline=None,
            # Deterministic: the same examples on every run, so a pass never
            # depends on luck.
            derandomize=True,
            database=None,
            report_multiple_bugs=False,
            # No "explain" phase: its tracer plus the machine's unbounded
            # recursion (BUG-2/3) can overflow the C stack of CPython 3.11.
            phases=[HypothesisPhase.explicit, HypothesisPhase.generate, HypothesisPhase.shrink],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def test_simulated_cluster_keeps_the_invariants_and_converges() -> None:
    run_simulation(ClusterSim)


def test_simulated_cluster_with_session_blips_keeps_the_invariants_and_converges() -> None:
    run_simulation(BlippingClusterSim)
