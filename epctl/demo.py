"""`epctl demo`: etcd, a coordinator and a small EP cluster on this machine; ranks
are SIGKILLed and relaunched with --rejoin; the outcome is checked against a
single-process reference and reported.

With `--fault [stop:]WHO@PHASE` (epctl.faults) the demo also injects faults as
the coordinator enters a phase, runs a standby coordinator when the leader is a
target, and, as a node supervisor would, relaunches every rank (and restarts
every coordinator) that died, until all ranks are admitted again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc

from epctl.faults import Fault
from epctl.local_etcd import LocalEtcd
from protos.ep_recovery.v1 import admin_pb2, admin_pb2_grpc, common_pb2

PHASE_NAME = {v: k.removeprefix("PHASE_").lower() for k, v in common_pb2.Phase.items()}


@dataclass
class DemoOptions:
    ranks: int = 4
    ranks_per_node: int = 1
    kills: list[list[int]] = field(default_factory=list)
    requests: int = 48
    seed: int = 1234
    etcd: str | None = None
    json_output: bool = False
    lease_ttl_s: int = 1
    deadline_s: float = 180.0
    workdir: Path | None = None
    faults: list[Fault] = field(default_factory=list)


class DemoError(RuntimeError):
    pass


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.01)


class Processes:
    """Every process the demo starts, stopped by pid on exit."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.argv: dict[str, list[str]] = {}
        self._logs: list[TextIO] = []
        self._lock = threading.Lock()  # faults fire from the watcher's thread
        self._stopped_all = False

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._stopped_all:
                raise DemoError("the demo is shutting down")
            log = (self.logdir / f"{name}.log").open("a")
            self._logs.append(log)
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops them
            )
            self.procs[name] = proc
            self.argv[name] = argv
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

    def kill_together(self, names: list[str]) -> None:
        """SIGKILL these processes back to back (as a lost node does), then reap them."""
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
    and operation seen (a new leader's history starts at its take-over)."""

    def __init__(
        self,
        leader: Callable[[], str | None],
        show: Callable[[str], None],
        t0_unix_ms: float,
        on_phase: Callable[[str, admin_pb2.ClusterStatus], None] | None = None,
    ) -> None:
        self._leader = leader
        self._show = show
        self._t0 = t0_unix_ms
        self._on_phase = on_phase
        self.status: admin_pb2.ClusterStatus | None = None
        self.endpoint: str | None = None
        self.operations: dict[str, admin_pb2.OperationSummary] = {}
        self.failures: dict[tuple[int, float], admin_pb2.FailureRecord] = {}
        self.timeline: list[admin_pb2.PhaseSpan] = []
        self._seen_spans = 0
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
            self._seen_spans = 0  # a new leader's timeline starts at its take-over
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._connect():
                    assert self._stub is not None
                    self._observe(self._stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=2))
            except grpc.RpcError:
                self.endpoint = None  # look for the leader again
            except Exception as exc:  # a watcher that dies silently would wedge the demo
                self._show(f"status watcher error: {exc!r}")
            self._stop.wait(0.005)

    def _observe(self, status: admin_pb2.ClusterStatus) -> None:
        for op in status.operations:
            self.operations[op.op_id] = op
        for f in status.failures:
            self.failures[(f.rank, f.confirmed_unix_ms)] = f
        spans = list(status.timeline)
        for span in spans[self._seen_spans :]:
            self.timeline.append(span)
            at = (span.start_unix_ms - self._t0) / 1000.0
            self._show(
                f"[{at:7.3f}s] phase {PHASE_NAME[span.phase]:<10} epoch {span.epoch}"
                + (f"  ({span.op_id})" if span.op_id else "")
            )
            if self._on_phase is not None:
                self._on_phase(PHASE_NAME[span.phase], status)
        self._seen_spans = len(spans)
        self.status = status

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._channel is not None:
            self._channel.close()


def _restart_etcd(etcd: LocalEtcd) -> None:
    etcd.kill()  # SIGKILL: the data dir stays
    etcd.start()  # same ports, same data: keys and leases come back


@dataclass
class FiredFault:
    fault: Fault
    phase_at_fire: str
    op_id: str
    ranks: list[int]
    at_unix_ms: float
    resolution: str | None = None


