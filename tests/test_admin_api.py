"""Admin calls end to end: epctl -> gRPC -> the coordinator process -> the
state machine, with real etcd and real agents."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.agent_harness import ThreadRank, thread_cluster, wait_until
from worker_agent.agent import WorkerAgent

WORLD = 4


def epctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epctl.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_abort_an_admission_and_switch_automatic_rejoin(
    tmp_path: Path, etcd: str, cluster_name: str, free_port: int
) -> None:
    with thread_cluster(tmp_path, etcd, cluster_name, WORLD) as (coord, ranks):
        at = ("--endpoint", coord.endpoint)
        ranks.pop(3).stop()
        wait_until(lambda: coord.phase() == "degraded", 30, "the cluster to shrink without 3")
        # A joiner that registers but never gets ready (its engine never reaches
        # a boundary): the admission waits in `admitting`.
        joiner_rank = ThreadRank(3, WORLD, coord.endpoint, etcd, cluster_name, rejoin=True)
        joiner: WorkerAgent = joiner_rank.agent
        joiner.start()
        try:
            wait_until(lambda: coord.phase() == "admitting", 30, "the admission to start")
            op_id = coord.status().operation.op_id

            off = epctl("auto-rejoin", "off", "--request-id", "t-off", *at)
            assert (off.returncode, off.stdout.strip()) == (0, "automatic rejoin is off")

            first = epctl(
                "abort", op_id, "--reason", "test", "--request-id", "t-abort", "-o", "json", *at
            )
            assert first.returncode == 0, first.stderr
            assert json.loads(first.stdout) == {
                "request_id": "t-abort",
                "message": f"operation {op_id!r} rolled back",
                "replayed": False,
                "op_id": op_id,
            }
            wait_until(lambda: coord.phase() == "degraded", 30, "the rollback to finish")
            ended = [op for op in coord.status().operations if op.op_id == op_id]
            assert [(op.outcome, op.reason) for op in ended] == [
                ("rolled_back", "aborted by an operator: test")
            ]
            # A retried call (same request id) gets the same answer and changes nothing.
            before = coord.status()
            again = epctl(
                "abort", op_id, "--reason", "test", "--request-id", "t-abort", "-o", "json", *at
            )
            assert again.returncode == 0 and json.loads(again.stdout)["replayed"] is True
            after = coord.status()
            assert (after.epoch, list(after.members), len(after.operations)) == (
                before.epoch,
                list(before.members),
                len(before.operations),
            )
            # The joiner stays out while automatic rejoin is off.
            assert 3 not in after.members and coord.phase() == "degraded"

            gone = epctl("abort", op_id, *at)
            assert gone.returncode == 4 and "not in flight" in gone.stderr
            reused = epctl("auto-rejoin", "on", "--request-id", "t-abort", *at)
            assert reused.returncode == 2 and "already used" in reused.stderr
            empty = epctl("abort", "", *at)
            assert empty.returncode == 2 and "op_id is empty" in empty.stderr

            on = epctl("auto-rejoin", "on", *at)
            assert on.returncode == 0, on.stderr
            wait_until(lambda: coord.phase() == "admitting", 30, "the admission to start again")
        finally:
            joiner.stop()
        unreachable = epctl("auto-rejoin", "on", "--endpoint", f"127.0.0.1:{free_port}")
        assert unreachable.returncode == 3 and "UNAVAILABLE" in unreachable.stderr
