"""`epctl demo`: etcd, a coordinator and a small EP cluster on this machine; ranks
are SIGKILLed and relaunched with --rejoin; the outcome is checked against a
single-process reference and reported.

With `--fault [stop:]WHO@PHASE` (epctl.faults) the demo also injects faults as
the coordinator enters a phase, runs a standby coordinator when the leader is a
target, and, as a node supervisor would, relaunches every rank (and restarts
every coordinator) that died, until all ranks are admitted again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from epctl.faults import Fault, check_fault_hold
from epctl.local_cluster import (
    ClusterError,
    ClusterSpec,
    detected_failures,
    fault_report,
    local_cluster,
    rejoins_report,
    report_ok,
    requests_report,
    timeline_report,
    unservable_loss,
    wait_for,
)


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
    # --fault-hold: how long a SIGSTOPped process stays stopped and a killed
    # etcd stays down (None: thawed once the cluster moved on; etcd restarted
    # at once).
    fault_hold_s: float | None = None


def check_kills(opts: DemoOptions) -> None:
    """Raise ValueError unless every failure event is one the cluster survives."""
    for event in opts.kills:
        outside = [r for r in event if not 0 <= r < opts.ranks]
        if outside:
            raise ValueError(
                f"--kill {','.join(map(str, event))}: rank {outside[0]} is outside the "
                f"cluster (0..{opts.ranks - 1})"
            )
        if set(event) == set(range(opts.ranks)):
            continue  # a total loss: the relaunched ranks form the cluster again
        # Experts that lose every replica are reloaded onto the survivors from
        # the checkpoint, as long as they have slots to spare.
        problem = unservable_loss(opts.ranks, opts.ranks_per_node, opts.seed, set(event))
        if problem is not None:
            raise ValueError(f"--kill {','.join(map(str, event))}: {problem}")


def run_demo(opts: DemoOptions, out: TextIO) -> dict[str, Any]:
    """Run the demo; returns the report. Raises ClusterError on setup failures."""
    from reference_engine.reference import reference_outputs
    from reference_engine.requests import make_requests

    def show(line: str) -> None:
        if not opts.json_output:
            out.write(line + "\n")
            out.flush()

    check_kills(opts)
    check_fault_hold(opts.fault_hold_s, opts.faults)
    targets = {f.target for f in opts.faults}
    if "etcd" in targets and opts.etcd is not None:
        raise ClusterError("--fault etcd@...: needs the demo's own etcd (no --etcd)")
    # The leases stay short through an etcd outage: the ranks serve on and
    # renew theirs, the leader steps down and leads again (docs/architecture.md).
    spec = ClusterSpec(
        ranks=opts.ranks,
        ranks_per_node=opts.ranks_per_node,
        seed=opts.seed,
        etcd=opts.etcd,
        lease_ttl_s=opts.lease_ttl_s,
        leader_ttl_s=2,
        # With the leader as a target, a standby runs beside it from the start.
        standby="coordinator" in targets,
        workdir=opts.workdir,
        deadline_s=opts.deadline_s,
    )
    with local_cluster(spec, show) as cluster:
        requests = make_requests(opts.seed, opts.requests)
        expected = reference_outputs(cluster.weights, cluster.cfg, requests)
        cluster.injector.arm([replace(f, hold_s=opts.fault_hold_s) for f in opts.faults])
        router, watcher = cluster.router, cluster.watcher
        # Requests arrive over the run: a third now, the rest around the failures.
        batches = _split(requests, 1 + 2 * max(1, len(opts.kills)))
        router.submit(next(batches))
        failures: list[dict[str, Any]] = []
        for event in opts.kills:
            router.submit(next(batches, []))
            wait_for(lambda: len(router.ledger.answers) > 0, 60, "the first answers")
            # Taken before the kill: a fast detection must not hide in the baseline.
            failures_before = set(watcher.failures)
            kill_unix_ms = cluster.kill_ranks(event)
            failures += detected_failures(cluster, event, failures_before, kill_unix_ms)
            router.submit(next(batches, []))
            cluster.settle(f"ranks {event} (and every rank a fault hit) to be admitted again")
        for rest in batches:
            router.submit(rest)
        if not router.wait_all_answered(opts.deadline_s):
            show(f"requests never answered: {router.unanswered()}")
        final = cluster.status()
        cluster.note_exits()
        report: dict[str, Any] = {
            "ranks": opts.ranks,
            "failures": failures,
            "rejoins": rejoins_report(cluster),
            "faults": [fault_report(f, watcher) for f in cluster.injector.fired]
            + [
                {"fault": str(f), "fired": False, "resolution": None}
                for f in cluster.injector.pending
            ],
            **requests_report(cluster, requests, expected),
            "final_epoch": final.epoch,
            "final_members": list(final.members),
            # Processes that ended without the demo killing them (the
            # supervisor relaunched them): {"who", "rc", "at_ms"}.
            "unplanned_exits": cluster.unplanned_exits,
            "timeline": timeline_report(cluster),
        }
        return report


def _split(items: list[Any], parts: int) -> Iterator[list[Any]]:
    size = max(1, -(-len(items) // parts))
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
    for x in report.get("unplanned_exits", []):
        out.write(f"exit     {x['who']} exited by itself (rc {x['rc']}) at {x['at_ms']} ms\n")
    out.write(
        f"requests: {req['submitted']} submitted, {req['completed']} completed, "
        f"{req['lost']} lost, {req['duplicated']} duplicated ({req['reassigned']} re-routed)\n"
    )
    verdict = "match" if report["outputs_match_reference"] else "DO NOT match"
    out.write(f"outputs {verdict} the single-process reference\n")
    out.write("OK\n" if report_ok(report) else "FAILED\n")
