"""The recovery state machine: events in, actions out, no I/O.

One instance is the single authority over a cluster's membership. The runtime
around it turns gRPC messages and etcd watch events into `Event`s, calls
`handle(event, now)`, and carries out the returned `Action`s (send a command,
persist the record, refuse a message). Nothing here reads a clock, a socket or
etcd, so every property can be tested by feeding events.

Operations (each moves the cluster from one epoch to the next):

- form:   REBUILD -> RESUME                 (all ranks registered)
- shrink: ABORT -> REBUILD -> RESUME        (a member failed; also the rollback
                                             of an abandoned grow)
- grow:   WAIT_READY -> HOLD -> REBUILD -> RESYNC -> RESUME
- drain:  HOLD -> REBUILD -> RESUME           (an operator removes a live member;
                                             it holds at the cut with the
                                             survivors, then is told to leave)

The new epoch is committed just before RESUME is sent. A failure during an
operation abandons it; the survivors of the last committed epoch then run a
shrink to a fresh epoch, and joiners are told to retry.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum

from coordinator.plan import (
    PlanError,
    ProgressSample,
    hold_target,
    next_sample,
    relayout,
    transfer_plan,
)
from protos.types import CheckpointLoad, Placement, TransferPlan

# How long before a member's broken session a peer's failed step still counts
# as the second signal of its death. Measured: peers' collectives fail ~11 ms
# after a SIGKILL, and their report can beat the session's close.
STEP_FAILURE_WINDOW_S = 0.2
# The hold lead learned from retargets stops growing here (unless the
# configured lead is larger): far below the pausing deadline.
MAX_LEARNED_HOLD_LEAD_S = 1.0
# How long a rank whose lease expired while its session stayed open has to bind
# its session to a new lease before the expiry counts as its death. An etcd
# outage expires every lease at once; the ranks live on and renew theirs.
DEFAULT_LEASE_REBIND_S = 3.0
# How long a new leader waits for the members to reconnect before their silence
# counts as evidence (a member without a rank key is failed after it, a phase
# deadline may declare the silent ones hung only after it).
DEFAULT_RECONNECT_WINDOW_S = 10.0
# Expired lease ids remembered per rank (RankView.dead_leases).
DEAD_LEASES_KEPT = 16


class Phase(StrEnum):
    FORMING = "forming"
    STEADY = "steady"
    HALTING = "halting"
    SHRINKING = "shrinking"
    DEGRADED = "degraded"
    ADMITTING = "admitting"
    REBUILDING = "rebuilding"
    PAUSING = "pausing"
    RESYNCING = "resyncing"
    RESUMING = "resuming"


# How long an operation may stay in one phase before the ranks it still waits
# for are declared failed (hung: alive by their lease, silent on the data
# plane). None: no limit. `admitting` waits for a joiner loading its weights
# while everyone serves; a joiner that dies there is found by its lease.
# How long a member's iteration may stand still in steady state, while its
# peers got further or failed their step, before it is declared hung. Longer
# than any one iteration may take; None: no check.
DEFAULT_HANG_TIMEOUT_S = 30.0
HANG_CHECK_INTERVAL_S = 1.0

DEFAULT_DEADLINES_S: dict[Phase, float | None] = {
    Phase.FORMING: 60.0,
    Phase.HALTING: 10.0,
    Phase.SHRINKING: 60.0,
    Phase.ADMITTING: None,
    Phase.PAUSING: 10.0,
    Phase.REBUILDING: 60.0,
    Phase.RESYNCING: 300.0,
    Phase.RESUMING: 10.0,
}


class Step(StrEnum):
    WAIT_READY = "wait_ready"
    PREFETCH = "prefetch"
    HOLD = "hold"
    ABORT = "abort"
    REBUILD = "rebuild"
    # A shrink whose survivors lost every replica of some expert: each loads
    # what the new layout gives it from the checkpoint (plan.relayout).
    RELOAD = "reload"
    RESYNC = "resync"
    RESUME = "resume"


class OpKind(StrEnum):
    FORM = "form"
    SHRINK = "shrink"
    GROW = "grow"
    DRAIN = "drain"


STEPS: dict[OpKind, tuple[Step, ...]] = {
    OpKind.FORM: (Step.REBUILD, Step.RESUME),
    # RELOAD is passed over unless the survivors lack an expert.
    OpKind.SHRINK: (Step.ABORT, Step.REBUILD, Step.RELOAD, Step.RESUME),
    # PREFETCH moves the joiner's experts and REBUILD builds the next epoch's
    # groups while everyone serves (the survivors switch to them at RESUME);
    # the pause then covers RESYNC, which only hands over the metadata (and
    # what moved meanwhile), and RESUME.
    OpKind.GROW: (
        Step.WAIT_READY,
        Step.PREFETCH,
        Step.REBUILD,
        Step.HOLD,
        Step.RESYNC,
        Step.RESUME,
    ),
    # No ABORT: a drained rank is alive, so everyone can stop at one iteration
    # boundary instead of rolling back to a cut.
    OpKind.DRAIN: (Step.HOLD, Step.REBUILD, Step.RESUME),
}

PHASE_OF: dict[tuple[OpKind, Step], Phase] = {
    (OpKind.FORM, Step.REBUILD): Phase.FORMING,
    (OpKind.FORM, Step.RESUME): Phase.FORMING,
    (OpKind.SHRINK, Step.ABORT): Phase.HALTING,
    (OpKind.SHRINK, Step.REBUILD): Phase.SHRINKING,
    (OpKind.SHRINK, Step.RELOAD): Phase.SHRINKING,
    (OpKind.SHRINK, Step.RESUME): Phase.SHRINKING,
    (OpKind.GROW, Step.WAIT_READY): Phase.ADMITTING,
    (OpKind.GROW, Step.PREFETCH): Phase.ADMITTING,
    (OpKind.GROW, Step.HOLD): Phase.PAUSING,
    (OpKind.GROW, Step.REBUILD): Phase.REBUILDING,
    (OpKind.GROW, Step.RESYNC): Phase.RESYNCING,
    (OpKind.GROW, Step.RESUME): Phase.RESUMING,
    (OpKind.DRAIN, Step.HOLD): Phase.PAUSING,
    (OpKind.DRAIN, Step.REBUILD): Phase.SHRINKING,
    (OpKind.DRAIN, Step.RESUME): Phase.SHRINKING,
}


def phases_of(kind: OpKind) -> tuple[Phase, ...]:
    """The phases an operation of `kind` goes through, in order."""
    return tuple(dict.fromkeys(PHASE_OF[(kind, step)] for step in STEPS[kind]))


class Code(StrEnum):
    """gRPC status codes the machine refuses with (names as in grpc.StatusCode)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    NOT_FOUND = "NOT_FOUND"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"


class Role(StrEnum):
    MEMBER = "member"
    JOINER = "joiner"


def store_prefix(cluster: str, epoch: int) -> str:
    """Rendezvous keys of one epoch; the epoch in the name keeps generations apart."""
    return f"ep-recovery/{cluster}/epoch-{epoch}/"


# --- events ---------------------------------------------------------------


@dataclass(frozen=True)
class RankRegistered:
    rank: int
    session: str
    cluster: str
    incarnation: str
    lease_id: int
    fingerprint: str
    rejoin: bool
    placement: Placement | None = None
    # The lease that holds the rank's key in etcd, as the service read it when
    # the hello came (0: no key). A hello is accepted only when it is the
    # hello's own `lease_id`: a session speaks for the process whose lease
    # says the rank is alive, never for another rank's.
    key_lease: int = 0
    # The hello's proof matches the digest its rank key holds (the service
    # checked): only the process that put the key knows the proof. Values
    # shown by GetStatus or read from etcd are not enough to pose as a rank.
    proven: bool = False


@dataclass(frozen=True)
class SessionClosed:
    rank: int
    session: str


@dataclass(frozen=True)
class LeaseExpired:
    rank: int
    lease_id: int


@dataclass(frozen=True)
class LeaseRenewed:
    """A rank bound its live session to a new lease (etcd dropped the old one).
    `key_lease`: the lease holding its key in etcd, as the service read it."""

    rank: int
    session: str
    lease_id: int
    key_lease: int


@dataclass(frozen=True)
class ProgressReported:
    rank: int
    session: str
    iteration: int
    rank_clock: float | None = None  # the rank's monotonic clock, seconds


@dataclass(frozen=True)
class JoinerReady:
    rank: int
    session: str


@dataclass(frozen=True)
class StepFailed:
    rank: int
    session: str
    epoch: int
    last_completed: int
    message: str = ""


@dataclass(frozen=True)
class Held:
    iteration: int


@dataclass(frozen=True)
class PastTarget:
    iteration: int


@dataclass(frozen=True)
class Halted:
    last_completed: int