class FaultInjector:
    """Fires each fault once, the first time its phase begins after `arm()`."""

    def __init__(
        self,
        faults: list[Fault],
        procs: Processes,
        etcd: LocalEtcd | None,
        leader_name: Callable[[], str | None],
        show: Callable[[str], None],
        t0_unix_ms: float,
    ) -> None:
        self.pending = list(faults)
        self.fired: list[FiredFault] = []
        self.stopped: set[str] = set()  # SIGSTOPped process names, to resume later
        self._procs = procs
        self._etcd = etcd
        self._leader_name = leader_name
        self._show = show
        self._t0 = t0_unix_ms
        self._armed = False
        self._lock = threading.Lock()

    def arm(self) -> None:
        self._armed = True

    def on_phase(self, phase: str, status: admin_pb2.ClusterStatus) -> None:
        if not self._armed:
            return
        with self._lock:
            for fault in [f for f in self.pending if f.phase == phase]:
                if self._fire(fault, phase, status):
                    self.pending.remove(fault)

    def _fire(self, fault: Fault, phase: str, status: admin_pb2.ClusterStatus) -> bool:
        """Inject `fault`; False when it has no target in this phase (no joiner
        yet): it waits for the phase's next turn."""
        op = status.operation if status.HasField("operation") else None
        names: list[str] = []
        ranks: list[int] = []
        match fault.target:
            case "rank":
                assert fault.rank is not None
                ranks = [fault.rank]
                names = [f"rank{fault.rank}"]
            case "joiner":
                ranks = list(op.joining) if op is not None else []
                names = [f"rank{r}" for r in ranks]
            case "coordinator":
                leader = self._leader_name()
                names = [leader] if leader else []
        if fault.target != "etcd" and not names:
            return False
        now = time.time() * 1000.0
        fired = FiredFault(fault, phase, op.op_id if op else "", ranks, now)
        self.fired.append(fired)
        if fault.target == "etcd":
            assert self._etcd is not None
            # Restarted on its data dir from a thread: the watcher goes on meanwhile.
            threading.Thread(target=_restart_etcd, args=(self._etcd,), daemon=True).start()
        elif fault.stop:
            self._procs.signal(names, signal.SIGSTOP)
            self.stopped.update(names)
        else:
            self._procs.signal(names, signal.SIGKILL)
        what = ", ".join(names) or ("etcd" if fault.target == "etcd" else "nothing")
        self._show(
            f"[{(now - self._t0) / 1000:7.3f}s] fault {fault}: "
            f"{'SIGSTOP' if fault.stop else 'SIGKILL'} {what}"
            + ("" if fault.target != "etcd" else " (restarted on its data dir)")
        )
        return True


def check_kills(opts: DemoOptions) -> None:
    """Raise ValueError unless every failure event is one the cluster survives."""
    from reference_engine.config import ModelConfig
    from reference_engine.placement import build_placement, live_replicas

    cfg = ModelConfig(seed=opts.seed)
    placement = build_placement(
        opts.ranks, opts.ranks_per_node, cfg.n_experts, cfg.replicas, cfg.n_layers
    )
    for event in opts.kills:
        outside = [r for r in event if not 0 <= r < opts.ranks]
        if outside:
            raise ValueError(
                f"--kill {','.join(map(str, event))}: rank {outside[0]} is outside the "
                f"cluster (0..{opts.ranks - 1})"
            )
        survivors = set(range(opts.ranks)) - set(event)
        for expert in range(cfg.n_experts):
            if not live_replicas(placement, 0, expert, survivors):
                raise ValueError(
                    f"--kill {','.join(map(str, event))}: would lose every replica of "
                    f"expert {expert}; the placement survives the loss of any one rank or "
                    f"any one node ({opts.ranks_per_node} rank(s) per node)"
                )


