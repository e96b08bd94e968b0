"""The faults `epctl demo --fault` injects: `[stop:]WHO@PHASE`, parsed and checked.

WHO is `rank:N`, `joiner` (the rank being admitted when the phase begins),
`coordinator` (the leader; the demo then runs a standby) or `etcd` (restarted
on the same data dir). PHASE is a phase of the state machine, as the report's
timeline names it. The action is SIGKILL, or SIGSTOP with the `stop:` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.state_machine import Phase

# Timeline order: the order the state machine's phases are declared in.
PHASES: tuple[str, ...] = tuple(p.value for p in Phase)
TARGETS = ("rank", "joiner", "coordinator", "etcd")


@dataclass(frozen=True)
class Fault:
    target: str  # one of TARGETS
    phase: str  # one of PHASES
    rank: int | None = None  # for target "rank"
    stop: bool = False  # SIGSTOP instead of SIGKILL
    # How long a stopped process stays stopped, or a killed etcd down (None: a
    # stopped rank is thawed once the cluster failed it, a stopped leader once
    # a standby leads; etcd is started again at once).
    hold_s: float | None = None

    @property
    def who(self) -> str:
        return f"rank:{self.rank}" if self.target == "rank" else self.target

    def __str__(self) -> str:
        return f"{'stop:' if self.stop else ''}{self.who}@{self.phase}"


def check_fault_hold(hold_s: float | None, faults: list[Fault]) -> None:
    """`--fault-hold`: a SIGSTOPped process stays stopped, and an etcd killed by
    a fault stays down, this long; ValueError naming what is wrong."""
    if hold_s is None:
        return
    if hold_s < 0:
        raise ValueError(f"--fault-hold {hold_s:g}: must be 0 or more seconds")
    if not faults:
        raise ValueError("--fault-hold needs a --fault (stop:WHO@PHASE or etcd@PHASE)")
    for fault in faults:
        if not (fault.stop or fault.target == "etcd"):
            raise ValueError(
                f"--fault-hold applies to stop: faults and to etcd; {fault} is a SIGKILL "
                "(held processes are SIGSTOPped ones; a killed one is relaunched at once)"
            )


def parse_fault(text: str, world_size: int) -> Fault:
    """`[stop:]WHO@PHASE`; ValueError naming what is wrong."""
    spec = text.strip()
    stop = spec.startswith("stop:")
    if stop:
        spec = spec.removeprefix("stop:")
    who, sep, phase = spec.partition("@")
    if not sep or not who or not phase:
        raise ValueError(f"--fault {text!r}: expected [stop:]WHO@PHASE, e.g. rank:2@pausing")
    if phase not in PHASES:
        raise ValueError(
            f"--fault {text!r}: unknown phase {phase!r}; one of {', '.join(PHASES)} "
            "(epctl demo --list-phases)"
        )
    target, _, number = who.partition(":")
    if target not in TARGETS:
        raise ValueError(
            f"--fault {text!r}: unknown target {who!r}; one of rank:N, joiner, coordinator, etcd"
        )
    if target == "rank":
        if not number.isdigit():
            raise ValueError(f"--fault {text!r}: rank:N needs a rank number, got {who!r}")
        rank = int(number)
        if not 0 <= rank < world_size:
            raise ValueError(
                f"--fault {text!r}: rank {rank} is outside the cluster (0..{world_size - 1})"
            )
        return Fault("rank", phase, rank, stop)
    if number:
        raise ValueError(f"--fault {text!r}: {target} takes no number")
    if stop and target == "etcd":
        raise ValueError(f"--fault {text!r}: stop: applies to rank:N, joiner and coordinator")
    return Fault(target, phase, None, stop)
