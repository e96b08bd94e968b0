"""A rank ends when asked, in any state: real etcd, coordinator and reference
engine processes (epctl's local cluster)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from epctl.local_cluster import ClusterSpec, local_cluster, wait_for


def _log(workdir: Path, name: str) -> str:
    return (workdir / f"{name}.log").read_text(errors="replace")


def test_sigterm_ends_a_rank_held_by_a_frozen_coordinator(tmp_path: Path) -> None:
    """The coordinator is frozen and rank 1 dies: the survivors' steps fail and
    they hold, waiting for a rebuild that does not come. SIGTERM must still
    end such a rank, cleanly (exit 0, its lease revoked), within seconds; it
    used to wait in the agent for ever."""
    with local_cluster(ClusterSpec(ranks=4, workdir=tmp_path), show=lambda _: None) as cluster:
        procs = cluster.procs
        procs.signal(["coordinator"], signal.SIGSTOP)
        try:
            cluster.kill_ranks([1])
            wait_for(
                lambda: "step failed" in _log(tmp_path, "rank2"),
                30,
                "rank 2's step to fail on its dead peer",
            )
            rank2 = procs.procs["rank2"]
            assert rank2.poll() is None
            asked = time.monotonic()
            procs.signal(["rank2"], signal.SIGTERM)
            try:
                rc = rank2.wait(timeout=15)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    "a held rank ignored SIGTERM:\n" + _log(tmp_path, "rank2")[-3000:]
                ) from None
            took = time.monotonic() - asked
            assert rc == 0, _log(tmp_path, "rank2")[-3000:]
            assert "stopped on a signal" in _log(tmp_path, "rank2")
            print(f"SIGTERM -> exit of a held rank: {took:.2f} s")
        finally:
            procs.signal(["coordinator"], signal.SIGCONT)