def run_demo(opts: DemoOptions, out: TextIO) -> dict[str, Any]:
    """Run the demo; returns the report. Raises DemoError on setup failures."""
    from reference_engine.config import ModelConfig
    from reference_engine.frontend import RequestRouter
    from reference_engine.model import derive_weights, save_checkpoint
    from reference_engine.reference import reference_outputs
    from reference_engine.requests import make_requests

    def show(line: str) -> None:
        if not opts.json_output:
            out.write(line + "\n")
            out.flush()

    check_kills(opts)
    targets = {f.target for f in opts.faults}
    # etcd restarts take about a second: leases must outlive them.
    lease_ttl_s = max(opts.lease_ttl_s, 5) if "etcd" in targets else opts.lease_ttl_s
    leader_ttl_s = 5 if "etcd" in targets else 2
    t0_unix_ms = time.time() * 1000.0
    with contextlib.ExitStack() as stack:
        workdir = opts.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        procs = Processes(workdir)
        stack.callback(procs.stop_all)
        local_etcd: LocalEtcd | None = None
        if opts.etcd is None:
            local_etcd = stack.enter_context(LocalEtcd())
            etcd_endpoint = local_etcd.endpoint
            show(f"etcd        {etcd_endpoint} (local, data in a temporary dir)")
        else:
            if "etcd" in targets:
                raise DemoError("--fault etcd@...: needs the demo's own etcd (no --etcd)")
            etcd_endpoint = opts.etcd
        if lease_ttl_s != opts.lease_ttl_s:
            show(f"rank leases of {lease_ttl_s} s, to outlive the etcd restart")

        cfg = ModelConfig(seed=opts.seed)
        checkpoint = workdir / "model.pt"
        weights = derive_weights(cfg)
        save_checkpoint(checkpoint, cfg, weights)
        requests = make_requests(opts.seed, opts.requests)
        expected = reference_outputs(weights, cfg, requests)

        cluster = "demo"
        # With the leader as a target, a standby runs beside it from the start.
        coordinators = ["coordinator", *(["standby"] if "coordinator" in targets else [])]

        def ready_file(name: str) -> Path:
            return workdir / f"{name}.json"

        def role_of(name: str) -> dict[str, Any]:
            if not procs.alive(name):
                return {}
            with contextlib.suppress(FileNotFoundError, ValueError):
                return dict(json.loads(ready_file(name).read_text()))
            return {}

        def has_started(name: str) -> bool:
            return bool(role_of(name))

        def start_coordinator(name: str) -> None:
            ready_file(name).unlink(missing_ok=True)
            procs.start(
                name,
                [
                    sys.executable, "-m", "coordinator",
                    "--cluster", cluster, "--world-size", str(opts.ranks),
                    "--listen", "127.0.0.1:0", "--etcd", etcd_endpoint,
                    "--ready-file", str(ready_file(name)),
                    "--leader-ttl-s", str(leader_ttl_s),
                ],
            )  # fmt: skip

        def leader_name() -> str | None:
            return next((n for n in coordinators if role_of(n).get("role") == "leader"), None)

        def leader_endpoint() -> str | None:
            name = leader_name()
            return f"127.0.0.1:{role_of(name)['listen_port']}" if name else None

        for name in coordinators:
            start_coordinator(name)
            wait_for(functools.partial(has_started, name), 30, f"the {name} to start")
            info = role_of(name)
            show(
                f"{name:<11} {info['role']}"
                + (f" on 127.0.0.1:{info['listen_port']}" if "listen_port" in info else "")
                + f" (pid {info['pid']})"
            )

        router = RequestRouter()
        stack.callback(router.close)
        injector = FaultInjector(opts.faults, procs, local_etcd, leader_name, show, t0_unix_ms)
        watcher = StatusWatcher(leader_endpoint, show, t0_unix_ms, injector.on_phase)
        stack.callback(watcher.close)

        def rank_argv(rank: int, rejoin: bool) -> list[str]:
            # No coordinator address: the agent reads the leader key in etcd,
            # so it follows a fail-over.
            argv = [
                sys.executable, "-m", "reference_engine.worker",
                "--cluster", cluster, "--rank", str(rank),
                "--world-size", str(opts.ranks),
                "--ranks-per-node", str(opts.ranks_per_node),
                "--etcd", etcd_endpoint,
                "--checkpoint", str(checkpoint),
                "--frontend", f"{router.address[0]}:{router.address[1]}",
                "--frontend-key", router.authkey.hex(),
                "--lease-ttl", str(lease_ttl_s),
            ]  # fmt: skip
            return [*argv, "--rejoin"] if rejoin else argv

        for rank in range(opts.ranks):
            procs.start(f"rank{rank}", rank_argv(rank, rejoin=False))

        def status() -> admin_pb2.ClusterStatus:
            s = watcher.status
            if s is None:
                raise DemoError("no status yet")
            return s

        def is_phase(name: str) -> Callable[[], bool]:
            return lambda: watcher.status is not None and PHASE_NAME[watcher.status.phase] == name

        wait_for(is_phase("steady"), 120, f"{opts.ranks} ranks to form the cluster")
        show(f"cluster formed: {opts.ranks} ranks serving")
        injector.arm()

        # Ranks that died (killed by --kill or a fault, or exited: declared
        # hung, lease lost) and are not yet admitted again, with when they died.
        lost_at: dict[int, float] = {}

        def rank_state(rank: int) -> int:
            for r in status().ranks:
                if r.rank == rank:
                    return int(r.state)
            return admin_pb2.RANK_STATE_ABSENT

        def supervise() -> None:
            """One pass of what node supervisors and systemd would do."""
            gone = (admin_pb2.RANK_STATE_FAILED, admin_pb2.RANK_STATE_ABSENT)
            for name in list(injector.stopped):
                if name.startswith("rank") and rank_state(int(name[4:])) in gone:
                    procs.signal([name], signal.SIGCONT)  # its agent sees the lease lost
                    injector.stopped.discard(name)
                elif name in coordinators and leader_name() not in (None, name):
                    procs.signal([name], signal.SIGCONT)  # it finds itself deposed
                    injector.stopped.discard(name)
            for fired in injector.fired:
                for rank in fired.ranks:
                    lost_at[rank] = max(lost_at.get(rank, 0.0), fired.at_unix_ms)
            for rank in range(opts.ranks):
                name = f"rank{rank}"
                if procs.alive(name) or name in injector.stopped:
                    continue
                lost_at.setdefault(rank, time.time() * 1000.0)
                if rank_state(rank) in gone:
                    procs.start(name, rank_argv(rank, rejoin=True))
                    show(f"relaunched rank {rank} with --rejoin")
            for name in coordinators:
                if name not in injector.stopped and not procs.alive(name):
                    start_coordinator(name)  # back as a standby, as systemd would
                    show(f"restarted {name}")

        def admitted_since(rank: int, since_ms: float) -> bool:
            return any(
                op.kind == "grow" and op.outcome == "completed" and rank in op.joined
                for op in watcher.operations.values()
                if op.end_unix_ms > since_ms
            )

        def settle(what: str) -> None:
            def done() -> bool:
                supervise()
                for rank, at in list(lost_at.items()):
                    if admitted_since(rank, at):
                        del lost_at[rank]
                return (
                    not lost_at
                    and not injector.stopped
                    and PHASE_NAME[status().phase] == "steady"
                    and len(status().members) == opts.ranks
                )

            wait_for(done, opts.deadline_s, what)

        # Requests arrive over the run: a third now, the rest around the failures.
        batches = _split(requests, 1 + 2 * max(1, len(opts.kills)))
        router.submit(next(batches))
        failures: list[dict[str, Any]] = []
        for event in opts.kills:
            router.submit(next(batches, []))
            wait_for(lambda: len(router.ledger.answers) > 0, 60, "the first answers")
            # Taken before the kill: a fast detection must not hide in the baseline.
            failures_before = set(watcher.failures)
            kill_unix_ms = time.time() * 1000.0
            procs.kill_together([f"rank{rank}" for rank in event])
            for rank in event:
                lost_at[rank] = kill_unix_ms
            show(f"[{(kill_unix_ms - t0_unix_ms) / 1000:7.3f}s] SIGKILL rank(s) {event}")

            def detected(ranks: list[int] = event, before: set[Any] = failures_before) -> bool:
                new = {rank for rank, at in watcher.failures if (rank, at) not in before}
                return set(ranks) <= new

            wait_for(detected, 30, f"the coordinator to detect the failure of {event}")
            for key, f in sorted(watcher.failures.items()):
                if f.rank in event and key not in failures_before:
                    failures.append(
                        {
                            "rank": f.rank,
                            "detect_ms": round(f.confirmed_unix_ms - kill_unix_ms, 1),
                            "suspect_ms": round(f.suspected_unix_ms - kill_unix_ms, 1)
                            if f.suspected_unix_ms
                            else None,
                            "reason": f.reason,
                        }
                    )
            router.submit(next(batches, []))
            settle(f"ranks {event} (and every rank a fault hit) to be admitted again")
        for rest in batches:
            router.submit(rest)
        if not router.wait_all_answered(opts.deadline_s):
            show(f"requests never answered: {router.unanswered()}")
        final = status()
        answers = dict(router.ledger.answers)
        lost = len(requests) - len(answers)
        match = lost == 0 and all(answers[r.id] == expected[r.id] for r in requests)
        rejoins: dict[int, dict[str, Any]] = {}
        for op in sorted(watcher.operations.values(), key=lambda o: o.end_unix_ms):
            if op.kind == "grow" and op.outcome == "completed":
                for r in op.joined:
                    rejoins[r] = {"rank": r, "stall_ms": round(op.stall_ms, 2)}
        report: dict[str, Any] = {
            "ranks": opts.ranks,
            "failures": failures,
            "rejoins": [rejoins[r] for r in sorted(rejoins)],
            "faults": [_fault_report(f, watcher) for f in injector.fired]
            + [{"fault": str(f), "fired": False, "resolution": None} for f in injector.pending],
            "requests": {
                "submitted": router.ledger.submitted,
                "completed": len(answers),
                "lost": lost,
                "duplicated": router.ledger.duplicated,
                "reassigned": router.ledger.reassigned,
            },
            "outputs_match_reference": match,
            "final_epoch": final.epoch,
            "final_members": list(final.members),
            "timeline": [
                {
                    "phase": PHASE_NAME[span.phase],
                    "op_id": span.op_id,
                    "epoch": span.epoch,
                    "start_ms": round(span.start_unix_ms - t0_unix_ms, 1),
                    "end_ms": round(span.end_unix_ms - t0_unix_ms, 1) if span.end_unix_ms else None,
                }
                for span in final.timeline
            ],
        }
        return report