@dataclass(frozen=True)
class GroupsReady:
    build_ms: float = 0.0
    # The rank's iteration, and its clock (s) when read, as the build ended
    # (None: not reported); fresher than its last progress report.
    iteration: int | None = None
    rank_clock: float | None = None


@dataclass(frozen=True)
class Resynced:
    bytes_received: int = 0
    bytes_sent: int = 0
    transfer_ms: float = 0.0


@dataclass(frozen=True)
class Resumed:
    stall_ms: float = 0.0


@dataclass(frozen=True)
class CommandFailed:
    message: str


@dataclass(frozen=True)
class Reloaded:
    slots_loaded: int = 0
    load_ms: float = 0.0


Reply = Held | PastTarget | Halted | GroupsReady | Resynced | Reloaded | Resumed | CommandFailed


@dataclass(frozen=True)
class Acked:
    rank: int
    session: str
    epoch: int
    op_id: str
    command_id: int
    reply: Reply


@dataclass(frozen=True)
class Tick:
    """Time passed: the phase deadlines are checked against `now`."""


@dataclass(frozen=True)
class AbortOperation:
    op_id: str
    reason: str = ""


@dataclass(frozen=True)
class SetAutoRejoin:
    enabled: bool


@dataclass(frozen=True)
class Drain:
    """Remove a live member gracefully: the cluster shrinks without it, and it
    is told to leave. It is not admitted again until an operator's Admit."""

    rank: int


@dataclass(frozen=True)
class Admit:
    """Start the admission of a registered, ready joiner now (needed when
    automatic rejoin is off, and for a rank that was drained)."""

    rank: int


AdminCommand = AbortOperation | SetAutoRejoin | Drain | Admit


def describe_admin(command: AdminCommand) -> tuple[str, str]:
    """The call's name and its arguments as text, for logs and the event stream."""
    match command:
        case AbortOperation(op_id=op_id, reason=reason):
            return "AbortOperation", f"op_id={op_id!r} reason={reason!r}"
        case SetAutoRejoin(enabled=enabled):
            return "SetAutoRejoin", f"enabled={enabled}"
        case Drain(rank=rank):
            return "Drain", f"rank={rank}"
        case Admit(rank=rank):
            return "Admit", f"rank={rank}"


@dataclass(frozen=True)
class AdminRequested:
    """An operator's mutating call; answered by one AdminAnswered."""

    request_id: str
    command: AdminCommand


Event = (
    RankRegistered
    | SessionClosed
    | LeaseExpired
    | LeaseRenewed
    | ProgressReported
    | JoinerReady
    | StepFailed
    | Acked
    | Tick
    | AdminRequested
)

# --- commands and actions -------------------------------------------------


@dataclass(frozen=True)
class Hold:
    iteration: int


@dataclass(frozen=True)
class Abort:
    """Give up every collective and group build of epochs up to `epoch`: the
    operation's target epoch less one, so a build for an abandoned operation's
    epoch (above the committed one) is released too."""

    epoch: int


@dataclass(frozen=True)
class Rebuild:
    epoch: int
    members: tuple[int, ...]
    store_prefix: str


@dataclass(frozen=True)
class Prefetch:
    """Move the plan's experts on a staging group of the joiners and their
    sources, while the survivors serve (their agents send from a thread of
    their own). The same plan comes again in the pause's Resync; ranks that
    carried it out here skip its transfers there."""

    plan: TransferPlan
    epoch: int
    members: tuple[int, ...]
    store_prefix: str


@dataclass(frozen=True)
class Resync:
    plan: TransferPlan
    metadata_source: int
    placement: Placement


@dataclass(frozen=True)
class Reload:
    """Adopt `placement`, loading from the checkpoint every own slot whose
    expert it changes; `loads` is the whole plan of such loads."""

    placement: Placement
    loads: tuple[CheckpointLoad, ...]


@dataclass(frozen=True)
class Resume:
    iteration: int
    members: tuple[int, ...]


@dataclass(frozen=True)
class Retry:
    reason: str


@dataclass(frozen=True)
class Leave:
    """The rank was drained: it is no longer a member and stops serving."""

    reason: str


CommandBody = Hold | Abort | Rebuild | Prefetch | Resync | Reload | Resume | Retry | Leave


@dataclass(frozen=True)
class Accept:
    rank: int
    session: str
    role: Role
    epoch: int


@dataclass(frozen=True)
class Refuse:
    """Refuse a message. `end_session` for a refused hello (the stream ends with
    this status); otherwise the refusal is sent in-band and the session lives."""

    rank: int
    session: str
    code: Code
    message: str
    end_session: bool = False
    op_id: str = ""
    command_id: int = 0


@dataclass(frozen=True)
class Send:
    rank: int
    session: str
    epoch: int
    op_id: str
    command_id: int
    command: CommandBody


@dataclass(frozen=True)
class Persist:
    record: ClusterRecord


@dataclass(frozen=True)
class PhaseEntered:
    phase: Phase
    epoch: int
    op_id: str
    at: float


@dataclass(frozen=True)
class RankFailed:
    rank: int
    reason: str
    suspected_at: float | None
    at: float


@dataclass(frozen=True)
class OperationStarted:
    op_id: str
    kind: OpKind
    epoch: int  # the committed epoch it starts from
    target_epoch: int
    survivors: tuple[int, ...]
    joining: tuple[int, ...]
    leaving: tuple[int, ...]
    at: float


@dataclass(frozen=True)
class RankDone:
    """A rank finished its part of an operation's step: its ack counted (or,
    for a joiner, it announced readiness). The per-rank timeline of an
    operation is made of these; `started_at` is when the command went out."""

    op_id: str
    rank: int
    step: Step
    started_at: float
    at: float
    outcome: str  # "done" or "failed"


@dataclass(frozen=True)
class OperationEnded:
    op_id: str
    kind: OpKind
    outcome: str  # "completed" or "rolled_back"
    epoch: int
    joined: tuple[int, ...]
    left: tuple[int, ...]
    stall_ms: float
    reason: str = ""
    retargets: int = 0
    at: float = 0.0


@dataclass(frozen=True)
class AdminAnswered:
    """The answer to AdminRequested: `code` None is success. `op_id`: the
    operation the call started or rolled back; `command`: what was asked."""

    request_id: str
    code: Code | None
    message: str
    replayed: bool = False
    op_id: str = ""
    command: AdminCommand | None = None


Action = (
    Accept
    | Refuse
    | Send
    | Persist
    | PhaseEntered
    | RankFailed
    | OperationStarted
    | RankDone
    | OperationEnded
    | AdminAnswered
)

# Answers kept for replay to a retried admin call (per request id).
ADMIN_ANSWERS_KEPT = 1024


# --- state ----------------------------------------------------------------


@dataclass(frozen=True)
class OperationRecord:
    op_id: str
    kind: OpKind
    step: Step
    target_epoch: int
    survivors: tuple[int, ...]
    joining: tuple[int, ...]
    leaving: tuple[int, ...]
    hold_iteration: int | None
    cut: int | None


