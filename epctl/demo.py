"""`epctl demo`: etcd, a coordinator and a small EP cluster on this machine; ranks
are SIGKILLed and relaunched with --rejoin; the outcome is checked against a
single-process reference and reported.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc

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
        self._logs: list[TextIO] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
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
        return proc

    def kill_together(self, names: list[str]) -> None:
        """SIGKILL these processes back to back (as a lost node does), then reap them."""
        for name in names:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.procs[name].pid, signal.SIGKILL)
        for name in names:
            self.procs[name].wait()

    def stop_all(self) -> None:
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
    """Polls GetStatus; shows phase changes as they happen."""

    def __init__(self, endpoint: str, show: Callable[[str], None], t0_unix_ms: float) -> None:
        self._channel = grpc.insecure_channel(endpoint)
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._show = show
        self._t0 = t0_unix_ms
        self.status: admin_pb2.ClusterStatus | None = None
        self._seen_spans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(grpc.RpcError):
                status = self._stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=2)
                self.status = status
                spans = list(status.timeline)
                for span in spans[self._seen_spans :]:
                    at = (span.start_unix_ms - self._t0) / 1000.0
                    self._show(
                        f"[{at:7.3f}s] phase {PHASE_NAME[span.phase]:<10} epoch {span.epoch}"
                        + (f"  ({span.op_id})" if span.op_id else "")
                    )
                self._seen_spans = len(spans)
            self._stop.wait(0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._channel.close()


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
    t0_unix_ms = time.time() * 1000.0
    with contextlib.ExitStack() as stack:
        workdir = opts.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        procs = Processes(workdir)
        stack.callback(procs.stop_all)
        if opts.etcd is None:
            etcd = stack.enter_context(LocalEtcd())
            etcd_endpoint = etcd.endpoint
            show(f"etcd        {etcd_endpoint} (local, data in a temporary dir)")
        else:
            etcd_endpoint = opts.etcd

        cfg = ModelConfig(seed=opts.seed)
        checkpoint = workdir / "model.pt"
        weights = derive_weights(cfg)
        save_checkpoint(checkpoint, cfg, weights)
        requests = make_requests(opts.seed, opts.requests)
        expected = reference_outputs(weights, cfg, requests)

        cluster = "demo"
        ready_file = workdir / "coordinator.json"
        procs.start(
            "coordinator",
            [
                sys.executable,
                "-m",
                "coordinator",
                "--cluster",
                cluster,
                "--world-size",
                str(opts.ranks),
                "--listen",
                "127.0.0.1:0",
                "--etcd",
                etcd_endpoint,
                "--ready-file",
                str(ready_file),
            ],
        )
        wait_for(ready_file.exists, 30, "the coordinator to serve")
        coord = json.loads(ready_file.read_text())
        endpoint = f"127.0.0.1:{coord['listen_port']}"
        show(f"coordinator {endpoint} (pid {coord['pid']})")

        router = RequestRouter()
        stack.callback(router.close)
        watcher = StatusWatcher(endpoint, show, t0_unix_ms)
        stack.callback(watcher.close)

        def rank_argv(rank: int, rejoin: bool) -> list[str]:
            argv = [
                sys.executable,
                "-m",
                "reference_engine.worker",
                "--cluster",
                cluster,
                "--rank",
                str(rank),
                "--world-size",
                str(opts.ranks),
                "--ranks-per-node",
                str(opts.ranks_per_node),
                "--coordinator",
                endpoint,
                "--etcd",
                etcd_endpoint,
                "--checkpoint",
                str(checkpoint),
                "--frontend",
                f"{router.address[0]}:{router.address[1]}",
                "--frontend-key",
                router.authkey.hex(),
                "--lease-ttl",
                str(opts.lease_ttl_s),
            ]
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

        # Requests arrive over the run: a third now, the rest around the failures.
        batches = _split(requests, 1 + 2 * max(1, len(opts.kills)))
        router.submit(next(batches))
        failures: list[dict[str, Any]] = []
        rejoins: list[dict[str, Any]] = []
        ops_seen = len(status().operations)
        for event in opts.kills:
            router.submit(next(batches, []))
            wait_for(lambda: len(router.ledger.answers) > 0, 60, "the first answers")
            # Taken before the kill: a fast detection must not hide in the baseline.
            failures_before = {(f.rank, f.confirmed_unix_ms) for f in status().failures}
            kill_unix_ms = time.time() * 1000.0
            procs.kill_together([f"rank{rank}" for rank in event])
            show(f"[{(kill_unix_ms - t0_unix_ms) / 1000:7.3f}s] SIGKILL rank(s) {event}")

            def detected(ranks: list[int] = event, before: set[Any] = failures_before) -> bool:
                new = {
                    f.rank for f in status().failures if (f.rank, f.confirmed_unix_ms) not in before
                }
                return set(ranks) <= new

            wait_for(detected, 30, f"the coordinator to detect the failure of {event}")
            for f in status().failures:
                if f.rank in event and (f.rank, f.confirmed_unix_ms) not in failures_before:
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
            for rank in event:
                procs.start(f"rank{rank}", rank_argv(rank, rejoin=True))
            show(f"relaunched rank(s) {event} with --rejoin")

            def rejoined(ranks: list[int] = event, seen: int = ops_seen) -> bool:
                joined = {
                    r
                    for op in list(status().operations)[seen:]
                    if op.kind == "grow" and op.outcome == "completed"
                    for r in op.joined
                }
                return set(ranks) <= joined and PHASE_NAME[status().phase] == "steady"

            wait_for(rejoined, opts.deadline_s, f"ranks {event} to be admitted again")
            for op in list(status().operations)[ops_seen:]:
                if op.kind == "grow" and op.outcome == "completed":
                    rejoins += [{"rank": r, "stall_ms": round(op.stall_ms, 2)} for r in op.joined]
            ops_seen = len(status().operations)
        for rest in batches:
            router.submit(rest)
        if not router.wait_all_answered(opts.deadline_s):
            show(f"requests never answered: {router.unanswered()}")
        final = status()
        answers = dict(router.ledger.answers)
        lost = len(requests) - len(answers)
        match = lost == 0 and all(answers[r.id] == expected[r.id] for r in requests)
        report: dict[str, Any] = {
            "ranks": opts.ranks,
            "failures": failures,
            "rejoins": rejoins,
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
    out.write(
        f"requests: {req['submitted']} submitted, {req['completed']} completed, "
        f"{req['lost']} lost, {req['duplicated']} duplicated ({req['reassigned']} re-routed)\n"
    )
    verdict = "match" if report["outputs_match_reference"] else "DO NOT match"
    out.write(f"outputs {verdict} the single-process reference\n")
    out.write("OK\n" if report_ok(report) else "FAILED\n")
