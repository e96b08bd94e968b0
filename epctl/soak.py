"""`epctl soak`: the demo's cluster under random faults for M minutes.

Each cycle submits a batch of requests, then SIGKILLs (or SIGSTOPs) a random
rank or the leader while the cluster is steady, and often arms a second fault
for a phase of the admission that brings the rank back (the demo's
`[stop:]WHO@PHASE`). As node supervisors would, every rank and coordinator that
died is relaunched; the cycle ends when all ranks are admitted again and the
batch is answered. The seed fixes the whole schedule of faults.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from coordinator.state_machine import OpKind, phases_of
from epctl.faults import Fault
from epctl.local_cluster import (
    ClusterError,
    ClusterSpec,
    LocalCluster,
    detected_failures,
    fault_report,
    local_cluster,
    report_ok,
    requests_report,
    unservable_loss,
    wait_for,
)
from protos.ep_recovery.v1 import admin_pb2
from reference_engine.reference import reference_outputs
from reference_engine.requests import Request, request_stream

# The admission's phases, where a cycle's second fault may strike.
ADMISSION_PHASES = tuple(str(phase) for phase in phases_of(OpKind.GROW))
# SIGSTOP is meaningful where a rank must answer: the pause and the resync.
STOP_PHASES = ("pausing", "resyncing")


@dataclass
class SoakOptions:
    minutes: float
    seed: int
    max_cycles: int | None = None  # stop sooner, after this many cycles
    ranks: int = 4
    ranks_per_node: int = 1
    requests_per_cycle: int = 8
    lease_ttl_s: int = 1
    json_output: bool = False
    verbose: bool = False
    workdir: Path | None = None
    deadline_s: float = 180.0  # for one cycle to converge


@dataclass(frozen=True)
class CyclePlan:
    first: Fault  # fired at once, in the steady phase
    then: Fault | None  # armed for the admission that follows, if any


# How long a cycle's control-plane fault lasts: an etcd outage, a frozen leader.
# Both outlast the demo's leases (rank 1 s, leader 2 s) by far.
HOLD_RANGE_S = (3.0, 12.0)


def plan_cycle(rng: random.Random, ranks: int, ranks_per_node: int, seed: int) -> CyclePlan:
    """One cycle's faults, drawn from `rng`. The first: a rank SIGKILLed or
    SIGSTOPped, the leader SIGKILLed or SIGSTOPped for several leases (the
    standby takes over, the ranks follow it), or etcd down for several leases
    (everyone serves on). After a rank fault, often a second one in the
    admission that follows; with the first, it may take every replica of an
    expert (the survivors reload it), never more than they can hold."""
    kind = rng.choices(("kill", "stop", "leader", "freeze", "etcd"), weights=(6, 1, 2, 1, 1))[0]
    if kind == "leader":
        return CyclePlan(Fault("coordinator", "steady"), None)  # no admission follows
    if kind == "freeze":
        hold = round(rng.uniform(*HOLD_RANGE_S), 1)
        return CyclePlan(Fault("coordinator", "steady", stop=True, hold_s=hold), None)
    if kind == "etcd":
        hold = round(rng.uniform(*HOLD_RANGE_S), 1)
        return CyclePlan(Fault("etcd", "steady", hold_s=hold), None)
    victim = rng.randrange(ranks)
    first = Fault("rank", "steady", victim, stop=kind == "stop")
    if rng.random() < 0.5:
        return CyclePlan(first, None)
    phase = rng.choice(ADMISSION_PHASES)
    others = [
        r
        for r in range(ranks)
        if r != victim and unservable_loss(ranks, ranks_per_node, seed, {victim, r}) is None
    ]
    who = rng.choice(("joiner", "coordinator", *(("rank",) if others else ())))
    stop = who != "coordinator" and phase in STOP_PHASES and rng.random() < 0.5
    rank = rng.choice(others) if who == "rank" else None
    return CyclePlan(first, Fault(who, phase, rank, stop))


def run_soak(opts: SoakOptions, out: TextIO) -> dict[str, Any]:
    """Run cycles until `opts.minutes` have passed; returns the report. A cycle
    that does not converge within its deadline ends the soak with `error`."""

    def show(line: str) -> None:
        if not opts.json_output:
            out.write(line + "\n")
            out.flush()

    rng = random.Random(opts.seed)
    spec = ClusterSpec(
        ranks=opts.ranks,
        ranks_per_node=opts.ranks_per_node,
        seed=opts.seed,
        lease_ttl_s=opts.lease_ttl_s,
        standby=True,  # the leader is a target
        workdir=opts.workdir,
        deadline_s=opts.deadline_s,
    )
    # One line a cycle says what happened; `--verbose` shows every phase too.
    trace = show if opts.verbose else (lambda line: None)
    with local_cluster(spec, show, trace) as cluster:
        stream = request_stream(opts.seed)
        requests: list[Request] = []
        expected: dict[int, tuple[int, ...]] = {}
        cycles: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        unfired: list[Fault] = []
        error: str | None = None
        started = time.monotonic()
        for number in itertools.count(1):
            out_of_time = time.monotonic() - started >= opts.minutes * 60
            if out_of_time or (opts.max_cycles is not None and number > opts.max_cycles):
                break
            plan = plan_cycle(rng, opts.ranks, opts.ranks_per_node, opts.seed)
            batch = list(itertools.islice(stream, opts.requests_per_cycle))
            requests += batch
            expected.update(reference_outputs(cluster.weights, cluster.cfg, batch))
            try:
                cycle = _run_cycle(cluster, plan, batch, failures, unfired)
            except ClusterError as exc:
                error = f"cycle {number} ({_describe(plan)}): {exc}"
                show(f"cycle {number}: FAILED: {exc}")
                break
            cycles.append(cycle)
            elapsed = time.monotonic() - started
            show(
                f"cycle {number:>3} at {elapsed / 60:5.1f} min: {_describe(plan)}: "
                f"all ranks back in {cycle['converged_s']:.1f} s; "
                f"{len(cluster.router.ledger.answers)}/{len(requests)} requests answered"
            )
        final = cluster.status()
        stalls = [op.stall_ms for op in _completed_admissions(cluster)]
        return {
            "minutes": opts.minutes,
            "seed": opts.seed,
            "ranks": opts.ranks,
            "elapsed_s": round(time.monotonic() - started, 1),
            "cycles": len(cycles),
            "failures": failures,
            "detect_ms": _summary([f["detect_ms"] for f in failures]),
            # From the leader's SIGKILL to a standby leading (its lease runs out first).
            "failover_ms": _summary([c["failover_ms"] for c in cycles if c["failover_ms"]]),
            "rejoins": len(stalls),
            "stall_ms": _summary(stalls),
            "faults": [fault_report(f, cluster.watcher) for f in cluster.injector.fired]
            + [{"fault": str(f), "fired": False, "resolution": None} for f in unfired],
            **requests_report(cluster, requests, expected),
            "final_epoch": final.epoch,
            "final_members": list(final.members),
            "error": error,
        }


def _run_cycle(
    cluster: LocalCluster,
    plan: CyclePlan,
    batch: list[Request],
    failures: list[dict[str, Any]],
    unfired: list[Fault],
) -> dict[str, Any]:
    started = time.monotonic()
    cluster.router.submit(batch)
    before = set(cluster.watcher.failures)
    leader = cluster.leader_endpoint()
    if plan.then is not None:
        cluster.injector.arm([plan.then])
    fired = cluster.injector.fire_now(plan.first, cluster.status())
    if fired is None:
        raise ClusterError(f"{plan.first} found nothing to hit")
    failover_ms = None
    if plan.first.target == "coordinator":
        wait_for(
            lambda: cluster.leader_endpoint() not in (None, leader),
            cluster.spec.deadline_s,
            "a standby to take over",
        )
        failover_ms = round(time.time() * 1000.0 - fired.at_unix_ms, 1)
    if plan.first.target == "rank" and not plan.first.stop:
        failures += detected_failures(cluster, fired.ranks, before, fired.at_unix_ms)
    if plan.first.target == "etcd":
        # The cluster looks settled from before the outage until the leader
        # steps down: the cycle lasts until etcd is back, at the least.
        wait_for(cluster.injector.etcd_back, cluster.spec.deadline_s, "etcd to be back")
    cluster.settle("every rank to be admitted again")
    unfired += cluster.injector.disarm()
    if not cluster.router.wait_all_answered(cluster.spec.deadline_s):
        raise ClusterError(f"requests never answered: {cluster.router.unanswered()}")
    return {
        "plan": _describe(plan),
        "converged_s": time.monotonic() - started,
        "failover_ms": failover_ms,
    }


def _completed_admissions(cluster: LocalCluster) -> list[admin_pb2.OperationSummary]:
    ops = cluster.watcher.operations.values()
    return [op for op in ops if op.kind == "grow" and op.outcome == "completed"]


def _describe(plan: CyclePlan) -> str:
    what = "SIGSTOP" if plan.first.stop else "SIGKILL"
    text = f"{what} {plan.first.who}"
    if plan.first.hold_s is not None:
        text += f" for {plan.first.hold_s:g} s"
    return text + (f", then {plan.then}" if plan.then else "")


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 1),
        "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "max": round(ordered[-1], 1),
    }


def soak_ok(report: dict[str, Any]) -> bool:
    return report["error"] is None and report["cycles"] > 0 and report_ok(report)


def render_soak(report: dict[str, Any], out: TextIO) -> None:
    req = report["requests"]
    out.write("\n== ep-recovery soak report ==\n")
    out.write(
        f"{report['cycles']} cycles in {report['elapsed_s'] / 60:.1f} min "
        f"(seed {report['seed']}, {report['ranks']} ranks); final epoch {report['final_epoch']}, "
        f"members {report['final_members']}\n"
    )
    fired = [f for f in report["faults"] if f["fired"]]
    by_resolution: dict[str, int] = {}
    for f in fired:
        key = f["resolution"] or "UNRESOLVED"
        by_resolution[key] = by_resolution.get(key, 0) + 1
    outcomes = ", ".join(f"{n} {k}" for k, n in sorted(by_resolution.items()))
    out.write(f"faults: {len(fired)} fired ({outcomes})\n")
    for f in report["faults"]:
        if not f["fired"]:
            out.write(f"fault    {f['fault']}: NOT FIRED (the phase never began)\n")
    if report["detect_ms"]:
        d = report["detect_ms"]
        out.write(f"detection: p50 {d['p50']} ms, max {d['max']} ms\n")
    if report["failover_ms"]:
        f = report["failover_ms"]
        out.write(f"leader failover: p50 {f['p50']} ms, max {f['max']} ms\n")
    if report["stall_ms"]:
        s = report["stall_ms"]
        out.write(
            f"rejoins: {report['rejoins']}; survivor stall p50 {s['p50']} ms, "
            f"p99 {s['p99']} ms, max {s['max']} ms\n"
        )
    out.write(
        f"requests: {req['submitted']} submitted, {req['completed']} completed, "
        f"{req['lost']} lost, {req['duplicated']} duplicated ({req['reassigned']} re-routed)\n"
    )
    verdict = "match" if report["outputs_match_reference"] else "DO NOT match"
    out.write(f"outputs {verdict} the single-process reference\n")
    if report["error"]:
        out.write(f"error: {report['error']}\n")
    out.write("OK\n" if soak_ok(report) else "FAILED\n")
