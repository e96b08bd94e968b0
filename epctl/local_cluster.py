"""A real EP cluster on this machine for `epctl demo` and `epctl soak`.

etcd (unless one is given), a leader coordinator (and a standby), reference
engine workers, the request router, a status watcher, a fault injector and
the node supervisor that relaunches whatever died, as systemd and node agents
would. Every process it starts is stopped by pid when the context ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc

from epctl.faults import Fault
from epctl.local_etcd import LocalEtcd
from protos.ep_recovery.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from reference_engine.config import ModelConfig
from reference_engine.frontend import RequestRouter
from reference_engine.model import Weights, derive_weights, save_checkpoint
from reference_engine.requests import Request

PHASE_NAME = {v: k.removeprefix("PHASE_").lower() for k, v in common_pb2.Phase.items()}
GONE = (admin_pb2.RANK_STATE_FAILED, admin_pb2.RANK_STATE_ABSENT)


class ClusterError(RuntimeError):
    """The local cluster could not be set up or did not converge in time."""


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.01)


class Processes:
    """Every process the cluster starts, stopped by pid on exit."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[TextIO] = []
        self._lock = threading.Lock()  # faults fire from the watcher's thread
        self._stopped_all = False
        self._killed: set[int] = set()  # pids this harness SIGKILLed
        self._reported: set[int] = set()  # pids whose exit was reported

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._stopped_all:
                raise ClusterError("the cluster is shutting down")
            log = (self.logdir / f"{name}.log").open("a")
            self._logs.append(log)
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches epctl, which stops them
            )
            self.procs[name] = proc
            return proc

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def signal(self, names: list[str], sig: signal.Signals) -> None:
        with self._lock:
            procs = [self.procs[name] for name in names if name in self.procs]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)

    def unplanned_exits(self) -> list[tuple[str, int]]:
        """(name, exit code) of each process that ended since the last call
        without being killed here."""
        with self._lock:
            ended = [
                (name, proc)
                for name, proc in self.procs.items()
                if proc.poll() is not None
                and proc.pid not in self._killed
                and proc.pid not in self._reported
            ]
            self._reported.update(proc.pid for _, proc in ended)
        return [(name, int(proc.returncode)) for name, proc in ended]

    def kill_together(self, names: list[str]) -> None:
        """SIGKILL these processes back to back (as a lost node does), then reap them."""
        with self._lock:
            self._killed.update(self.procs[n].pid for n in names if n in self.procs)
        self.signal(names, signal.SIGKILL)
        for name in names:
            self.procs[name].wait()

    def stop_all(self) -> None:
        with self._lock:
            self._stopped_all = True
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a stopped one cannot take SIGTERM
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()