def _fault_report(fired: FiredFault, watcher: StatusWatcher) -> dict[str, Any]:
    """What became of a fault: the leader's fail-over, or the outcome of the
    operation it hit (or, fired between operations, of the next one)."""
    if fired.fault.target == "coordinator":
        resolution: str | None = "failed_over"
    else:
        ops = sorted(watcher.operations.values(), key=lambda o: o.start_unix_ms)
        hit = [o for o in ops if o.op_id == fired.op_id] or [
            o for o in ops if o.start_unix_ms >= fired.at_unix_ms
        ]
        resolution = hit[0].outcome if hit else None
    return {
        "fault": str(fired.fault),
        "fired": True,
        "phase_at_fire": fired.phase_at_fire,
        "op_id": fired.op_id,
        "ranks": fired.ranks,
        "resolution": resolution,
    }


def _split(items: list[Any], parts: int) -> Iterator[list[Any]]:
    size = max(1, -(-len(items) // parts))
    for start in range(0, len(items), size):
        yield items[start : start + size]


def report_ok(report: dict[str, Any]) -> bool:
    req = report["requests"]
    return bool(
        report["outputs_match_reference"]
        and req["lost"] == 0
        and req["duplicated"] == 0
        and req["completed"] == req["submitted"]
        and all(f["fired"] and f["resolution"] for f in report.get("faults", []))
    )


def render_report(report: dict[str, Any], out: TextIO) -> None:
    req = report["requests"]
    out.write("\n== ep-recovery demo report ==\n")
    out.write(f"ranks: {report['ranks']}   final epoch: {report['final_epoch']}   ")
    out.write(f"members: {report['final_members']}\n")
    for f in report["failures"]:
        out.write(f"failure  rank {f['rank']}: detected in {f['detect_ms']} ms ({f['reason']})\n")
    for r in report["rejoins"]:
        out.write(f"rejoin   rank {r['rank']}: survivors stalled {r['stall_ms']} ms\n")
    for f in report.get("faults", []):
        if f["fired"]:
            out.write(
                f"fault    {f['fault']}: fired in {f['phase_at_fire']}, "
                f"{f['resolution'] or 'UNRESOLVED'}\n"
            )
        else:
            out.write(f"fault    {f['fault']}: NOT FIRED (the phase never began)\n")
    out.write(
        f"requests: {req['submitted']} submitted, {req['completed']} completed, "
        f"{req['lost']} lost, {req['duplicated']} duplicated ({req['reassigned']} re-routed)\n"
    )
    verdict = "match" if report["outputs_match_reference"] else "DO NOT match"
    out.write(f"outputs {verdict} the single-process reference\n")
    out.write("OK\n" if report_ok(report) else "FAILED\n")