@dataclass(frozen=True)
class ClusterRecord:
    """What the coordinator persists on every transition: where things stand."""

    cluster: str
    world_size: int
    fingerprint: str
    epoch: int
    members: tuple[int, ...]
    phase: Phase
    placement: Placement | None
    operation: OperationRecord | None
    last_epoch: int
    op_seq: int
    next_command_id: int = 1
    auto_rejoin: bool = True
    # Ranks an operator drained and has not admitted again: never auto-admitted.
    drained: tuple[int, ...] = ()
    # (rank, incarnation) of each live member: a new leader recognises a
    # member that reconnects even when an etcd outage took its key.
    incarnations: tuple[tuple[int, str], ...] = ()
    # (rank, incarnation) of the last process of each rank that was removed
    # from the members (failed): it never comes back, whatever it says.
    removed: tuple[tuple[int, str], ...] = ()

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ClusterRecord:
        """The inverse of to_json; ValueError (naming the problem) on a bad record."""
        try:
            d = json.loads(raw)
            placement = d["placement"]
            op = d["operation"]
            return cls(
                cluster=str(d["cluster"]),
                world_size=int(d["world_size"]),
                fingerprint=str(d["fingerprint"]),
                epoch=int(d["epoch"]),
                members=tuple(int(r) for r in d["members"]),
                phase=Phase(d["phase"]),
                placement=None
                if placement is None
                else Placement(
                    int(placement["version"]),
                    int(placement["slots_per_rank"]),
                    tuple(tuple(int(e) for e in layer) for layer in placement["layers"]),
                ),
                operation=None
                if op is None
                else OperationRecord(
                    op_id=str(op["op_id"]),
                    kind=OpKind(op["kind"]),
                    step=Step(op["step"]),
                    target_epoch=int(op["target_epoch"]),
                    survivors=tuple(int(r) for r in op["survivors"]),
                    joining=tuple(int(r) for r in op["joining"]),
                    leaving=tuple(int(r) for r in op["leaving"]),
                    hold_iteration=op["hold_iteration"],
                    cut=op["cut"],
                ),
                last_epoch=int(d["last_epoch"]),
                op_seq=int(d["op_seq"]),
                next_command_id=int(d.get("next_command_id", 1)),
                auto_rejoin=bool(d.get("auto_rejoin", True)),
                drained=tuple(int(r) for r in d.get("drained", ())),
                incarnations=tuple((int(r), str(i)) for r, i in d.get("incarnations", ())),
                removed=tuple((int(r), str(i)) for r, i in d.get("removed", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"unreadable cluster record: {exc!r}") from exc


@dataclass
class RankView:
    session: str | None = None
    incarnation: str = ""
    lease_id: int = 0
    progress: ProgressSample | None = None
    last_seen: float = 0.0
    suspected_at: float | None = None
    # Its session closed while this coordinator led. A member restored from
    # the record is suspect too until it reconnects, but its silence is the
    # take-over's, not evidence of a death.
    session_closed: bool = False
    # When etcd dropped its lease while its session stayed open: it has
    # `lease_rebind_s` to bind the session to a new lease (LeaseRenewed).
    lease_lost_at: float | None = None
    # Leases of this rank whose expiry etcd reported: a renewal or hello naming
    # one arrived after its own expiry (the two travel different paths) and
    # proves nothing.
    dead_leases: set[int] = field(default_factory=set)
    failed: bool = False
    ready: bool = False


@dataclass
class Operation:
    op_id: str
    kind: OpKind
    survivors: tuple[int, ...]
    joining: tuple[int, ...]
    leaving: tuple[int, ...]
    target_epoch: int
    started_at: float
    step: Step = Step.WAIT_READY
    step_started_at: float = 0.0
    command: CommandBody | None = None
    command_sent_at: float = 0.0
    command_id: int = 0
    awaiting: set[int] = field(default_factory=set)
    hold_iteration: int | None = None
    hold_attempt: int = 0
    cut: int | None = None
    halted: dict[int, int] = field(default_factory=dict)
    stall_ms: dict[int, float] = field(default_factory=dict)
    plan: TransferPlan | None = None
    # A shrink that re-lays experts lost with every replica: the layout it
    # commits, and the checkpoint loads that fill it (plan.relayout).
    placement: Placement | None = None
    loads: tuple[CheckpointLoad, ...] = ()

    @property
    def participants(self) -> tuple[int, ...]:
        return tuple(sorted(self.survivors + self.joining))

    @property
    def hold_ranks(self) -> tuple[int, ...]:
        """The ranks told to hold at the cut: the survivors, and a rank being
        drained. It is still in the old groups, so it stops at the same
        boundary rather than leaving its peers inside a collective."""
        if self.kind == OpKind.DRAIN:
            return tuple(sorted(self.survivors + self.leaving))
        return self.survivors

    def record(self) -> OperationRecord:
        return OperationRecord(
            self.op_id,
            self.kind,
            self.step,
            self.target_epoch,
            self.survivors,
            self.joining,
            self.leaving,
            self.hold_iteration,
            self.cut,
        )


class RecoveryStateMachine:
    def __init__(
        self,
        cluster: str,
        world_size: int,
        *,
        fingerprint: str = "",
        auto_rejoin: bool = True,
        hold_lead_s: float = 0.05,
        deadlines_s: Mapping[Phase, float | None] | None = None,
        hang_timeout_s: float | None = DEFAULT_HANG_TIMEOUT_S,
        lease_rebind_s: float = DEFAULT_LEASE_REBIND_S,
        reconnect_window_s: float = DEFAULT_RECONNECT_WINDOW_S,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.cluster = cluster
        self.world_size = world_size
        self.fingerprint = fingerprint
        self.auto_rejoin = auto_rejoin
        self.hold_lead_s = hold_lead_s
        # The lead the next hold uses: `hold_lead_s`, widened to what the last
        # retargeted hold needed (a large cluster's fan-out outruns a fixed
        # lead; each retarget re-sends the order to every survivor).
        self.hold_lead_now_s = hold_lead_s
        self.deadlines_s = {**DEFAULT_DEADLINES_S, **(deadlines_s or {})}
        self.hang_timeout_s = hang_timeout_s
        self.lease_rebind_s = lease_rebind_s
        self.reconnect_window_s = reconnect_window_s
        # Until when a new leader waits for the members to reconnect (restore).
        self._reconnect_until = 0.0
        # Since when no operation runs: a rank's silence counts from here at the
        # earliest (held ranks report nothing).
        self._quiet_since = 0.0
        self._next_hang_check = 0.0
        self.phase = Phase.FORMING
        self.epoch = 0
        self.members: tuple[int, ...] = ()
        self.placement: Placement | None = None
        self.ranks: dict[int, RankView] = {}
        self.joiners: set[int] = set()
        self.op: Operation | None = None
        self.last_epoch = 0
        self.op_seq = 0
        self._next_command_id = 1
        # Drained by an operator and not admitted since: only an Admit brings
        # them back, whatever auto_rejoin says.
        self.drained: set[int] = set()
        # Ranks that reported a failed step in this epoch, and when: evidence
        # that, together with a broken session, confirms a death before the
        # lease ends.
        self._step_failures: dict[int, float] = {}
        # When the first of them arrived: the lockstep hang check waits for
        # the stragglers' reports before it trusts who did not fail.
        self._first_step_failure_at: float | None = None
        self._out: list[Action] = []
        self._now = 0.0
        self._last_record: ClusterRecord | None = None
        self._admin_answers: OrderedDict[str, tuple[AdminCommand, AdminAnswered]] = OrderedDict()
        # Processes of members (and joiners) of a cluster that was lost: never
        # founders of the next formation (see _cluster_lost).
        self._lost_incarnations: set[str] = set()
        # Per rank, the process (incarnation) last removed from the members:
        # a removed process that reconnects (a partition healed, a frozen
        # process thawed) is refused, also when it was launched with
        # --rejoin, which would otherwise admit it as a joiner. Persisted, so
        # a new leader refuses it too. One per rank: bounded by the world.
        self.removed: dict[int, str] = {}

    # --- public -------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """A cluster with no persisted record: the first record to write."""
        self._now = now
        self._out = []
        self._persist_if_changed()
        out, self._out = self._out, []
        return out

    def handle(self, event: Event, now: float) -> list[Action]:
        self._now = now
        if isinstance(event, ProgressReported):
            # The hot path (most events at scale): a report emits nothing and
            # changes nothing persisted, unless its session no longer speaks
            # for the rank.
            return self._on_progress(event)
        self._out = []
        match event:
            case RankRegistered():
                self._on_registered(event)
            case SessionClosed():
                self._on_session_closed(event)
            case LeaseExpired():
                self._on_lease_expired(event)
            case LeaseRenewed():
                self._on_lease_renewed(event)
            case JoinerReady():
                self._on_joiner_ready(event)
            case StepFailed():
                self._on_step_failed(event)
            case Acked():
                self._on_ack(event)
            case Tick():
                self._on_tick()
            case AdminRequested():
                self._on_admin(event)
        self._persist_if_changed()
        out, self._out = self._out, []
        return out

    def record(self) -> ClusterRecord:
        return ClusterRecord(
            cluster=self.cluster,
            world_size=self.world_size,
            fingerprint=self.fingerprint,
            epoch=self.epoch,
            members=self.members,
            phase=self.phase,
            placement=self.placement,
            operation=self.op.record() if self.op else None,
            last_epoch=self.last_epoch,
            op_seq=self.op_seq,
            next_command_id=self._next_command_id,
            auto_rejoin=self.auto_rejoin,
            drained=tuple(sorted(self.drained)),
            incarnations=tuple(
                (r, view.incarnation)
                for r in self.members
                if (view := self.ranks.get(r)) is not None
                and not view.failed
                and r not in self.joiners
            ),
            removed=tuple(sorted(self.removed.items())),
        )

    def restore(
        self, record: ClusterRecord, live: Mapping[int, tuple[str, int]], now: float
    ) -> list[Action]:
        """Take over from a coordinator that stopped (crashed, restarted, was
        deposed) with `record` persisted. `live` maps each rank whose etcd key
        still exists to its (incarnation, lease id). Every member is expected to
        reconnect: one with a key until its lease ends, one without (it died,
        or is renewing a lease an etcd outage took) for the reconnection
        window.

        An operation in flight is rolled back under its own id: survivors
        rebuild the last committed epoch's groups (or the committed one's, if
        the resume order had gone out) and joiners start their admission over.
        """
        if (record.cluster, record.world_size) != (self.cluster, self.world_size):
            raise ValueError(
                f"persisted record is for cluster {record.cluster!r} of {record.world_size} "
                f"ranks; this coordinator serves {self.cluster!r} of {self.world_size}"
            )
        if self.members or self.ranks or self.op is not None:
            raise RuntimeError("restore() is only for a fresh machine")
        self._now = now
        self._out = []
        self.fingerprint = self.fingerprint or record.fingerprint
        self.epoch = record.epoch
        self.members = record.members
        self.placement = record.placement
        self.last_epoch = record.last_epoch
        self.op_seq = record.op_seq
        self._next_command_id = max(self._next_command_id, record.next_command_id)
        self.auto_rejoin = record.auto_rejoin  # an operator's choice outlives a restart
        self.drained = set(record.drained)
        self.removed = dict(record.removed)
        self.phase = record.phase
        self._reconnect_until = now + self.reconnect_window_s
        live_members = dict(record.incarnations)
        for rank in self.members:
            key = live.get(rank)
            if key is not None and (not live_members or key[0] == live_members.get(rank)):
                incarnation, lease_id = key
            elif key is None and rank in live_members:
                # No key, but live when last persisted: maybe a rank renewing
                # a lease that an etcd outage took. It has the reconnection
                # window to come back (_check_leases fails it after that).
                incarnation, lease_id = live_members[rank], 0
            else:
                # Failed before, or its key is held by another process (a
                # relaunch, which registers as a joiner): the member is gone.
                reason = (
                    "replaced by a new incarnation while no coordinator ran"
                    if key is not None
                    else "lease gone while no coordinator ran"
                )
                if rank in live_members:
                    self.removed[rank] = live_members[rank]
                self.ranks[rank] = RankView(failed=True)
                self._emit(RankFailed(rank, reason, None, now))
                continue
            # No session until it reconnects: suspect, like a blip.
            self.ranks[rank] = RankView(
                incarnation=incarnation, lease_id=lease_id, last_seen=now, suspected_at=now
            )
        op = record.operation
        if op is not None and self.members:
            self.op = Operation(
                op_id=op.op_id,
                kind=op.kind,
                survivors=op.survivors,
                joining=op.joining,
                leaving=op.leaving,
                target_epoch=op.target_epoch,
                started_at=now,
                step=op.step,
                step_started_at=now,
            )
            self._abandon(f"coordinator restarted during {record.phase}")
        else:
            # Idle, or a formation that never committed: founders register anew.
            self.phase = self._idle_phase()
        self._maybe_start_operation()
        if not any(isinstance(a, PhaseEntered) for a in self._out):
            # The new timeline starts where things stand.
            self._emit(PhaseEntered(self.phase, self.epoch, self.op.op_id if self.op else "", now))
        self._persist_if_changed()
        out, self._out = self._out, []
        return out

    def pending_members(self) -> tuple[int, ...]:
        if self.op is None:
            return self.members
        return self.op.participants

    def rank_state(self, rank: int) -> str:
        if rank in self.joiners:
            return "joining"
        if rank in self.drained:
            return "drained"
        view = self.ranks.get(rank)
        if view is None:
            return "absent"
        if view.failed:
            return "failed"
        if rank in self.members and (
            view.suspected_at is not None or view.lease_lost_at is not None
        ):
            return "suspect"
        if rank in self.members:
            return "serving"
        return "absent" if view.session is None else "registered"

    # --- registration -------------------------------------------------------

    def _refuse_hello(self, ev: RankRegistered, code: Code, message: str) -> None:
        self._emit(Refuse(ev.rank, ev.session, code, message, end_session=True))

    def _on_registered(self, ev: RankRegistered) -> None:
        if ev.cluster != self.cluster:
            return self._refuse_hello(
                ev,
                Code.INVALID_ARGUMENT,
                f"cluster {ev.cluster!r} does not match this coordinator's {self.cluster!r}",
            )
        if not 0 <= ev.rank < self.world_size:
            return self._refuse_hello(
                ev,
                Code.INVALID_ARGUMENT,
                f"rank {ev.rank} is outside the cluster (world size {self.world_size}: "
                f"ranks 0..{self.world_size - 1})",
            )
        if self.fingerprint and ev.fingerprint != self.fingerprint:
            return self._refuse_hello(
                ev,
                Code.FAILED_PRECONDITION,
                f"engine fingerprint {ev.fingerprint!r} of rank {ev.rank} does not match "
                f"the cluster's {self.fingerprint!r}",
            )
        if ev.incarnation in self._lost_incarnations:
            # Its engine served the lost cluster's epochs: it cannot start a
            # new formation from iteration 0 without starting afresh.
            return self._refuse_hello(
                ev,
                Code.FAILED_PRECONDITION,
                f"rank {ev.rank}'s process served the cluster that was lost; relaunch it "
                "(with or without --rejoin) to form the cluster again",
            )
        if self.removed.get(ev.rank) == ev.incarnation:
            # A member this coordinator (or one before it) failed: it was
            # cut off (a partition, a freeze) and comes back now. The cluster
            # went on without it, and its engine's state is not a fresh
            # joiner's: it stops, and a relaunch rejoins.
            return self._refuse_hello(
                ev,
                Code.FAILED_PRECONDITION,
                f"rank {ev.rank}'s process {ev.incarnation} was removed from cluster "
                f"{self.cluster!r}; it may not serve again: relaunch rank {ev.rank} "
                "with --rejoin",
            )
        view = self.ranks.get(ev.rank)
        if ev.rank in self.drained and view and view.incarnation == ev.incarnation:
            # The drained process itself, reconnecting (its Leave was lost with
            # the old session): it has no place here any more.
            return self._refuse_hello(
                ev,
                Code.FAILED_PRECONDITION,
                f"rank {ev.rank} was drained from cluster {self.cluster!r}; it stays out "
                "until an operator admits it (relaunch it with --rejoin, then Admit)",
            )
        if (
            view
            and view.session is not None
            and not view.failed
            and view.incarnation != ev.incarnation
        ):
            return self._refuse_hello(
                ev,
                Code.ALREADY_EXISTS,
                f"rank {ev.rank} is already registered and live "
                f"(incarnation {view.incarnation}); a second process cannot take its place",
            )
        # Every way in from here accepts the hello: it must come from the
        # holder of the rank's lease.
        if not ev.key_lease:
            return self._refuse_hello(
                ev,
                Code.FAILED_PRECONDITION,
                f"rank {ev.rank} has no key in etcd: a rank takes its lease before its "
                "session (expired or revoked: relaunch the rank)",
            )
        if ev.key_lease != ev.lease_id:
            return self._refuse_hello(
                ev,
                Code.PERMISSION_DENIED,
                f"this session's lease does not hold rank {ev.rank}'s key: a session "
                "speaks only for its own rank's lease",
            )
        if not ev.proven:
            return self._refuse_hello(
                ev,
                Code.UNAUTHENTICATED,
                f"the hello for rank {ev.rank} does not carry the proof its rank key names: "
                "only the process that holds the rank's lease can speak for it",
            )
        if view and not view.failed and view.incarnation == ev.incarnation:
            if ev.lease_id in view.dead_leases:
                return self._refuse_hello(
                    ev,
                    Code.FAILED_PRECONDITION,
                    f"the lease of rank {ev.rank}'s hello has expired",
                )
            # The same process reconnecting (its session broke): adopt the new one.
            return self._reattach(ev, view)
        if not self.members:
            return self._register_founder(ev)
        if not ev.rejoin:
            return self._refuse_hello(
                ev,
                Code.FAILED_PRECONDITION,
                f"cluster {self.cluster!r} is already serving (epoch {self.epoch}); "
                f"relaunch rank {ev.rank} with --rejoin to be admitted",
            )
        if ev.rank in self.members:
            # A relaunched process for a member proves the old one is gone.
            self._confirm_failed(ev.rank, "replaced by a new incarnation")
        self.ranks[ev.rank] = RankView(
            session=ev.session,
            incarnation=ev.incarnation,
            lease_id=ev.lease_id,
            last_seen=self._now,
        )
        self.joiners.add(ev.rank)
        self._emit(Accept(ev.rank, ev.session, Role.JOINER, self.epoch))
        self._maybe_start_operation()

    def _register_founder(self, ev: RankRegistered) -> None:
        # A cluster that formed before and lost every member (last_epoch > 0)
        # is formed again by whatever comes back, relaunched with --rejoin as
        # supervisors do; the epochs go on upward. Only a cluster that never
        # formed needs first starts.
        if ev.rejoin and self.last_epoch == 0:
            return self._refuse_hello(
                ev,
                Code.FAILED_PRECONDITION,
                f"cluster {self.cluster!r} has not formed yet; start rank {ev.rank} "
                "without --rejoin",
            )
        if ev.placement is None:
            return self._refuse_hello(
                ev, Code.INVALID_ARGUMENT, f"rank {ev.rank} sent no expert placement"
            )
        if self.placement is not None and ev.placement != self.placement:
            return self._refuse_hello(
                ev,
                Code.FAILED_PRECONDITION,
                f"expert placement of rank {ev.rank} differs from the other founders'",
            )
        self.placement = ev.placement
        if not self.fingerprint:
            self.fingerprint = ev.fingerprint
        self.ranks[ev.rank] = RankView(
            session=ev.session,
            incarnation=ev.incarnation,
            lease_id=ev.lease_id,
            last_seen=self._now,
        )
        self._emit(Accept(ev.rank, ev.session, Role.MEMBER, self.epoch))
        self._maybe_start_operation()

    def _reattach(self, ev: RankRegistered, view: RankView) -> None:
        if ev.lease_id != view.lease_id:
            view.lease_lost_at = None  # it came back on a new lease
        view.session = ev.session
        view.lease_id = ev.lease_id
        view.suspected_at = None
        view.session_closed = False
        view.last_seen = self._now
        role = Role.JOINER if ev.rank in self.joiners else Role.MEMBER
        self._emit(Accept(ev.rank, ev.session, role, self.epoch))
        op = self.op
        if op and ev.rank in op.awaiting and op.command is not None:
            self._emit(
                Send(ev.rank, ev.session, op.target_epoch, op.op_id, op.command_id, op.command)
            )
        self._maybe_start_operation()

    # --- liveness -------------------------------------------------------------

    def _current(self, rank: int, session: str) -> RankView | None:
        view = self.ranks.get(rank)
        if view is None or view.session != session:
            return None
        view.last_seen = self._now
        return view

    def _on_session_closed(self, ev: SessionClosed) -> None:
        view = self.ranks.get(ev.rank)
        if view is None or view.session != ev.session:
            return
        view.session = None
        if ev.rank in self.joiners or not self.members:
            # Not serving anyone: a joiner or founder that left is simply gone.
            return self._confirm_failed(ev.rank, "session closed before admission")
        if ev.rank in self.members:
            if view.lease_lost_at is not None:
                # Both signals: no lease, and now no session either.
                return self._confirm_failed(ev.rank, "lease expired and session closed")
            view.suspected_at = self._now
            view.session_closed = True
            # A peer's step that failed just before is the other half of the
            # evidence: a SIGKILLed rank's peers often report within the same
            # millisecond as its broken session. An older failure does not
            # condemn an unrelated session blip (BUG-6).
            recent = self._now - STEP_FAILURE_WINDOW_S
            if any(r != ev.rank and t >= recent for r, t in self._step_failures.items()):
                self._confirm_failed(ev.rank, "session closed and peers' collectives failed")

    def _on_lease_expired(self, ev: LeaseExpired) -> None:
        view = self.ranks.get(ev.rank)
        if view is not None and ev.lease_id:
            if len(view.dead_leases) >= DEAD_LEASES_KEPT:
                view.dead_leases.pop()
            view.dead_leases.add(ev.lease_id)
        if view is None or view.failed or (ev.lease_id and ev.lease_id != view.lease_id):
            return
        if ev.rank in self.drained and ev.rank not in self.joiners:
            # A drained rank that left revokes its lease: the end of the drain,
            # not a failure.
            view.session = None
            return
        if view.session is not None:
            # Its session is open: the lease alone does not prove it dead (an
            # etcd outage expires every lease). It binds its session to a new
            # lease within lease_rebind_s, or is failed (_check_leases).
            if view.lease_lost_at is None:
                view.lease_lost_at = self._now
            return
        self._confirm_failed(ev.rank, "lease expired")

    def _on_lease_renewed(self, ev: LeaseRenewed) -> None:
        view = self._current(ev.rank, ev.session)
        if view is None or view.failed:
            return
        if ev.lease_id in view.dead_leases:
            # Its new lease is gone too: it is as lease-less as before.
            if view.lease_lost_at is None:
                view.lease_lost_at = self._now
            return
        if ev.key_lease != ev.lease_id:
            # Not the lease that holds its key: no proof of anything.
            self._emit(
                Refuse(
                    ev.rank,
                    ev.session,
                    Code.PERMISSION_DENIED,
                    f"the renewed lease does not hold rank {ev.rank}'s key",
                )
            )
            return
        view.lease_id = ev.lease_id
        view.lease_lost_at = None
        self._maybe_start_operation()  # a grow may have waited for this suspicion

    def _check_leases(self) -> None:
        """Members that lost their lease and did not bind a new one in time,
        and, once a new leader's reconnection window has passed, members that
        neither reconnected nor have a key: both are failed."""
        for rank, view in sorted(self.ranks.items()):
            if view.failed:
                continue
            if view.lease_lost_at is not None and (
                self._now - view.lease_lost_at > self.lease_rebind_s
            ):
                reason = f"lease expired and no new lease within {self.lease_rebind_s:g} s"
                self._end_session(rank, f"removed: {reason}")
                self._confirm_failed(rank, reason)
            elif (
                rank in self.members
                and view.session is None
                and view.lease_id == 0
                and view.suspected_at is not None
                and self._now > self._reconnect_until
            ):
                self._confirm_failed(
                    rank,
                    f"no rank key and no reconnection within {self.reconnect_window_s:g} s "
                    "of the take-over",
                )

    def _on_progress(self, ev: ProgressReported) -> list[Action]:
        view = self._current(ev.rank, ev.session)
        if view is not None and not view.failed:
            view.progress = next_sample(view.progress, ev.iteration, self._now, ev.rank_clock)
            return []
        # A process that still reports on a session the cluster no longer
        # counts (its rank was failed while it lived, or another process took
        # the rank): it is told, so that it stops serving instead of holding
        # on to groups nobody uses. A session the rank itself left (a
        # reconnect) is already closed and hears nothing.
        why = "it was removed from the cluster" if view is not None else "it was replaced"
        return [
            Refuse(
                ev.rank,
                ev.session,
                Code.FAILED_PRECONDITION,
                f"this session no longer speaks for rank {ev.rank}: {why}; stop serving",
                end_session=True,
            )
        ]

    def _on_step_failed(self, ev: StepFailed) -> None:
        if self._current(ev.rank, ev.session) is None or ev.epoch != self.epoch:
            return
        if self.op is not None and self.op.kind == OpKind.SHRINK:
            return  # the shrink's own Abort made the step fail: no evidence (BUG-6)
        self._note_step_failure(ev.rank)
        for rank in self.members:
            view = self.ranks.get(rank)
            if view and view.session_closed and not view.failed:
                self._confirm_failed(rank, "session closed and peers' collectives failed")

    def _note_step_failure(self, rank: int) -> None:
        self._step_failures[rank] = self._now
        if self._first_step_failure_at is None:
            self._first_step_failure_at = self._now

    def _confirm_failed(self, rank: int, reason: str) -> None:
        if not self._mark_failed(rank, reason):
            return
        op = self.op
        if op is not None and self._needed_by(op, rank):
            self._abandon(f"rank {rank} failed: {reason}")
        self._maybe_start_operation()

    @staticmethod
    def _needed_by(op: Operation, rank: int) -> bool:
        """Whether the operation cannot go on without `rank`: a participant of
        the new epoch, or, until everyone holds at the cut, any rank still in
        the old groups (a drained rank dying there breaks its peers' step)."""
        return rank in op.participants or (op.step == Step.HOLD and rank in op.hold_ranks)

    def _mark_failed(self, rank: int, reason: str) -> bool:
        view = self.ranks.setdefault(rank, RankView())
        if view.failed:
            return False
        if rank in self.members and rank not in self.joiners and view.incarnation:
            self.removed[rank] = view.incarnation
        view.failed = True
        view.ready = False
        self._emit(RankFailed(rank, reason, view.suspected_at, self._now))
        view.suspected_at = None
        view.session_closed = False
        self.joiners.discard(rank)
        return True

    # --- operators --------------------------------------------------------------

    def _on_admin(self, ev: AdminRequested) -> None:
        if not 1 <= len(ev.request_id) <= 128:
            return self._emit(
                AdminAnswered(
                    ev.request_id,
                    Code.INVALID_ARGUMENT,
                    f"request_id must be 1 to 128 characters, got {len(ev.request_id)}",
                    command=ev.command,
                )
            )
        seen = self._admin_answers.get(ev.request_id)
        if seen is not None:
            request, answer = seen
            if request != ev.command:
                return self._emit(
                    AdminAnswered(
                        ev.request_id,
                        Code.INVALID_ARGUMENT,
                        f"request_id {ev.request_id!r} was already used for {request}",
                        command=ev.command,
                    )
                )
            return self._emit(replace(answer, replayed=True))
        answer = replace(self._admin(ev.request_id, ev.command), command=ev.command)
        self._admin_answers[ev.request_id] = (ev.command, answer)
        while len(self._admin_answers) > ADMIN_ANSWERS_KEPT:
            self._admin_answers.popitem(last=False)
        self._emit(answer)
        self._maybe_start_operation()

    def _admin(self, request_id: str, command: AdminCommand) -> AdminAnswered:
        match command:
            case SetAutoRejoin(enabled=enabled):
                self.auto_rejoin = enabled
                state = "on" if enabled else "off"
                return AdminAnswered(request_id, None, f"automatic rejoin is {state}")
            case AbortOperation(op_id=op_id, reason=reason):
                op = self.op
                if not op_id:
                    return AdminAnswered(request_id, Code.INVALID_ARGUMENT, "op_id is empty")
                if op is None or op.op_id != op_id:
                    current = repr(op.op_id) if op else "none"
                    return AdminAnswered(
                        request_id,
                        Code.NOT_FOUND,
                        f"operation {op_id!r} is not in flight (in flight: {current})",
                    )
                if op.kind not in (OpKind.GROW, OpKind.DRAIN):
                    return AdminAnswered(
                        request_id,
                        Code.FAILED_PRECONDITION,
                        f"operation {op_id!r} is a {op.kind}: it restores the serving set "
                        "and cannot be aborted",
                    )
                self._abandon(f"aborted by an operator: {reason or 'no reason given'}")
                return AdminAnswered(
                    request_id, None, f"operation {op_id!r} rolled back", op_id=op_id
                )
            case Drain(rank=rank):
                return self._drain(request_id, rank)
            case Admit(rank=rank):
                return self._admit(request_id, rank)

    def _refusal(self, request_id: str, rank: int) -> AdminAnswered | None:
        """The refusal every call naming a rank shares: a rank outside the
        world. None when the rank is one of the cluster's slots."""
        if 0 <= rank < self.world_size:
            return None
        return AdminAnswered(
            request_id,
            Code.INVALID_ARGUMENT,
            f"rank {rank} is outside the cluster (world size {self.world_size}: "
            f"ranks 0..{self.world_size - 1})",
        )

    def _busy(self, request_id: str, what: str) -> AdminAnswered | None:
        """FAILED_PRECONDITION while the cluster cannot start an operation: one
        is in flight, or a member is suspect (its fate decides the next one)."""
        op = self.op
        if op is not None:
            return AdminAnswered(
                request_id,
                Code.FAILED_PRECONDITION,
                f"operation {op.op_id!r} ({op.kind}, {self.phase}) is in flight; "
                f"{what} once it has ended",
            )
        suspects = [
            r for r in self.members if self.ranks.get(r, RankView()).suspected_at is not None
        ]
        if suspects:
            return AdminAnswered(
                request_id,
                Code.FAILED_PRECONDITION,
                f"member(s) {suspects} lost their session and are not yet confirmed dead "
                f"or back; {what} once that is settled",
            )
        return None

    def _drain(self, request_id: str, rank: int) -> AdminAnswered:
        refused = self._refusal(request_id, rank)
        if refused is not None:
            return refused
        if not self.members:
            return AdminAnswered(
                request_id,
                Code.FAILED_PRECONDITION,
                f"cluster {self.cluster!r} has not formed yet: rank {rank} is not a member "
                "that could be drained",
            )
        if rank not in self.members:
            return AdminAnswered(
                request_id,
                Code.NOT_FOUND,
                f"rank {rank} is not a member of epoch {self.epoch} "
                f"(members {list(self.members)}; rank {rank} is {self.rank_state(rank)})",
            )
        busy = self._busy(request_id, f"drain rank {rank}")
        if busy is not None:
            return busy
        if self.members == (rank,):
            return AdminAnswered(
                request_id,
                Code.FAILED_PRECONDITION,
                f"rank {rank} is the last member; draining it would leave nobody serving",
            )
        lost = self._unplaced_on(r for r in self.members if r != rank)
        if lost is not None:
            layer, expert = lost
            return AdminAnswered(
                request_id,
                Code.FAILED_PRECONDITION,
                f"draining rank {rank} would leave expert {expert} of layer {layer} "
                "with no replica on the remaining members",
            )
        op = self._new_op(OpKind.DRAIN, (r for r in self.members if r != rank), ())
        self._begin(op)
        return AdminAnswered(
            request_id, None, f"draining rank {rank} (operation {op.op_id!r})", op_id=op.op_id
        )

    def _unplaced_on(self, ranks: Iterable[int]) -> tuple[int, int] | None:
        """A (layer, expert) none of `ranks` holds, if any: with only them the
        cluster could not serve that expert, nor hand it to a joiner later."""
        placement = self.placement
        if placement is None:
            return None
        rest = list(ranks)
        for layer, slot_expert in enumerate(placement.layers):
            held = {slot_expert[s] for r in rest for s in placement.slots_of_rank(r)}
            missing = sorted(set(slot_expert) - held)
            if missing:
                return layer, missing[0]
        return None

    def _admit(self, request_id: str, rank: int) -> AdminAnswered:
        refused = self._refusal(request_id, rank)
        if refused is not None:
            return refused
        if rank in self.members:
            return AdminAnswered(
                request_id,
                Code.FAILED_PRECONDITION,
                f"rank {rank} is already a member of epoch {self.epoch}",
            )
        view = self.ranks.get(rank)
        if rank not in self.joiners or view is None or view.session is None:
            return AdminAnswered(
                request_id,
                Code.FAILED_PRECONDITION,
                f"rank {rank} is not waiting to join (it is {self.rank_state(rank)}); "
                "relaunch it with --rejoin first",
            )
        if not view.ready:
            return AdminAnswered(
                request_id,
                Code.FAILED_PRECONDITION,
                f"rank {rank} registered but has not announced it is ready "
                "(its engine has not reached its first iteration boundary)",
            )
        busy = self._busy(request_id, f"admit rank {rank}")
        if busy is not None:
            return busy
        assert self.placement is not None  # joiners exist only once formed
        try:
            transfer_plan(self.placement, self.members, (rank,))
        except PlanError as exc:
            return AdminAnswered(
                request_id, Code.FAILED_PRECONDITION, f"rank {rank} cannot be admitted: {exc}"
            )
        self.drained.discard(rank)
        op = self._new_op(OpKind.GROW, self.members, (rank,))
        self._begin(op)
        return AdminAnswered(
            request_id, None, f"admitting rank {rank} (operation {op.op_id!r})", op_id=op.op_id
        )

    def _on_tick(self) -> None:
        self._check_leases()
        op = self.op
        if op is None:
            # A scan of every member; the timeout is tens of seconds, so once
            # a second is soon enough (at 1,024 ranks, 4 scans a second were
            # a sixth of the coordinator's steady-state CPU).
            if self._now >= self._next_hang_check:
                self._next_hang_check = self._now + HANG_CHECK_INTERVAL_S
                self._check_hangs()
            return
        phase = PHASE_OF[(op.kind, op.step)]
        limit = self.deadlines_s.get(phase)
        if limit is None or self._now - op.step_started_at <= limit:
            return
        if self._now <= self._reconnect_until and any(
            self.ranks.get(r, RankView()).session is None for r in op.awaiting
        ):
            # A new leader: the silent ones may still be on their way to it.
            return
        reason = f"{phase} passed its deadline of {limit:g} s"
        # The ranks that never answered are hung: alive by their lease, silent
        # here. They leave with the rollback; the others resume without them.
        # Not one whose engine went on iterating during the step: it is alive,
        # and the step was slow (a hold retargeted again and again across
        # 1,024 ranks failed hundreds of serving ranks this way).
        serving = sorted(r for r in op.awaiting if self._iterated_since(r, op.step_started_at))
        culprits = sorted(op.awaiting - set(serving))
        for rank in culprits:
            self._mark_failed(rank, f"no answer in {reason}")
            self._end_session(rank, f"declared hung: no answer in {reason}")
        if culprits:
            reason += f" waiting for ranks {culprits}"
        if serving:
            reason += f" ({'ranks' if len(serving) > 1 else 'rank'} {serving} iterating: not hung)"
        self._abandon(reason)

    def _iterated_since(self, rank: int, since: float) -> bool:
        """A progress report (one is sent only when the iteration moved) or a
        PastTarget answer came from `rank` after `since`."""
        progress = self.ranks.get(rank, RankView()).progress
        return progress is not None and progress.at > since

    def _check_hangs(self) -> None:
        """Members whose iteration has not moved for `hang_timeout_s` while the
        cluster is not idle as a whole: a peer got further, or a peer's step
        failed (in lockstep EP the peers of a stuck rank block in their next
        collective until it times out) and this rank's did not. Its lease is
        alive, so nothing else would ever find it. It is failed like a dead
        rank, and its session ended so its engine stops at the next boundary."""
        limit = self.hang_timeout_s
        if limit is None or self.phase not in (Phase.STEADY, Phase.DEGRADED):
            return
        live = {
            r: view
            for r in self.members
            if (view := self.ranks.get(r)) is not None
            and not view.failed
            and view.suspected_at is None
            and view.progress is not None
        }
        if len(live) < 2:
            return  # nobody to compare with: an idle engine looks the same

        def silent_for(view: RankView) -> float:
            assert view.progress is not None
            return self._now - max(view.progress.at, self._quiet_since)

        iterations = {r: v.progress.iteration for r, v in live.items() if v.progress}
        furthest = max(iterations.values())
        failed_steps = {r for r in self._step_failures if r in live}
        # Peers blocked on the stuck rank time out together, but their reports
        # reach us spread out (a loaded host, a slow link): until the first is
        # `limit` old, a peer whose report is still on its way looks as silent
        # as the stuck rank.
        first = self._first_step_failure_at
        lockstep_evidence = bool(failed_steps) and first is not None and self._now - first > limit
        hung = [
            rank
            for rank, view in sorted(live.items())
            if silent_for(view) > limit
            and rank not in failed_steps
            and (furthest > iterations[rank] + 1 or lockstep_evidence)
        ]
        if len(hung) == len(live):
            return  # everyone: that is the cluster idling, or no one to trust
        for rank in hung:
            reason = f"no progress for {limit:g} s past iteration {iterations[rank]}"
            self._end_session(rank, f"declared hung: {reason}")
            self._confirm_failed(rank, reason)

    def _end_session(self, rank: int, message: str) -> None:
        """End a live but useless rank's session: its agent stops the engine,
        whose supervisor relaunches it to rejoin."""
        view = self.ranks.get(rank)
        if view is not None and view.session is not None:
            self._emit(Refuse(rank, view.session, Code.FAILED_PRECONDITION, message, True))

    # --- joiners --------------------------------------------------------------

    def _on_joiner_ready(self, ev: JoinerReady) -> None:
        view = self._current(ev.rank, ev.session)
        if view is None or ev.rank not in self.joiners:
            return
        was_ready, view.ready = view.ready, True
        op = self.op
        if op and op.step == Step.WAIT_READY and ev.rank in op.joining:
            if not was_ready:
                self._emit(
                    RankDone(op.op_id, ev.rank, op.step, op.step_started_at, self._now, "done")
                )
            self._advance_if_ready()
        self._maybe_start_operation()

    # --- operations -----------------------------------------------------------

    def _new_op(self, kind: OpKind, survivors: Iterable[int], joining: Iterable[int]) -> Operation:
        self.op_seq += 1
        self.last_epoch += 1
        survivors_t = tuple(sorted(survivors))
        joining_t = tuple(sorted(joining))
        leaving = tuple(sorted(set(self.members) - set(survivors_t)))
        return Operation(
            op_id=f"{self.cluster}-{self.op_seq:06d}-{kind}",
            kind=kind,
            survivors=survivors_t,
            joining=joining_t,
            leaving=leaving,
            target_epoch=self.last_epoch,
            started_at=self._now,
        )

    def _maybe_start_operation(self) -> None:
        if self.op is not None:
            return
        if not self.members:
            founders = [r for r, v in self.ranks.items() if v.session and not v.failed]
            if len(founders) == self.world_size:
                self._begin(self._new_op(OpKind.FORM, (), founders))
            return
        member_views = [self.ranks.get(r, RankView()) for r in self.members]
        if any(v.failed for v in member_views):
            return self._start_shrink()
        if any(v.suspected_at is not None or v.lease_lost_at is not None for v in member_views):
            return  # admit once the suspicion is cleared or confirmed
        # A drained rank waits for an operator's Admit, whatever auto_rejoin says.
        joiners = sorted(r for r in self.joiners if self.ranks[r].session and r not in self.drained)
        if joiners and self.auto_rejoin:
            self._begin(self._new_op(OpKind.GROW, self.members, joiners))

    def _start_shrink(self) -> None:
        # A relaunched member is a joiner: never a survivor (BUG-4).
        survivors = [
            r
            for r in self.members
            if not self.ranks.get(r, RankView()).failed and r not in self.joiners
        ]
        if not survivors:
            self._cluster_lost("every member of the cluster failed")
            return
        op = self._new_op(OpKind.SHRINK, survivors, ())
        if self._unplaced_on(survivors) is not None:
            # Experts with no replica left: the survivors take them over from
            # the checkpoint (RELOAD), at lower capacity; a later admission
            # brings the lost rank back into this layout.
            assert self.placement is not None
            try:
                op.placement, op.loads = relayout(self.placement, survivors)
            except PlanError as exc:
                # The survivors could neither serve it nor hand it to a joiner:
                # a shrink would fail at its resume, again and again.
                self._cluster_lost(str(exc))
                return
        self._begin(op)

    def _cluster_lost(self, why: str) -> None:
        # No member is left to hold the weights: the cluster must be formed anew.
        message = (
            f"cluster lost: {why}; it forms again as its ranks come back "
            "(relaunched, with or without --rejoin)"
        )
        for rank in self.members:
            view = self.ranks.get(rank)
            if view is not None and not view.failed:
                # A survivor with only part of the experts can serve nothing.
                self._end_session(rank, message)
                self._mark_failed(rank, message)
        self._lost_incarnations.update(
            v.incarnation for r in {*self.members, *self.joiners} if (v := self.ranks.get(r))
        )
        for rank in sorted(self.joiners):
            self._send_retry(rank, message)
        self.joiners.clear()
        self.drained.clear()  # a new formation needs every rank again
        self.members = ()
        self.placement = None
        self.ranks = {r: v for r, v in self.ranks.items() if not v.failed and v.session}
        self._set_phase(Phase.FORMING, "")

    def _begin(self, op: Operation) -> None:
        self.op = op
        self._emit(
            OperationStarted(
                op.op_id,
                op.kind,
                self.epoch,
                op.target_epoch,
                op.survivors,
                op.joining,
                op.leaving,
                self._now,
            )
        )
        self._enter(STEPS[op.kind][0])

    def _enter(self, step: Step) -> None:
        op = self.op
        assert op is not None
        op.step = step
        op.step_started_at = self._now
        self._set_phase(PHASE_OF[(op.kind, step)], op.op_id)
        if step == Step.WAIT_READY:
            op.awaiting = set()
            self._advance_if_ready()
            return
        if step == Step.RELOAD and op.placement is None:
            return self._next_step()  # every expert kept a live replica
        if step == Step.RESUME:
            self.epoch = op.target_epoch
            self.members = op.participants
            if op.placement is not None:
                self.placement = op.placement  # committed with the epoch
            self._step_failures.clear()
            self._first_step_failure_at = None
            for rank in op.joining:  # members from now on (BUG-2)
                self.joiners.discard(rank)
                self.ranks[rank].ready = False
            if op.kind == OpKind.DRAIN:
                self.drained.update(op.leaving)
        command, recipients = self._command_for(op, step)
        self._send_to(op, command, recipients)
        if step == Step.RESUME and op.kind == OpKind.DRAIN:
            # Out of the committed epoch: the drained rank stops serving.
            for rank in op.leaving:
                self._send_leave(rank, f"drained by an operator (operation {op.op_id})")

    def _command_for(self, op: Operation, step: Step) -> tuple[CommandBody, tuple[int, ...]]:
        match step:
            case Step.HOLD:
                samples = {
                    r: self.ranks[r].progress or ProgressSample(0, self._now, 0.0)
                    for r in op.hold_ranks
                }
                target = hold_target(samples, self._now, self.hold_lead_now_s, op.hold_attempt)
                if op.hold_iteration is not None:
                    target = max(target, op.hold_iteration + 1)
                op.hold_iteration = target
                return Hold(target), op.hold_ranks
            case Step.ABORT:
                return Abort(op.target_epoch - 1), op.survivors
            case Step.PREFETCH:
                assert op.plan is not None
                members = tuple(sorted({t.src_rank for t in op.plan.transfers} | set(op.joining)))
                prefix = store_prefix(self.cluster, op.target_epoch) + "prefetch/"
                return Prefetch(op.plan, op.target_epoch, members, prefix), members
            case Step.REBUILD:
                prefix = store_prefix(self.cluster, op.target_epoch)
                return Rebuild(op.target_epoch, op.participants, prefix), op.participants
            case Step.RESYNC:
                assert self.placement is not None and op.plan is not None
                source = min(op.survivors)
                return Resync(op.plan, source, self.placement), op.participants
            case Step.RELOAD:
                assert op.placement is not None
                return Reload(op.placement, op.loads), op.participants
            case Step.RESUME:
                iteration = {
                    OpKind.FORM: 0,
                    OpKind.SHRINK: op.cut if op.cut is not None else 0,
                    OpKind.GROW: op.hold_iteration if op.hold_iteration is not None else 0,
                    OpKind.DRAIN: op.hold_iteration if op.hold_iteration is not None else 0,
                }[op.kind]
                return Resume(iteration, op.participants), op.participants
        raise AssertionError(f"no command for step {step}")

    def _send_to(self, op: Operation, command: CommandBody, recipients: Iterable[int]) -> None:
        op.command = command
        op.command_id = self._next_command_id
        op.command_sent_at = self._now
        self._next_command_id += 1
        op.awaiting = set(recipients)
        for rank in sorted(op.awaiting):
            session = self.ranks[rank].session
            if session is not None:
                self._emit(Send(rank, session, op.target_epoch, op.op_id, op.command_id, command))

    def _advance_if_ready(self) -> None:
        op = self.op
        assert op is not None and op.step == Step.WAIT_READY
        if not all(self.ranks[r].ready for r in op.joining):
            return
        assert self.placement is not None
        try:
            op.plan = transfer_plan(self.placement, op.survivors, op.joining)
        except PlanError as exc:
            for rank in op.joining:  # not again until it says ready again (BUG-3)
                self.ranks[rank].ready = False
            self._abandon(str(exc))
            return
        self._enter(Step.PREFETCH)

    def _next_step(self) -> None:
        op = self.op
        assert op is not None
        steps = STEPS[op.kind]
        index = steps.index(op.step)
        if index + 1 < len(steps):
            self._enter(steps[index + 1])
            return
        self._finish(op)

    def _learn_hold_lead(self, op: Operation) -> None:
        if op.hold_attempt:
            widened = self.hold_lead_now_s * 2**op.hold_attempt
            self.hold_lead_now_s = min(max(self.hold_lead_s, MAX_LEARNED_HOLD_LEAD_S), widened)

    def _finish(self, op: Operation) -> None:
        stall = max(op.stall_ms.values(), default=0.0)
        self._learn_hold_lead(op)
        self.op = None
        self._quiet_since = self._now
        for rank in op.joining:
            self.joiners.discard(rank)
            self.ranks[rank].ready = False
        self._emit(
            OperationEnded(
                op.op_id,
                op.kind,
                "completed",
                self.epoch,
                op.joining,
                op.leaving,
                stall,
                retargets=op.hold_attempt,
                at=self._now,
            )
        )
        self._set_phase(self._idle_phase(), "")
        self._maybe_start_operation()

    def _abandon(self, reason: str) -> None:
        op = self.op
        assert op is not None
        self._learn_hold_lead(op)
        self.op = None
        self._quiet_since = self._now
        # Entering RESUME committed the epoch: its joiners are members, and
        # the rollback is a shrink from that epoch (BUG-1, BUG-2).
        committed = op.step == Step.RESUME
        # A drain rolled back before its commit leaves its rank a member.
        left = op.leaving if committed or op.kind != OpKind.DRAIN else ()
        # Past the commit its joiners are members: they joined, whatever came after.
        joined = op.joining if committed else ()
        self._emit(
            OperationEnded(
                op.op_id,
                op.kind,
                "rolled_back",
                self.epoch,
                joined,
                left,
                0.0,
                reason,
                at=self._now,
            )
        )
        if op.step not in (Step.WAIT_READY, Step.RESUME):
            # Joiners may hold half-built groups: they start their admission over.
            for rank in op.joining:
                view = self.ranks.get(rank)
                if view is not None and not view.failed:
                    view.ready = False
                    self._send_retry(rank, reason)
        if op.kind == OpKind.FORM and not committed:
            self._set_phase(Phase.FORMING, "")
            self.ranks = {r: v for r, v in self.ranks.items() if not v.failed}
        elif op.step != Step.WAIT_READY or any(
            self.ranks.get(r, RankView()).failed for r in self.members
        ):
            # Survivors may be held or on half-built groups: rebuild among them.
            self._start_shrink()
        else:
            self._set_phase(self._idle_phase(), "")
        self._maybe_start_operation()

    def _send_retry(self, rank: int, reason: str) -> None:
        session = self.ranks[rank].session
        if session is None:
            return
        command_id = self._next_command_id
        self._next_command_id += 1
        self._emit(Send(rank, session, self.epoch, "", command_id, Retry(reason)))

    def _send_leave(self, rank: int, reason: str) -> None:
        view = self.ranks.get(rank)
        if view is None or view.session is None or view.failed:
            return  # gone already; if it comes back, its hello is refused
        command_id = self._next_command_id
        self._next_command_id += 1
        op_id = self.op.op_id if self.op else ""
        self._emit(Send(rank, view.session, self.epoch, op_id, command_id, Leave(reason)))

    def _idle_phase(self) -> Phase:
        if not self.members:
            return Phase.FORMING
        return Phase.STEADY if len(self.members) == self.world_size else Phase.DEGRADED

    # --- acks -----------------------------------------------------------------

    def _on_ack(self, ev: Acked) -> None:
        view = self._current(ev.rank, ev.session)
        if view is None:
            return
        op = self.op

        def refuse(code: Code, message: str) -> None:
            self._emit(Refuse(ev.rank, ev.session, code, message, False, ev.op_id, ev.command_id))

        if op is None:
            return refuse(
                Code.FAILED_PRECONDITION,
                f"ack for operation {ev.op_id!r} of epoch {ev.epoch} but no operation is in "
                f"flight (the cluster is at epoch {self.epoch})",
            )
        if ev.op_id != op.op_id:
            return refuse(
                Code.FAILED_PRECONDITION,
                f"ack for operation {ev.op_id!r} but operation {op.op_id!r} is in flight",
            )
        if ev.epoch != op.target_epoch:
            return refuse(
                Code.FAILED_PRECONDITION,
                f"ack carries stale epoch {ev.epoch}; operation {op.op_id!r} is for "
                f"epoch {op.target_epoch}",
            )
        if ev.command_id != op.command_id:
            return refuse(
                Code.FAILED_PRECONDITION,
                f"ack for command {ev.command_id} but command {op.command_id} is current",
            )
        if ev.rank not in op.awaiting:
            return  # a duplicate ack: already counted
        reply = ev.reply
        if isinstance(reply, CommandFailed):
            self._emit(
                RankDone(op.op_id, ev.rank, op.step, op.command_sent_at, self._now, "failed")
            )
            # Evidence, not a verdict: the culprit is usually a peer that died.
            self._note_step_failure(ev.rank)
            # Nothing else will arrive for this step: roll back (BUG-5).
            self._abandon(f"rank {ev.rank} failed {op.step}: {reply.message}")
            return
        expected = {
            Step.PREFETCH: (Resynced,),
            Step.HOLD: (Held, PastTarget),
            Step.ABORT: (Halted,),
            Step.REBUILD: (GroupsReady,),
            Step.RELOAD: (Reloaded,),
            Step.RESYNC: (Resynced,),
            Step.RESUME: (Resumed,),
        }[op.step]
        if not isinstance(reply, expected):
            return refuse(
                Code.INVALID_ARGUMENT,
                f"{type(reply).__name__} does not answer the {op.step} command",
            )
        match reply:
            case PastTarget(iteration):
                view.progress = next_sample(view.progress, iteration, self._now)
                op.hold_attempt += 1
                command, recipients = self._command_for(op, Step.HOLD)
                self._send_to(op, command, recipients)
                return
            case Held(iteration) if iteration != op.hold_iteration:
                return refuse(
                    Code.FAILED_PRECONDITION,
                    f"held at iteration {iteration} but the target is {op.hold_iteration}",
                )
            case Halted(last_completed):
                op.halted[ev.rank] = last_completed
            case GroupsReady(iteration=iteration, rank_clock=clock) if iteration is not None:
                if view.progress is None or iteration > view.progress.iteration:
                    view.progress = next_sample(view.progress, iteration, self._now, clock)
            case Resumed(stall_ms):
                op.stall_ms[ev.rank] = stall_ms
                # The engine goes on from the resume iteration: the next report
                # must not count the jump as progress (a joiner's goes from 0 to
                # the cluster's iteration), or the next hold target runs far ahead.
                # (Never below an iteration it reported: targets stay past those.)
                assert isinstance(op.command, Resume)
                previous = view.progress
                iteration = max(op.command.iteration, previous.iteration if previous else 0)
                rate = previous.rate if previous else 0.0
                view.progress = ProgressSample(iteration, self._now, rate)
        op.awaiting.discard(ev.rank)
        self._emit(RankDone(op.op_id, ev.rank, op.step, op.command_sent_at, self._now, "done"))
        if op.awaiting:
            return
        if op.step == Step.ABORT:
            op.cut = min(op.halted.values())
        self._next_step()

    # --- output ---------------------------------------------------------------

    def _emit(self, action: Action) -> None:
        self._out.append(action)

    def _set_phase(self, phase: Phase, op_id: str) -> None:
        if phase != self.phase:
            self.phase = phase
            self._emit(PhaseEntered(phase, self.epoch, op_id, self._now))

    def _persist_if_changed(self) -> None:
        record = self.record()
        if record != self._last_record:
            self._last_record = record
            self._emit(Persist(record))
