"""`epctl bench fanout`: one coordinator against many ranks.

A throwaway etcd, the real coordinator daemon (`python -m coordinator`) and N
simulated ranks packed into a few processes (`bench.fanout_ranks`, 256 ranks
each, asyncio). Every rank has a real etcd lease with its rank key on it and
its own gRPC channel and `WorkerService.Session` to the coordinator; it
answers commands as the agent does but has no engine: **Rebuild is
acknowledged without building gloo groups and Resync without moving
weights**. So this measures the control plane (the coordinator's dispatch,
its etcd writes, gRPC to N sessions), not group builds or transfers, which
`bench stall` measures with real ranks.

Per rank count, once the cluster has formed:
1. steady state: the CPU time of the coordinator process (and of the rank
   processes and etcd, for context) over a window, from /proc/PID/stat, as %
   of one core, with the progress reports the ranks sent meanwhile;
2. admissions: one rank is killed (its session closed and its lease revoked),
   the shrink completes, then a fresh process of it rejoins (`rejoin=True`)
   and is admitted. From the grow's GetOperation: the `pausing` phase (hold
   order sent to the last Held ack, "pause to all acks") and the other
   phases; per rank, the hold's span (order sent to its ack). The ranks' own
   clocks (same machine) split each rank's span into delivery (order sent to
   received), the run to the target iteration, and the ack's way back.

Settings (environment, all optional): EP_BENCH_FANOUT_RANKS,
EP_BENCH_FANOUT_PROGRESS_MS, EP_BENCH_FANOUT_HOLD_LEAD_S and
EP_BENCH_FANOUT_REPORTS_PER_S are comma lists; given any, every combination
runs (rank counts even; by default the plan's rank counts, 1000 ms, the
daemon's hold lead and no report budget). EP_BENCH_FANOUT_ADMISSIONS,
EP_BENCH_FANOUT_LEASE_TTL_S, EP_BENCH_FANOUT_STEP_MS,
EP_BENCH_FANOUT_CPU_WINDOW_S, EP_BENCH_FANOUT_SETTLE_INTERVALS (progress
intervals between one admission and the next kill; 0 shows the inflated hold
targets described in BENCHMARKS.md). EP_BENCH_FANOUT_LOG_DIR keeps the
coordinator's and the rank processes' logs there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import grpc

from bench.common import BenchError, BenchResult, Record, median, percentile, progress
from coordinator.config import CoordinatorConfig
from coordinator.state_machine import OpKind, Phase, phases_of
from epctl.local_etcd import LocalEtcd
from protos.ep_recovery.v1 import admin_pb2, admin_pb2_grpc, common_pb2

# Ranks per process: 1024 ranks in 4 processes, which the scheduler spreads over
# both cores; one process of 1024 sessions would be one core's worth at most.
RANKS_PER_HOST = 256
# A few seconds: 1024 leases refreshed every TTL/3 are ~600 keepalives/s, which
# etcd and 2 shared cores carry; the 1 s TTL of the real-rank benches would
# triple that.
LEASE_TTL_S = 5
# How often each rank reports progress (the coordinator's Welcome says so).
# The daemon's default is 50 ms; at 1024 ranks that is 20,480 reports/s, more
# than this 2-core machine's rank processes can even send (see BENCHMARKS.md).
PROGRESS_MS = 1000
DAEMON_PROGRESS_MS = int(CoordinatorConfig.model_fields["progress_interval_ms"].default)
DAEMON_HOLD_LEAD_S = float(CoordinatorConfig.model_fields["hold_lead_s"].default)
# The coordinator's report budget (--progress-reports-per-s): a case runs with
# it, or without (the interval exactly as given, as before the budget existed).
DAEMON_REPORTS_PER_S = int(CoordinatorConfig.model_fields["progress_reports_per_s"].default)
UNCAPPED_REPORTS_PER_S = 1_000_000
MAX_SETTLE_S = 10.0
STEP_MS = 20.0  # one simulated decode iteration
LONG_HOLD_LEAD_S = 0.5
SETTLE_S = 2.0  # after formation, before the CPU window
# Progress intervals between a shrink and the victim's relaunch, and between
# one admission's end and the next kill (see _admissions()).
REJOIN_DELAY_INTERVALS = 2
SETTLE_INTERVALS = 10
FORM_TIMEOUT_S = 300.0
OP_TIMEOUT_S = 120.0
POLL_S = 0.05
ROLLBACKS_SHOWN = 3  # in the progress log; a cascade would bury the rest
ENV = "EP_BENCH_FANOUT_"

PHASE_NAME = {v: k.removeprefix("PHASE_").lower() for k, v in common_pb2.Phase.items()}
# The grow's phases after the joiner is ready (admitting is its wait).
GROW_PHASES = tuple(str(p) for p in phases_of(OpKind.GROW) if p != Phase.ADMITTING)


@dataclass(frozen=True)
class Case:
    """One fresh cluster: its size and the coordinator's two settings that
    shape the fan-out."""

    ranks: int
    progress_ms: int = PROGRESS_MS
    hold_lead_s: float = DAEMON_HOLD_LEAD_S
    reports_per_s: int = UNCAPPED_REPORTS_PER_S

    @property
    def rank_progress_ms(self) -> int:
        """The interval the coordinator gives the ranks."""
        config = CoordinatorConfig(
            cluster="bench",
            world_size=self.ranks,
            progress_interval_ms=self.progress_ms,
            progress_reports_per_s=self.reports_per_s,
        )
        return config.rank_progress_interval_ms


@dataclass(frozen=True)
class FanoutPlan:
    cases: tuple[Case, ...]
    admissions: int
    lease_ttl_s: int = LEASE_TTL_S
    step_ms: float = STEP_MS
    cpu_window_s: float = 10.0
    settle_intervals: int = SETTLE_INTERVALS


def quick_plan() -> FanoutPlan:
    # The daemon's default interval too, side by side: what the steady state
    # costs at the rate the product ships with.
    return FanoutPlan(
        cases=(Case(256), Case(256, progress_ms=DAEMON_PROGRESS_MS)),
        admissions=3,
        cpu_window_s=5.0,
    )


def full_plan() -> FanoutPlan:
    # 1024 ranks at the daemon's 50 ms would be 20,480 reports/s: more than
    # the rank processes can send on 2 cores (EP_BENCH_FANOUT_* runs it); the
    # daemon's report budget makes them report every 4 s instead (the last
    # case). A hold lead 10 times the default, beside it, shows what the
    # retargets cost.
    return FanoutPlan(
        cases=(
            Case(256),
            Case(1024),
            Case(1024, hold_lead_s=LONG_HOLD_LEAD_S),
            Case(256, progress_ms=DAEMON_PROGRESS_MS),
            Case(1024, progress_ms=DAEMON_PROGRESS_MS, reports_per_s=DAEMON_REPORTS_PER_S),
        ),
        admissions=5,
        cpu_window_s=10.0,
    )


def plan_from_env(base: FanoutPlan, environ: Mapping[str, str]) -> FanoutPlan:
    """`base` with the EP_BENCH_FANOUT_* overrides; BenchError names a bad one."""

    def number(name: str, cast: Callable[[str], float], low: float) -> Any:
        text = environ.get(ENV + name)
        if text is None:
            return None
        try:
            value = cast(text)
        except ValueError:
            raise BenchError(f"{ENV}{name}={text!r}: not a number") from None
        if not value >= low:
            raise BenchError(f"{ENV}{name}={text!r}: must be at least {low:g}")
        return value

    def numbers(
        name: str, cast: Callable[[str], float], low: float, even: bool = False
    ) -> tuple[Any, ...] | None:
        text = environ.get(ENV + name)
        if text is None:
            return None
        try:
            values = tuple(cast(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise BenchError(f"{ENV}{name}={text!r}: expected a number or a comma list") from None
        if not values or any(not v >= low or (even and v % 2) for v in values):
            need = "even and " if even else ""
            raise BenchError(f"{ENV}{name}={text!r}: every value must be {need}>= {low:g}")
        return values

    plan = base
    ranks = numbers("RANKS", int, 2, even=True)
    intervals = numbers("PROGRESS_MS", int, 5)
    leads = numbers("HOLD_LEAD_S", float, 0.001)
    budgets = numbers("REPORTS_PER_S", int, 1)
    if any(v is not None for v in (ranks, intervals, leads, budgets)):
        # Every combination, in the order given. Not given: the plan's rank
        # counts, the bench's progress interval, the daemon's hold lead, no
        # report budget.
        ranks = ranks or tuple(dict.fromkeys(c.ranks for c in base.cases))
        intervals = intervals or (PROGRESS_MS,)
        leads = leads or (DAEMON_HOLD_LEAD_S,)
        budgets = budgets or (UNCAPPED_REPORTS_PER_S,)
        cases = tuple(
            Case(n, ms, lead, budget)
            for budget in budgets
            for ms in intervals
            for lead in leads
            for n in ranks
        )
        plan = replace(plan, cases=cases)
    for field_name, env_name, cast, low in (
        ("admissions", "ADMISSIONS", int, 1),
        ("lease_ttl_s", "LEASE_TTL_S", int, 1),
        ("step_ms", "STEP_MS", float, 0.1),
        ("cpu_window_s", "CPU_WINDOW_S", float, 0.5),
        ("settle_intervals", "SETTLE_INTERVALS", int, 0),
    ):
        value = number(env_name, cast, low)
        if value is not None:
            plan = replace(plan, **{field_name: value})
    return plan


def run(quick: bool, log: TextIO | None = None) -> BenchResult:
    plan = plan_from_env(quick_plan() if quick else full_plan(), os.environ)
    return run_plan(plan, log)


def run_plan(plan: FanoutPlan, log: TextIO | None = None) -> BenchResult:
    result = BenchResult()
    keep = os.environ.get(ENV + "LOG_DIR")
    with contextlib.ExitStack() as stack:
        if keep:
            workdir = Path(keep)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ep-bench-")))
        etcd = LocalEtcd(name="bench-fanout")
        try:
            etcd.start()
            for case in plan.cases:
                with _Cluster(workdir, log, etcd, case, plan) as cluster:
                    result.results.append(cluster.measure())
        finally:
            etcd.stop()
    if all("error" in record for record in result.results):
        raise BenchError("every case failed: " + "; ".join(str(r["error"]) for r in result.results))
    result.notes += [
        f"simulated ranks ({RANKS_PER_HOST} per process, asyncio) with real etcd leases "
        f"(TTL {plan.lease_ttl_s} s, refreshed every TTL/3 over one keepalive stream per "
        "process) and one gRPC channel and session each to the real coordinator daemon; "
        "Rebuild is acknowledged WITHOUT building gloo groups, Resync without moving weights",
        f"a simulated rank iterates every {plan.step_ms:g} ms while it serves and reports "
        "progress every progress_interval_ms: the coordinator's --progress-interval-ms "
        f"(the daemon's default is {DAEMON_PROGRESS_MS} ms), or longer where "
        "--progress-reports-per-s (progress_reports_per_s; the daemon's default is "
        f"{DAEMON_REPORTS_PER_S}, {UNCAPPED_REPORTS_PER_S:,}: no budget) makes it so; "
        "hold_lead_s: the coordinator's "
        f"--hold-lead-s (the daemon's default is {DAEMON_HOLD_LEAD_S:g} s)",
        f"coordinator_cpu_pct: the coordinator's user+system CPU over {plan.cpu_window_s:g} s "
        "of steady state (from /proc/PID/stat) as % of one core; rank_hosts_cpu_pct and "
        "etcd_cpu_pct likewise, summed over their processes; "
        "coordinator_cpu_us_per_report: its CPU time over the progress reports received",
        "an admission: one rank's session closed and its lease revoked, the shrink, then a "
        "fresh process of it with rejoin=True, admitted (grow); victims spread over the ranks",
        "pause_to_all_acks: the grow's `pausing` phase in GetOperation, from the hold order "
        "to the last Held ack (one per admission; with few admissions p99 is about the "
        "maximum). It includes the run to the target iteration (the hold lead rounded up to "
        "whole iterations, at least 2, doubled at each retarget)",
        "hold_ack_per_rank: each survivor's hold span in GetOperation (order sent to its "
        "ack handled), pooled over admissions; hold_delivery: order sent to received by the "
        "rank; ack_return: Held sent by the rank to handled by the coordinator "
        "(the ranks' wall clocks, same machine)",
        "rebuild/resync/resume_all_acks: those phases of the grow (command sent to every "
        "rank, to the last ack), median over admissions",
        f"the victim rejoins {REJOIN_DELAY_INTERVALS} progress intervals (at least 1 s) after "
        f"its shrink; the next kill comes {plan.settle_intervals} intervals after the grow "
        "ended (admissions are minutes apart in a real cluster; sooner, the last joiner's "
        "progress rate, still too high in the coordinator's average, inflates the next hold "
        "target: see BENCHMARKS.md)",
        "hold_lead_seen: the target minus the rank's iteration when the order arrived, in ms "
        "of iterations; retargets: hold orders re-sent because a rank was already past the "
        "target; rollbacks, unexpected_failures (ranks failed other than the victims) and "
        "leases_lost: whether the run stayed clean; error: what stopped a case",
    ]
    return result


# --- processes -------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far (its own threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces: fields start after its ')'.
        after = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(after[11]), int(after[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


class _Host:
    """One process of simulated ranks: JSON requests on its stdin, answers on stdout."""

    def __init__(self, argv: list[str], logfile: Path) -> None:
        with logfile.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,  # a Ctrl-C reaches the bench, which stops it
            )
        self.logfile = logfile
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def request(self, timeout_s: float, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise BenchError(f"rank process {self.pid} is gone:\n{self.tail()}") from None
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(
                    f"rank process {self.pid} gave no answer to {request} within "
                    f"{timeout_s:.0f} s:\n{self.tail()}"
                )
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise BenchError(f"rank process {self.pid} exited:\n{self.tail()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise BenchError(f"rank process {self.pid}: {request} failed: {answer.get('error')}")
        return answer

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = self.logfile.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            # Ranks revoke their leases and close their sessions on a stop.
            with contextlib.suppress(BenchError):
                self.request(30.0, op="stop")
        if self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


class _Cluster:
    """The coordinator and the rank processes of one rank count."""

    def __init__(
        self,
        workdir: Path,
        log: TextIO | None,
        etcd: LocalEtcd,
        case: Case,
        plan: FanoutPlan,
    ) -> None:
        self.workdir = workdir
        self.log = log
        self.etcd = etcd
        self.case = case
        self.ranks = case.ranks
        self.progress_ms = case.rank_progress_ms
        self.plan = plan
        self.cluster = (
            f"bench-fanout-{case.ranks}-p{case.progress_ms}-l{case.hold_lead_s:g}"
            f"-r{case.reports_per_s}"
        )
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.hosts: list[_Host] = []
        self.host_of: dict[int, _Host] = {}
        self.endpoint = ""
        self.rollbacks = 0  # operations that ended rolled back (counted, waited past)
        self._channel: grpc.Channel | None = None
        self._stub: admin_pb2_grpc.AdminServiceStub | None = None

    def __enter__(self) -> _Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._channel is not None:
            self._channel.close()
        # The coordinator first: ranks leaving before it would set off a shrink
        # per lease revoked, work nobody measures.
        if self.coordinator is not None:
            if self.coordinator.poll() is None:
                self.coordinator.send_signal(signal.SIGTERM)
                try:
                    self.coordinator.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.coordinator.kill()
            self.coordinator.wait()
        for host in self.hosts:
            host.stop()

    # --- start -----------------------------------------------------------------

    def _coordinator_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = (self.workdir / f"{self.cluster}-coordinator.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def _start_coordinator(self) -> None:
        ready = self.workdir / f"{self.cluster}.json"
        with (self.workdir / f"{self.cluster}-coordinator.log").open("ab") as logfile:
            self.coordinator = subprocess.Popen(
                [
                    sys.executable, "-m", "coordinator",
                    "--cluster", self.cluster, "--world-size", str(self.ranks),
                    "--listen", "127.0.0.1:0", "--etcd", self.etcd.endpoint,
                    "--progress-interval-ms", str(self.case.progress_ms),
                    "--progress-reports-per-s", str(self.case.reports_per_s),
                    "--hold-lead-s", str(self.case.hold_lead_s),
                    "--ready-file", str(ready),
                ],
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        coordinator = self.coordinator
        self._wait(lambda: ready.exists() or coordinator.poll() is not None, 120, "the coordinator")
        if coordinator.poll() is not None:
            raise BenchError(f"coordinator exited:\n{self._coordinator_tail()}")
        self.endpoint = f"127.0.0.1:{json.loads(ready.read_text())['listen_port']}"
        self._channel = grpc.insecure_channel(self.endpoint)
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)

    def _start_hosts(self) -> None:
        for first in range(0, self.ranks, RANKS_PER_HOST):
            count = min(RANKS_PER_HOST, self.ranks - first)
            host = _Host(
                [
                    sys.executable, "-m", "bench.fanout_ranks",
                    "--cluster", self.cluster, "--coordinator", self.endpoint,
                    "--etcd", self.etcd.endpoint, "--world-size", str(self.ranks),
                    "--first", str(first), "--count", str(count),
                    "--lease-ttl", str(self.plan.lease_ttl_s),
                    "--step-ms", str(self.plan.step_ms),
                ],
                self.workdir / f"{self.cluster}-ranks-{first}.log",
            )  # fmt: skip
            self.hosts.append(host)
            for rank in range(first, first + count):
                self.host_of[rank] = host

    # --- admin calls --------------------------------------------------------------

    def _operations(self) -> list[admin_pb2.OperationSummary]:
        assert self._stub is not None
        try:
            reply = self._stub.ListOperations(admin_pb2.ListOperationsRequest(limit=8), timeout=5)
        except grpc.RpcError:
            return []
        return list(reply.operations)

    def _wait(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.coordinator is not None and self.coordinator.poll() is not None:
                raise BenchError(
                    f"the coordinator exited while waiting for {what}:\n{self._coordinator_tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"timed out after {timeout_s:.0f} s waiting for {what} "
                    f"({self.ranks} ranks)\n--- coordinator\n{self._coordinator_tail()}"
                )
            time.sleep(POLL_S)

    def _wait_op(self, kind: str, rank: int | None, seen: set[str]) -> admin_pb2.OperationSummary:
        """The first new completed operation of `kind` that joined or left `rank`;
        rolled-back ones are counted and waited past."""
        found: list[admin_pb2.OperationSummary] = []

        def done() -> bool:
            for op in reversed(self._operations()):  # oldest first
                if op.op_id in seen or op.outcome == "running":
                    continue
                seen.add(op.op_id)
                if op.outcome != "completed":
                    self.rollbacks += 1
                    if self.rollbacks <= ROLLBACKS_SHOWN:
                        progress(self.log, f"fanout: {op.op_id} {op.outcome}: {op.reason[:200]}")
                    continue
                ranks_of = set(op.joined) | set(op.left)
                if op.kind == kind and (rank is None or rank in ranks_of):
                    found.append(op)
                    return True
            return False

        self._wait(done, OP_TIMEOUT_S if rank is not None else FORM_TIMEOUT_S, f"a {kind}")
        return found[0]

    # --- the measurement -------------------------------------------------------------

    def measure(self) -> Record:
        """The case's record. A failure part-way keeps what was measured before
        it (the admissions completed by then among it), with `error` saying
        what went wrong."""
        plan = self.plan
        record: Record = {
            "ranks": self.ranks,
            "rank_processes": math.ceil(self.ranks / RANKS_PER_HOST),
            "admissions": plan.admissions,
            "lease_ttl_s": plan.lease_ttl_s,
            "progress_interval_ms": self.progress_ms,
            "report_budget_per_s": self.case.reports_per_s,
            "step_ms": plan.step_ms,
            "hold_lead_s": self.case.hold_lead_s,
        }
        progress(
            self.log,
            f"fanout: {self.ranks} ranks in {record['rank_processes']} processes, "
            f"progress every {self.progress_ms} ms, hold lead {self.case.hold_lead_s:g} s",
        )
        samples = _Samples()
        error = ""
        try:
            seen: set[str] = set()
            record["form_s"] = round(self._form(seen), 2)
            progress(self.log, f"fanout: {self.ranks} ranks formed in {record['form_s']} s")
            time.sleep(SETTLE_S)
            record.update(self._steady_cpu())
            progress(
                self.log,
                f"fanout: steady state, coordinator {record['coordinator_cpu_pct']}% of a core",
            )
            self._admissions(seen, samples)
        except BenchError as exc:
            # A case that fails (the coordinator stepping down under load, say)
            # is a finding; the other cases still run.
            progress(self.log, f"fanout: {self.ranks} ranks failed: {exc}")
            error = _summary(str(exc))
        record["admissions_done"] = len(samples.pauses)
        record.update(samples.summary())
        with contextlib.suppress(BenchError, grpc.RpcError):
            record["unexpected_failures"] = self._unexpected_failures(samples.victims)
            record["leases_lost"] = sum(
                int(h.request(10.0, op="stats")["lost_leases"]) for h in self.hosts
            )
        record["rollbacks"] = self.rollbacks
        if error:
            record["error"] = error
        return record

    def _form(self, seen: set[str]) -> float:
        """Start everything; seconds from the rank processes' start to formed."""
        self._start_coordinator()
        started = time.perf_counter()
        self._start_hosts()
        for host in self.hosts:
            host.request(FORM_TIMEOUT_S, op="start")
        self._wait_op("form", None, seen)
        return time.perf_counter() - started

    def _intervals_s(self, intervals: int) -> float:
        """`intervals` progress intervals in s, at least 1 s and at most MAX_SETTLE_S."""
        return min(max(1.0, intervals * self.progress_ms / 1000.0), MAX_SETTLE_S)

    def _admissions(self, seen: set[str], samples: _Samples) -> None:
        plan = self.plan
        assert self.coordinator is not None
        for k in range(plan.admissions):
            if k:
                # Admissions are minutes apart in a real cluster. The last
                # joiner's first reports after its resume give the coordinator a
                # rate far too high (its iteration jumped from 0 to the cluster's),
                # which it averages away over a few reports; until then it sets
                # hold targets far ahead (BENCHMARKS.md, fanout).
                time.sleep(self._intervals_s(plan.settle_intervals))
            # Spread over the ranks and the processes; never the same twice in a row.
            victim = (1 + k * (self.ranks // plan.admissions + 1)) % self.ranks
            samples.victims.append(victim)
            cpu_before = _cpu_seconds(self.coordinator.pid)
            host = self.host_of[victim]
            host.request(30.0, op="kill", rank=victim)
            shrink = self._wait_op("shrink", victim, seen)
            # A relaunched rank takes seconds to start and load its weights;
            # meanwhile every survivor reports progress from its resume on, and
            # the hold target is predicted from that, not from before the shrink.
            time.sleep(self._intervals_s(REJOIN_DELAY_INTERVALS))
            host.request(60.0, op="join", rank=victim)
            grow = self._wait_op("grow", victim, seen)
            cpu = _cpu_seconds(self.coordinator.pid) - cpu_before
            spans = self._phase_spans(grow.op_id)
            hold_spans = self._hold_spans(grow.op_id)
            split = self._split_holds(grow.op_id, hold_spans)
            samples.add(shrink, grow, spans, hold_spans, cpu, split)
            progress(
                self.log,
                f"fanout: {self.ranks} ranks, admission {k + 1}/{plan.admissions} "
                f"(rank {victim}): pause to all acks {spans['pausing']:.1f} ms, "
                f"retargets {grow.retargets}, stall {grow.stall_ms:.1f} ms",
            )

    def _steady_cpu(self) -> dict[str, float]:
        assert self.coordinator is not None
        etcd_pid = self.etcd.pid
        assert etcd_pid is not None

        def sample() -> tuple[float, float, float, float, int]:
            sent = sum(int(h.request(10.0, op="stats")["progress"]) for h in self.hosts)
            return (
                time.monotonic(),
                _cpu_seconds(self.coordinator.pid) if self.coordinator else 0.0,
                sum(_cpu_seconds(h.pid) for h in self.hosts),
                _cpu_seconds(etcd_pid),
                sent,
            )

        t0, c0, h0, e0, p0 = sample()
        time.sleep(self.plan.cpu_window_s)
        t1, c1, h1, e1, p1 = sample()
        window = t1 - t0
        reports = p1 - p0
        return {
            "cpu_window_s": round(window, 2),
            "progress_reports_per_s": round(reports / window, 1),
            "coordinator_cpu_pct": round(100 * (c1 - c0) / window, 2),
            "coordinator_cpu_us_per_report": round(1e6 * (c1 - c0) / reports, 1)
            if reports
            else 0.0,
            "rank_hosts_cpu_pct": round(100 * (h1 - h0) / window, 2),
            "etcd_cpu_pct": round(100 * (e1 - e0) / window, 2),
        }

    def _detail(self, op_id: str) -> admin_pb2.OperationDetail:
        assert self._stub is not None
        detail: admin_pb2.OperationDetail = self._stub.GetOperation(
            admin_pb2.GetOperationRequest(op_id=op_id), timeout=10
        )
        return detail

    def _phase_spans(self, op_id: str) -> dict[str, float]:
        spans: dict[str, float] = {}
        for span in self._detail(op_id).phases:
            name = PHASE_NAME[span.phase]
            if span.end_unix_ms:
                # A rolled-back retry could repeat a phase; the last one counts.
                spans[name] = span.end_unix_ms - span.start_unix_ms
        missing = [p for p in GROW_PHASES if p not in spans]
        if missing:
            raise BenchError(f"{op_id}: no {', '.join(missing)} span in GetOperation")
        return spans

    def _hold_spans(self, op_id: str) -> dict[int, tuple[float, float]]:
        """Each survivor's hold span: (order sent, ack handled), coordinator's clock."""
        return {
            span.rank: (span.start_unix_ms, span.end_unix_ms)
            for span in self._detail(op_id).ranks
            if span.step == "hold" and span.outcome == "done"
        }

    def _split_holds(
        self, op_id: str, spans: Mapping[int, tuple[float, float]]
    ) -> tuple[list[float], list[float], list[float]]:
        """Per rank: order sent -> received, Held sent -> handled, and how far
        ahead of the rank the target was when the order arrived (ms of its
        iterations). Only the ranks whose last hold order is the one their span
        answers (a rank that saw a retarget late may hold an older command's times)."""
        seen: dict[int, list[float]] = {}
        for host in self.hosts:
            for rank, values in host.request(30.0, op="holds", op_id=op_id)["holds"].items():
                seen[int(rank)] = values
        last_command = max((int(v[0]) for v in seen.values()), default=0)
        delivery: list[float] = []
        back: list[float] = []
        ahead: list[float] = []
        for rank, (sent, handled) in spans.items():
            values = seen.get(rank)
            if values is None or int(values[0]) != last_command or not values[2]:
                continue
            _, received, held, iterations = values
            delivery.append(received - sent)
            back.append(handled - held)
            ahead.append(iterations * self.plan.step_ms)
        return delivery, back, ahead

    def _unexpected_failures(self, victims: Iterable[int]) -> int:
        assert self._stub is not None
        status: admin_pb2.ClusterStatus = self._stub.GetStatus(
            admin_pb2.GetStatusRequest(), timeout=10
        )
        expected = list(victims)
        failed = [f.rank for f in status.failures]
        for rank in expected:
            if rank in failed:
                failed.remove(rank)
        return len(failed)


@dataclass
class _Samples:
    """What the completed admissions of one case measured."""

    victims: list[int] = field(default_factory=list)
    pauses: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in GROW_PHASES})
    per_rank: list[float] = field(default_factory=list)
    delivery: list[float] = field(default_factory=list)
    back: list[float] = field(default_factory=list)
    ahead: list[float] = field(default_factory=list)
    shrinks: list[float] = field(default_factory=list)
    grows: list[float] = field(default_factory=list)
    stalls: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    retargets: int = 0

    def add(
        self,
        shrink: admin_pb2.OperationSummary,
        grow: admin_pb2.OperationSummary,
        spans: Mapping[str, float],
        hold_spans: Mapping[int, tuple[float, float]],
        cpu_s: float,
        split: tuple[list[float], list[float], list[float]],
    ) -> None:
        self.shrinks.append(shrink.end_unix_ms - shrink.start_unix_ms)
        self.grows.append(grow.end_unix_ms - grow.start_unix_ms)
        self.stalls.append(grow.stall_ms)
        self.retargets += grow.retargets
        for phase in GROW_PHASES:
            self.phases[phase].append(spans[phase])
        self.pauses.append(spans["pausing"])
        self.per_rank += [end - start for start, end in hold_spans.values()]
        self.delivery += split[0]
        self.back += split[1]
        self.ahead += split[2]
        self.cpu_s.append(cpu_s)

    def summary(self) -> Record:
        """The figures, where there are samples to compute them from."""

        def ms(values: list[float], q: float | None) -> float | None:
            if not values:
                return None
            return round(max(values) if q is None else percentile(values, q), 2)

        if not self.pauses:
            return {}
        return {
            "pause_to_all_acks_p50_ms": ms(self.pauses, 50),
            "pause_to_all_acks_p99_ms": ms(self.pauses, 99),
            "pause_to_all_acks_max_ms": ms(self.pauses, None),
            "hold_ack_per_rank_p50_ms": ms(self.per_rank, 50),
            "hold_ack_per_rank_p99_ms": ms(self.per_rank, 99),
            "hold_delivery_p50_ms": ms(self.delivery, 50),
            "hold_delivery_p99_ms": ms(self.delivery, 99),
            "ack_return_p50_ms": ms(self.back, 50),
            "ack_return_p99_ms": ms(self.back, 99),
            "hold_lead_seen_p50_ms": ms(self.ahead, 50),
            "hold_lead_seen_max_ms": ms(self.ahead, None),
            "rebuild_all_acks_p50_ms": ms(self.phases["rebuilding"], 50),
            "resync_all_acks_p50_ms": ms(self.phases["resyncing"], 50),
            "resume_all_acks_p50_ms": ms(self.phases["resuming"], 50),
            "stall_p50_ms": ms(self.stalls, 50),
            "shrink_p50_ms": ms(self.shrinks, 50),
            "grow_p50_ms": ms(self.grows, 50),
            "coordinator_cpu_s_per_admission_p50": round(median(self.cpu_s), 3),
            "retargets": self.retargets,
        }


def _summary(message: str, limit: int = 300) -> str:
    """The first line of a failure and its last (the coordinator's last log
    line, where it says why it stopped)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    return text[:limit]


if __name__ == "__main__":  # python -m bench.fanout: the settings of EP_BENCH_FANOUT_*
    report = run_plan(plan_from_env(quick_plan(), os.environ), sys.stderr)
    sys.stdout.write(json.dumps({"results": report.results, "notes": report.notes}) + "\n")