class StatusWatcher:
    """Polls GetStatus on whichever coordinator leads; shows phase changes as
    they happen, hands each new phase to `on_phase`, and keeps every failure
    and operation seen. A new leader's timeline goes on from what its
    predecessor stored in etcd: what follows the last span shown is new."""

    def __init__(
        self,
        leader: Callable[[], str | None],
        show: Callable[[str], None],
        t0_unix_ms: float,
        on_phase: Callable[[admin_pb2.PhaseSpan, admin_pb2.ClusterStatus], None] | None = None,
    ) -> None:
        self._leader = leader
        self._show = show
        self._t0 = t0_unix_ms
        self._on_phase = on_phase
        self.status: admin_pb2.ClusterStatus | None = None
        self.status_from: str | None = None  # the endpoint that answered `status`
        self.endpoint: str | None = None
        self.operations: dict[str, admin_pb2.OperationSummary] = {}
        self.failures: dict[tuple[int, float], admin_pb2.FailureRecord] = {}
        # Every process incarnation seen for each rank.
        self.incarnations: dict[int, set[str]] = {}
        self.timeline: list[admin_pb2.PhaseSpan] = []
        # (start, phase, op_id, epoch) of the last span shown, from any leader.
        self._last_span: tuple[float, int, str, int] | None = None
        self._channel: grpc.Channel | None = None
        self._stub: admin_pb2_grpc.AdminServiceStub | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _connect(self) -> bool:
        endpoint = self._leader()
        if endpoint is None:
            return False
        if endpoint != self.endpoint:
            if self._channel is not None:
                self._channel.close()
            self.endpoint = endpoint
            self._channel = grpc.insecure_channel(endpoint)
            self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._connect():
                    assert self._stub is not None
                    self._observe(self._stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=2))
            except grpc.RpcError:
                self.endpoint = None  # look for the leader again
            except Exception as exc:  # a watcher that dies silently would wedge epctl
                self._show(f"status watcher error: {exc!r}")
            self._stop.wait(0.005)

    def _observe(self, status: admin_pb2.ClusterStatus) -> None:
        for op in status.operations:
            self.operations[op.op_id] = op
        for f in status.failures:
            self.failures[(f.rank, f.confirmed_unix_ms)] = f
        for r in status.ranks:
            if r.incarnation:
                self.incarnations.setdefault(r.rank, set()).add(r.incarnation)
        for span in self._new_spans(list(status.timeline)):
            self.timeline.append(span)
            at = (span.start_unix_ms - self._t0) / 1000.0
            self._show(
                f"[{at:7.3f}s] phase {PHASE_NAME[span.phase]:<10} epoch {span.epoch}"
                + (f"  ({span.op_id})" if span.op_id else "")
            )
            if self._on_phase is not None:
                self._on_phase(span, status)
            self._last_span = _span_key(span)
        self.status, self.status_from = status, self.endpoint

    def _new_spans(self, spans: list[admin_pb2.PhaseSpan]) -> list[admin_pb2.PhaseSpan]:
        """The spans after the last one shown. Where that one is not among
        them (a new leader whose predecessor did not store it, a timeline
        that moved past it), those that began after it."""
        last = self._last_span
        if last is None:
            return spans
        for i in range(len(spans) - 1, -1, -1):
            if _span_key(spans[i]) == last:
                return spans[i + 1 :]
        return [s for s in spans if s.start_unix_ms > last[0]]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._channel is not None:
            self._channel.close()


def _span_key(span: admin_pb2.PhaseSpan) -> tuple[float, int, str, int]:
    return (span.start_unix_ms, int(span.phase), span.op_id, span.epoch)


def _restart_etcd(etcd: LocalEtcd, down_s: float) -> None:
    """SIGKILL etcd, keep it down `down_s`, start it again on its data."""
    etcd.kill()  # SIGKILL: the data dir stays
    time.sleep(down_s)
    etcd.start()  # same ports, same data: keys and leases come back


@dataclass
class FiredFault:
    fault: Fault
    phase_at_fire: str
    op_id: str
    ranks: list[int]
    at_unix_ms: float


