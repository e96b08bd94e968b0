"""`epctl bench detect`: from a signal to a rank to the coordinator's verdict.

A real cluster on this machine: a throwaway etcd, the coordinator daemon and
2 ranks of the reference engine (`python -m reference_engine.worker`), idle
but in lockstep (each iteration runs the all-to-all of token counts). Once the
cluster is steady, one rank gets
- SIGKILL: its sockets close, so the coordinator's session breaks and the
  survivor's collective fails;
- SIGSTOP: nothing closes; only its etcd lease, no longer kept alive, can
  expire.

The figure is the coordinator's own `confirmed_unix_ms` (and
`suspected_unix_ms`) from GetStatus minus the wall time just before the
signal; both clocks are this machine's. A failure not confirmed within the
lease TTL + 5 s is reported as `detected: false` instead of waiting on. After
each trial the victim is killed and relaunched with --rejoin, and the next
trial starts once the cluster is steady again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import grpc

from bench.common import BenchError, BenchResult, Record, progress
from epctl.local_etcd import LocalEtcd
from protos.ep_recovery.v1 import admin_pb2, admin_pb2_grpc, common_pb2

RANKS = 2
LEASE_TTL_S = 1
CLUSTER = "bench-detect"
GRACE_S = 5.0  # past the lease TTL, before a failure counts as undetected
FORM_TIMEOUT_S = 180.0  # rank processes import torch; slow on a loaded 2-core machine

PHASE_NAME = {v: k.removeprefix("PHASE_").lower() for k, v in common_pb2.Phase.items()}


def run(quick: bool, log: TextIO | None = None) -> BenchResult:
    # Each trial is (signal, victim); a full run alternates the victim, so both
    # ranks take both signals (rank 0 is not special).
    rounds = 1 if quick else 5
    pairs = [(sig, 1 - k % 2) for k in range(rounds) for sig in (signal.SIGKILL, signal.SIGSTOP)]
    result = BenchResult()
    with (
        tempfile.TemporaryDirectory(prefix="ep-bench-detect-") as tmp,
        _Cluster(Path(tmp), log) as cluster,
    ):
        cluster.form()
        for trial, (sig, victim) in enumerate(pairs):
            record = cluster.trial(trial, sig, victim)
            result.results.append(record)
            shown = f"{record['detect_ms']} ms" if record["detected"] else "not detected"
            progress(log, f"detect: trial {trial} {sig.name} rank {victim}: {shown}")
            if trial + 1 < len(pairs):
                cluster.rejoin(victim)
    result.notes += [
        f"{RANKS} reference-engine ranks, idle (the all-to-all of counts every iteration, "
        f"2 ms sleep between), lease TTL {LEASE_TTL_S} s, etcd with 50 ms heartbeats",
        "detect_ms: coordinator's confirmed_unix_ms - wall time before the signal; "
        "suspect_ms: its suspected_unix_ms (the session broke), '-' when never suspected",
        f"detected false: not confirmed within lease TTL + {GRACE_S:.0f} s",
        "each trial after the first runs on a cluster that has just re-admitted the victim",
    ]
    return result


class _Cluster:
    """etcd, the coordinator and the ranks; every process stopped by pid on exit."""

    def __init__(self, workdir: Path, log: TextIO | None) -> None:
        self.workdir = workdir
        self.log = log
        self.etcd = LocalEtcd(name="bench-detect")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.endpoint = ""
        self._channel: grpc.Channel | None = None
        self._stub: admin_pb2_grpc.AdminServiceStub | None = None

    def __enter__(self) -> _Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
                # A stopped process dies of SIGKILL too; SIGCONT is for certainty.
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
            proc.wait()
        self.etcd.stop()

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("ab") as logfile:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the bench, which stops them
            )
        self.procs[name] = proc
        return proc

    def _log_tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / f"{name}.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def form(self) -> None:
        progress(self.log, "detect: starting etcd, the coordinator and the ranks")
        self.etcd.start()
        ready = self.workdir / "coordinator.json"
        coordinator = self._start(
            "coordinator",
            [
                sys.executable, "-m", "coordinator",
                "--cluster", CLUSTER, "--world-size", str(RANKS),
                "--listen", "127.0.0.1:0", "--etcd", self.etcd.endpoint,
                "--ready-file", str(ready),
            ],
        )  # fmt: skip
        self._wait(lambda: ready.exists() or coordinator.poll() is not None, 60, "the coordinator")
        if coordinator.poll() is not None:
            raise BenchError(f"coordinator exited:\n{self._log_tail('coordinator')}")
        self.endpoint = f"127.0.0.1:{json.loads(ready.read_text())['listen_port']}"
        self._channel = grpc.insecure_channel(self.endpoint)
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)
        for rank in range(RANKS):
            self._start_rank(rank, rejoin=False)
        self._wait(lambda: self._phase() == "steady", FORM_TIMEOUT_S, "the cluster to form")

    def _start_rank(self, rank: int, rejoin: bool) -> None:
        argv = [
            sys.executable, "-m", "reference_engine.worker",
            "--cluster", CLUSTER, "--rank", str(rank), "--world-size", str(RANKS),
            "--coordinator", self.endpoint, "--etcd", self.etcd.endpoint,
            "--lease-ttl", str(LEASE_TTL_S),
        ]  # fmt: skip
        self._start(f"rank{rank}", [*argv, "--rejoin"] if rejoin else argv)

    def _status(self) -> admin_pb2.ClusterStatus | None:
        assert self._stub is not None
        try:
            status: admin_pb2.ClusterStatus = self._stub.GetStatus(
                admin_pb2.GetStatusRequest(), timeout=2
            )
        except grpc.RpcError:
            return None
        return status

    def _phase(self) -> str:
        status = self._status()
        return "" if status is None else PHASE_NAME[status.phase]

    def _wait(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {name}.log\n{self._log_tail(name)}" for name in self.procs)
                raise BenchError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")
            time.sleep(0.02)

    def trial(self, trial: int, sig: signal.Signals, victim: int) -> Record:
        status = self._status()
        if status is None:
            raise BenchError("the coordinator stopped answering GetStatus")
        before = {(f.rank, f.confirmed_unix_ms) for f in status.failures}
        proc = self.procs[f"rank{victim}"]
        sent_unix_ms = time.time() * 1000.0
        os.kill(proc.pid, sig)
        deadline = time.monotonic() + LEASE_TTL_S + GRACE_S
        found: admin_pb2.FailureRecord | None = None
        while found is None and time.monotonic() < deadline:
            time.sleep(0.01)
            status = self._status()
            if status is not None:
                found = next(
                    (
                        f
                        for f in status.failures
                        if f.rank == victim and (f.rank, f.confirmed_unix_ms) not in before
                    ),
                    None,
                )
        # Whatever the outcome, the victim goes: the next trial re-admits a fresh one.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        proc.wait()
        record: Record = {
            "trial": trial,
            "signal": sig.name,
            "rank": victim,
            "ranks": RANKS,
            "lease_ttl_s": LEASE_TTL_S,
            "detected": found is not None,
            "detect_ms": None,
            "suspect_ms": None,
            "reason": None,
        }
        if found is not None:
            record["detect_ms"] = round(found.confirmed_unix_ms - sent_unix_ms, 1)
            if found.suspected_unix_ms:
                record["suspect_ms"] = round(found.suspected_unix_ms - sent_unix_ms, 1)
            record["reason"] = found.reason
        return record

    def rejoin(self, rank: int) -> None:
        # A joiner is admitted into a running cluster: wait for the shrink first.
        self._wait(lambda: self._removed(rank), 60, f"rank {rank} to be removed")
        status = self._status()
        seen = {op.op_id for op in status.operations} if status is not None else set()
        self._start_rank(rank, rejoin=True)

        def admitted() -> bool:
            s = self._status()
            return (
                s is not None
                and PHASE_NAME[s.phase] == "steady"
                and any(
                    op.kind == "grow" and op.outcome == "completed" and rank in op.joined
                    for op in s.operations
                    if op.op_id not in seen
                )
            )

        self._wait(admitted, FORM_TIMEOUT_S, f"rank {rank} to be admitted again")

    def _removed(self, rank: int) -> bool:
        s = self._status()
        return s is not None and rank not in s.members and PHASE_NAME[s.phase] == "degraded"