class FaultInjector:
    """Fires each pending fault once, the first time its phase begins after
    `arm()`; `fire_now` injects one at once, in whatever phase is current."""

    def __init__(
        self,
        procs: Processes,
        etcd: LocalEtcd | None,
        leader_name: Callable[[], str | None],
        show: Callable[[str], None],
        t0_unix_ms: float,
    ) -> None:
        self.pending: list[Fault] = []
        self.fired: list[FiredFault] = []
        # SIGSTOPped process names, to resume later: when they were stopped,
        # and for how long (the fault's hold_s).
        self.stopped: dict[str, tuple[float, float | None]] = {}
        self.etcd_restarts: list[threading.Thread] = []  # etcd faults in progress
        self._procs = procs
        self._etcd = etcd
        self._leader_name = leader_name
        self._show = show
        self._t0 = t0_unix_ms
        self._armed = False
        self._lock = threading.Lock()

    def arm(self, faults: list[Fault]) -> None:
        with self._lock:
            self.pending.extend(faults)
            self._armed = True

    def etcd_back(self) -> bool:
        """Whether every etcd fault fired so far has started etcd again."""
        return not any(t.is_alive() for t in self.etcd_restarts)

    def disarm(self) -> list[Fault]:
        """Stop waiting for the pending faults; returns those never fired."""
        with self._lock:
            left, self.pending = self.pending, []
            return left

    def on_phase(self, span: admin_pb2.PhaseSpan, status: admin_pb2.ClusterStatus) -> None:
        if not self._armed:
            return
        phase = PHASE_NAME[span.phase]
        with self._lock:
            for fault in [f for f in self.pending if f.phase == phase]:
                if self._fire(fault, phase, span.op_id, status) is not None:
                    self.pending.remove(fault)

    def fire_now(self, fault: Fault, status: admin_pb2.ClusterStatus) -> FiredFault | None:
        op_id = status.operation.op_id if status.HasField("operation") else ""
        with self._lock:
            return self._fire(fault, PHASE_NAME[status.phase], op_id, status)

    def _fire(
        self, fault: Fault, phase: str, op_id: str, status: admin_pb2.ClusterStatus
    ) -> FiredFault | None:
        """Inject `fault` in `phase` of operation `op_id`; None when it has no
        target (no joiner yet): a pending one waits for the phase's next turn.
        `status` may be newer than the phase (a phase of a few milliseconds)."""
        # Its joiners: from the operation in flight, or from its summary when
        # it ended before this status was taken.
        joining: list[int] = []
        if status.HasField("operation") and op_id and status.operation.op_id == op_id:
            joining = list(status.operation.joining)
        elif summary := next((o for o in status.operations if op_id and o.op_id == op_id), None):
            joining = list(summary.joining)
        names: list[str] = []
        ranks: list[int] = []
        match fault.target:
            case "rank":
                assert fault.rank is not None
                ranks = [fault.rank]
                names = [f"rank{fault.rank}"]
            case "joiner":
                ranks = joining
                names = [f"rank{r}" for r in ranks]
            case "coordinator":
                leader = self._leader_name()
                names = [leader] if leader else []
        if fault.target != "etcd" and not names:
            return None
        now = time.time() * 1000.0
        fired = FiredFault(fault, phase, op_id, ranks, now)
        self.fired.append(fired)
        if fault.target == "etcd":
            assert self._etcd is not None
            # Restarted on its data dir from a thread: the watcher goes on meanwhile.
            restart = threading.Thread(
                target=_restart_etcd, args=(self._etcd, fault.hold_s or 0.0), daemon=True
            )
            restart.start()
            self.etcd_restarts.append(restart)
        elif fault.stop:
            self._procs.signal(names, signal.SIGSTOP)
            self.stopped.update(dict.fromkeys(names, (time.monotonic(), fault.hold_s)))
        else:
            self._procs.kill_together(names)  # reaped: none looks alive after this
        what = ", ".join(names) or ("etcd" if fault.target == "etcd" else "nothing")
        self._show(
            f"[{(now - self._t0) / 1000:7.3f}s] fault {fault}: "
            f"{'SIGSTOP' if fault.stop else 'SIGKILL'} {what}"
            + ("" if fault.target != "etcd" else " (restarted on its data dir)")
            + (f", held {fault.hold_s:g} s" if fault.hold_s is not None else "")
        )
        return fired


@dataclass(frozen=True)
class ClusterSpec:
    ranks: int = 4
    ranks_per_node: int = 1
    seed: int = 1234
    etcd: str | None = None  # host:port of an etcd to use; None starts one
    lease_ttl_s: int = 1
    leader_ttl_s: int = 2
    standby: bool = False  # run a standby coordinator beside the leader
    workdir: Path | None = None  # logs and files; None: a temporary dir
    deadline_s: float = 180.0  # for the cluster to converge after a fault


class LocalCluster:
    """A formed cluster (see `local_cluster`): what the demo and the soak drive."""

    def __init__(
        self,
        spec: ClusterSpec,
        workdir: Path,
        procs: Processes,
        etcd: LocalEtcd | None,
        etcd_endpoint: str,
        trace: Callable[[str], None],
        t0_unix_ms: float,
    ) -> None:
        self.spec = spec
        self.workdir = workdir
        self.procs = procs
        self.etcd = etcd
        self.etcd_endpoint = etcd_endpoint
        self.trace = trace  # each phase, fault and relaunch as it happens
        self.t0_unix_ms = t0_unix_ms
        self.cfg = ModelConfig(seed=spec.seed)
        self.weights: Weights = derive_weights(self.cfg)
        self.checkpoint = workdir / "model.pt"
        save_checkpoint(self.checkpoint, self.cfg, self.weights)
        self.coordinators = ["coordinator", *(["standby"] if spec.standby else [])]
        self.router = RequestRouter()
        self.injector = FaultInjector(procs, etcd, self.leader_name, trace, t0_unix_ms)
        self.watcher = StatusWatcher(
            self.leader_endpoint, trace, t0_unix_ms, self.injector.on_phase
        )
        # Ranks that died (killed, or exited: declared hung, lease lost) and
        # are not yet admitted again, with when they died.
        self.lost_at: dict[int, float] = {}
        # Each rank's last relaunch: when, and the incarnations seen before it
        # (all of dead processes).
        self.relaunched: dict[int, tuple[float, frozenset[str]]] = {}
        # Every rank or coordinator process that ended without this harness
        # killing it: {"who", "rc", "at_ms" (when the supervisor saw it, from t0)}.
        self.unplanned_exits: list[dict[str, Any]] = []

    def close(self) -> None:
        self.watcher.close()
        self.router.close()

    # --- coordinators -------------------------------------------------------

    def _ready_file(self, name: str) -> Path:
        return self.workdir / f"{name}.json"

    def role_of(self, name: str) -> dict[str, Any]:
        if not self.procs.alive(name):
            return {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            return dict(json.loads(self._ready_file(name).read_text()))
        return {}

    def start_coordinator(self, name: str) -> None:
        self._ready_file(name).unlink(missing_ok=True)
        self.procs.start(
            name,
            [
                sys.executable, "-m", "coordinator",
                "--cluster", "demo", "--world-size", str(self.spec.ranks),
                "--listen", "127.0.0.1:0", "--etcd", self.etcd_endpoint,
                "--ready-file", str(self._ready_file(name)),
                "--leader-ttl-s", str(self.spec.leader_ttl_s),
            ],
        )  # fmt: skip

    def leader_name(self) -> str | None:
        """The coordinator that most recently said it leads: a frozen leader's
        ready file still says "leader" after a standby took over."""
        leaders = [n for n in self.coordinators if self.role_of(n).get("role") == "leader"]
        if not leaders:
            return None

        def since(name: str) -> float:
            with contextlib.suppress(OSError):
                return self._ready_file(name).stat().st_mtime_ns
            return 0.0

        return max(leaders, key=since)

    def leader_endpoint(self) -> str | None:
        name = self.leader_name()
        return f"127.0.0.1:{self.role_of(name)['listen_port']}" if name else None

    # --- ranks --------------------------------------------------------------

    def rank_argv(self, rank: int, rejoin: bool) -> list[str]:
        # No coordinator address: the agent reads the leader key in etcd, so
        # it follows a fail-over.
        argv = [
            sys.executable, "-m", "reference_engine.worker",
            "--cluster", "demo", "--rank", str(rank),
            "--world-size", str(self.spec.ranks),
            "--ranks-per-node", str(self.spec.ranks_per_node),
            "--etcd", self.etcd_endpoint,
            "--checkpoint", str(self.checkpoint),
            "--frontend", f"{self.router.address[0]}:{self.router.address[1]}",
            "--frontend-key", self.router.authkey.hex(),
            "--lease-ttl", str(self.spec.lease_ttl_s),
        ]  # fmt: skip
        return [*argv, "--rejoin"] if rejoin else argv

    def status(self) -> admin_pb2.ClusterStatus:
        s = self.watcher.status
        if s is None:
            raise ClusterError("no status from the coordinator yet")
        return s

    def phase(self) -> str | None:
        s = self.watcher.status
        return PHASE_NAME[s.phase] if s is not None else None

    def rank_state(self, rank: int) -> int:
        for r in self.status().ranks:
            if r.rank == rank:
                return int(r.state)
        return admin_pb2.RANK_STATE_ABSENT

    def kill_ranks(self, ranks: list[int]) -> float:
        """SIGKILL these ranks together; returns when, in unix ms."""
        at = time.time() * 1000.0
        self.procs.kill_together([f"rank{rank}" for rank in ranks])
        for rank in ranks:
            self.lost_at[rank] = at
        self.trace(f"[{(at - self.t0_unix_ms) / 1000:7.3f}s] SIGKILL rank(s) {ranks}")
        return at

    # --- the supervisor -----------------------------------------------------

    def supervise(self) -> None:
        """One pass of what node supervisors and systemd would do."""
        injector = self.injector
        for name, (since, hold_s) in list(injector.stopped.items()):
            if hold_s is not None:
                thaw = time.monotonic() - since >= hold_s
            elif name.startswith("rank"):
                thaw = self.rank_state(int(name[4:])) in GONE  # it finds itself removed
            else:
                thaw = self.leader_name() not in (None, name)  # it finds itself deposed
            if thaw:
                self.procs.signal([name], signal.SIGCONT)
                del injector.stopped[name]
        self.note_exits()
        for fired in injector.fired:
            if fired.fault.stop:
                # A SIGSTOPped rank lives: thawed, it is back by itself (a
                # joiner renews its lease and is admitted again) or, refused,
                # it exits and counts as lost below when it does.
                continue
            for rank in fired.ranks:
                self.lost_at[rank] = max(self.lost_at.get(rank, 0.0), fired.at_unix_ms)
        for rank in range(self.spec.ranks):
            name = f"rank{rank}"
            if self.procs.alive(name) or name in injector.stopped:
                continue
            self.lost_at.setdefault(rank, time.time() * 1000.0)
            if self.rank_state(rank) in GONE:
                dead = frozenset(self.watcher.incarnations.get(rank, ()))
                self.relaunched[rank] = (time.time() * 1000.0, dead)
                self.procs.start(name, self.rank_argv(rank, rejoin=True))
                self.trace(f"relaunched rank {rank} with --rejoin")
        for name in self.coordinators:
            if name not in injector.stopped and not self.procs.alive(name):
                self.start_coordinator(name)  # back as a standby, as systemd would
                self.trace(f"restarted {name}")

    def note_exits(self) -> None:
        """Add the processes that ended by themselves since the last look to
        `unplanned_exits`."""
        for name, rc in self.procs.unplanned_exits():
            at = time.time() * 1000.0 - self.t0_unix_ms
            who = f"rank:{name[4:]}" if name.startswith("rank") else name
            self.unplanned_exits.append({"who": who, "rc": rc, "at_ms": round(at, 1)})
            self.trace(f"[{at / 1000:7.3f}s] {who} exited by itself (rc {rc})")

    def is_back(self, rank: int) -> bool:
        """A process relaunched after the rank's loss serves as a member.

        Judged by incarnation, not by the admission's record: an admission that
        completes just after its joiner was killed did not bring that process
        back."""
        relaunch = self.relaunched.get(rank)
        if relaunch is None or relaunch[0] <= self.lost_at.get(rank, 0.0):
            return False
        status = self.status()
        view = next((r for r in status.ranks if r.rank == rank), None)
        return (
            view is not None
            and rank in status.members
            and view.state == admin_pb2.RANK_STATE_SERVING
            and bool(view.incarnation)
            and view.incarnation not in relaunch[1]
        )

    def settled(self) -> bool:
        """One supervisor pass; then: every lost rank admitted again, nothing
        stopped, the cluster steady with all its ranks."""
        self.supervise()
        for rank in list(self.lost_at):
            if self.is_back(rank):
                del self.lost_at[rank]
        status = self.status()
        return (
            self.watcher.status_from == self.leader_endpoint()  # not a dead leader's last word
            and not self.lost_at
            and not self.injector.stopped
            and PHASE_NAME[status.phase] == "steady"
            and len(status.members) == self.spec.ranks
        )

    def settle(self, what: str) -> None:
        wait_for(self.settled, self.spec.deadline_s, what)


@contextlib.contextmanager
def local_cluster(
    spec: ClusterSpec,
    show: Callable[[str], None],
    trace: Callable[[str], None] | None = None,
) -> Iterator[LocalCluster]:
    """Start etcd (unless `spec.etcd`), the coordinators and the ranks; yield
    once the cluster is steady; stop everything on the way out. `show` takes
    the setup lines, `trace` (default `show`) every event after."""
    t0_unix_ms = time.time() * 1000.0
    with contextlib.ExitStack() as stack:
        workdir = spec.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        procs = Processes(workdir)
        stack.callback(procs.stop_all)
        etcd: LocalEtcd | None = None
        if spec.etcd is None:
            etcd = stack.enter_context(LocalEtcd())
            endpoint = etcd.endpoint
            show(f"etcd        {endpoint} (local, data in a temporary dir)")
        else:
            endpoint = spec.etcd
        cluster = LocalCluster(spec, workdir, procs, etcd, endpoint, trace or show, t0_unix_ms)
        stack.callback(cluster.close)
        for name in cluster.coordinators:
            cluster.start_coordinator(name)

            def started(n: str = name) -> bool:
                return bool(cluster.role_of(n))

            wait_for(started, 30, f"the {name} to start")
            info = cluster.role_of(name)
            show(
                f"{name:<11} {info['role']}"
                + (f" on 127.0.0.1:{info['listen_port']}" if "listen_port" in info else "")
                + f" (pid {info['pid']})"
            )
        for rank in range(spec.ranks):
            procs.start(f"rank{rank}", cluster.rank_argv(rank, rejoin=False))
        wait_for(
            lambda: cluster.phase() == "steady", 120, f"{spec.ranks} ranks to form the cluster"
        )
        show(f"cluster formed: {spec.ranks} ranks serving")
        yield cluster


def expert_lost_with(ranks: int, ranks_per_node: int, seed: int, lost: set[int]) -> int | None:
    """An expert with no replica left on the ranks outside `lost`, or None."""
    from reference_engine.placement import build_placement, live_replicas

    cfg = ModelConfig(seed=seed)
    placement = build_placement(ranks, ranks_per_node, cfg.n_experts, cfg.replicas, cfg.n_layers)
    survivors = set(range(ranks)) - lost
    for expert in range(cfg.n_experts):
        if not live_replicas(placement, 0, expert, survivors):
            return expert
    return None


def unservable_loss(ranks: int, ranks_per_node: int, seed: int, lost: set[int]) -> str | None:
    """Why the ranks left after losing `lost` could not serve every expert even
    with lost experts reloaded from the checkpoint onto them (the shrink's
    plan.relayout), or None when they can."""
    from coordinator.plan import PlanError, relayout
    from reference_engine.placement import build_placement

    cfg = ModelConfig(seed=seed)
    placement = build_placement(ranks, ranks_per_node, cfg.n_experts, cfg.replicas, cfg.n_layers)
    try:
        relayout(placement, set(range(ranks)) - lost)
    except PlanError as exc:
        return str(exc)
    return None


def timeline_report(cluster: LocalCluster) -> list[dict[str, Any]]:
    t0 = cluster.t0_unix_ms
    return [
        {
            "phase": PHASE_NAME[span.phase],
            "op_id": span.op_id,
            "epoch": span.epoch,
            "start_ms": round(span.start_unix_ms - t0, 1),
            "end_ms": round(span.end_unix_ms - t0, 1) if span.end_unix_ms else None,
        }
        for span in cluster.status().timeline
    ]


def fault_report(fired: FiredFault, watcher: StatusWatcher) -> dict[str, Any]:
    """What became of a fault: the leader's fail-over, or the outcome of the
    operation it hit (or, fired between operations, of the next one), and
    how long after the fault that operation ended."""
    ops = sorted(watcher.operations.values(), key=lambda o: o.start_unix_ms)
    hit = [o for o in ops if fired.op_id and o.op_id == fired.op_id]
    if fired.fault.target != "coordinator" and not hit:
        hit = [o for o in ops if o.start_unix_ms >= fired.at_unix_ms]
    op = hit[0] if hit and hit[0].end_unix_ms else None
    if fired.fault.target == "coordinator":
        resolution: str | None = "failed_over"
    elif fired.fault.target == "etcd" and not fired.op_id:
        # Between operations there is nothing to roll back or complete: the
        # ranks served through it (whatever ran next is another fault's).
        resolution, op = "ridden_out", None
    else:
        resolution = op.outcome if op is not None else None
    return {
        "fault": str(fired.fault),
        "fired": True,
        "phase_at_fire": fired.phase_at_fire,
        "op_id": fired.op_id,
        "ranks": fired.ranks,
        "resolution": resolution,
        # The operation it hit (for the leader: the one the new leader took
        # over), and when it ended, from the fault.
        "op_outcome": op.outcome if op is not None else None,
        "resolved_ms": round(op.end_unix_ms - fired.at_unix_ms, 1) if op is not None else None,
    }


def detected_failures(
    cluster: LocalCluster, ranks: list[int], before: set[Any], kill_unix_ms: float
) -> list[dict[str, Any]]:
    """Wait for the coordinator to confirm the failure of `ranks`; their
    detection times from the kill."""
    watcher = cluster.watcher

    def detected() -> bool:
        new = {rank for rank, at in watcher.failures if (rank, at) not in before}
        return set(ranks) <= new

    wait_for(detected, 30, f"the coordinator to detect the failure of {ranks}")
    return [
        {
            "rank": f.rank,
            "detect_ms": round(f.confirmed_unix_ms - kill_unix_ms, 1),
            "suspect_ms": round(f.suspected_unix_ms - kill_unix_ms, 1)
            if f.suspected_unix_ms
            else None,
            "reason": f.reason,
        }
        for key, f in sorted(watcher.failures.items())
        if f.rank in ranks and key not in before
    ]


def rejoins_report(cluster: LocalCluster) -> list[dict[str, Any]]:
    """Admissions that made their joiners members (completed, or rolled back
    after the commit), the last one per rank."""
    rejoins: dict[int, dict[str, Any]] = {}
    for op in sorted(cluster.watcher.operations.values(), key=lambda o: o.end_unix_ms):
        if op.kind == "grow":
            for r in op.joined:
                rejoins[r] = {"rank": r, "stall_ms": round(op.stall_ms, 2), "outcome": op.outcome}
    return [rejoins[r] for r in sorted(rejoins)]


def requests_report(
    cluster: LocalCluster, requests: list[Request], expected: dict[int, tuple[int, ...]]
) -> dict[str, Any]:
    """The request counts and whether every answer equals the reference's."""
    ledger = cluster.router.ledger
    answers = dict(ledger.answers)
    lost = sum(1 for r in requests if r.id not in answers)
    return {
        "requests": {
            "submitted": ledger.submitted,
            "completed": len(answers),
            "lost": lost,
            "duplicated": ledger.duplicated,
            "reassigned": ledger.reassigned,
        },
        "outputs_match_reference": lost == 0
        and all(answers[r.id] == expected[r.id] for r in requests),
    }


def report_ok(report: dict[str, Any]) -> bool:
    req = report["requests"]
    return bool(
        report["outputs_match_reference"]
        and req["lost"] == 0
        and req["duplicated"] == 0
        and req["completed"] == req["submitted"]
        and all(f["fired"] and f["resolution"] for f in report.get("faults", []))
    )
