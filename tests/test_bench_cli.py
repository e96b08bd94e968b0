"""`epctl bench`: the report's shape and a bad name's exit code.

These run the quick benchmarks for real and check that every figure is a
positive number; how large the figures are is for BENCHMARKS.md, not for tests
that share a machine with other work.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _epctl(
    tmp_path: Path, *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # Its own TMPDIR: whatever the bench writes stays under the test's tmp_path.
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "epctl.cli", *args],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _report(result: subprocess.CompletedProcess[str], name: str) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["bench"] == name
    machine = report["machine"]
    assert machine["cores"] >= 1
    assert isinstance(machine["python"], str)
    assert isinstance(machine["torch"], str)
    assert report["results"], "no records"
    for record in report["results"]:
        assert all(not isinstance(v, dict | list) for v in record.values()), "records are flat"
    return report


def _positive(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def test_hook_quick_json(tmp_path: Path) -> None:
    report = _report(_epctl(tmp_path, "bench", "hook", "--quick", "--json"), "hook")
    methods = {r["method"]: r for r in report["results"]}
    assert {"agent_hook_idle", "tensor_item", "allreduce_gloo_2proc"} <= set(methods)
    for record in methods.values():
        for key in ("ns_per_call_p50", "ns_per_call_mean", "calls_per_batch", "batches"):
            assert _positive(record[key]), (record["method"], key, record[key])


def test_resync_quick_json(tmp_path: Path) -> None:
    report = _report(_epctl(tmp_path, "bench", "resync", "--quick", "--json"), "resync")
    seen = {(r["method"], r["size_bytes"]) for r in report["results"]}
    for size in (1 << 20, 64 << 20):
        assert ("execute_resync", size) in seen
        assert ("tcp_socket", size) in seen
    for record in report["results"]:
        for key in ("bytes_per_s_p50", "bytes_per_s_max", "of_bound_p50", "repeats"):
            assert _positive(record[key]), (record["method"], key, record[key])


@pytest.mark.parametrize("name", ["nope", "HOOK"])
def test_bad_name_exits_2_naming_the_valid_ones(tmp_path: Path, name: str) -> None:
    result = _epctl(tmp_path, "bench", name, timeout=60)
    assert result.returncode == 2
    for valid in ("hook", "detect", "resync", "stall", "fanout"):
        assert valid in result.stderr


def test_stall_small_plan_reports_every_system(tmp_path: Path) -> None:
    # `bench stall --quick` forms 8-rank clusters (minutes on a small machine);
    # `python -m bench.stall` runs the same code on 2 ranks and 1 MiB.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "bench.stall"],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp)},
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert result.returncode == 0, result.stderr
    records: list[dict[str, Any]] = json.loads(result.stdout.strip().splitlines()[-1])["results"]
    systems = {r["system"]: r for r in records}
    assert set(systems) == {"ep-recovery", "seed-style", "full-restart", "floor"}
    for record in records:
        assert (record["ranks"], record["expert_mb"], record["trials"]) == (2, 1, 1)
        assert all(not isinstance(v, dict | list) for v in record.values()), "records are flat"
        for key in ("stall_ms", "of_floor"):
            assert _positive(record[key]), (record["system"], key, record[key])
    assert systems["floor"]["of_floor"] == 1.0
    assert _positive(systems["ep-recovery"]["survivor_median_ms"])


# The smallest fanout: 16 simulated ranks in one process, one admission.
TINY_FANOUT = {
    "EP_BENCH_FANOUT_RANKS": "16",
    "EP_BENCH_FANOUT_PROGRESS_MS": "100",
    "EP_BENCH_FANOUT_ADMISSIONS": "1",
    "EP_BENCH_FANOUT_CPU_WINDOW_S": "2",
}


def test_fanout_tiny_end_to_end_json(tmp_path: Path) -> None:
    result = _epctl(tmp_path, "bench", "fanout", "--json", timeout=240, env=TINY_FANOUT)
    report = _report(result, "fanout")
    assert isinstance(report["machine"]["ram_total_bytes"], int)
    (record,) = report["results"]
    assert "error" not in record, record["error"]
    assert (record["ranks"], record["admissions"], record["progress_interval_ms"]) == (16, 1, 100)
    assert record["admissions_done"] == 1
    for key in (
        "form_s",
        "cpu_window_s",
        "progress_reports_per_s",
        "pause_to_all_acks_p50_ms",
        "pause_to_all_acks_p99_ms",
        "hold_ack_per_rank_p50_ms",
        "hold_ack_per_rank_p99_ms",
        "hold_delivery_p50_ms",
        "rebuild_all_acks_p50_ms",
        "resync_all_acks_p50_ms",
        "resume_all_acks_p50_ms",
        "stall_p50_ms",
        "shrink_p50_ms",
        "grow_p50_ms",
        "lease_ttl_s",
    ):
        assert _positive(record[key]), (key, record[key])
    # CPU shares may round to 0 in a short window on an idle process.
    for key in ("coordinator_cpu_pct", "rank_hosts_cpu_pct", "etcd_cpu_pct"):
        assert isinstance(record[key], float) and record[key] >= 0, (key, record[key])
    assert record["pause_to_all_acks_p99_ms"] >= record["pause_to_all_acks_p50_ms"]
    assert record["hold_ack_per_rank_p99_ms"] >= record["hold_ack_per_rank_p50_ms"]
    # The pause holds every survivor's hold span, and each span its delivery.
    assert record["pause_to_all_acks_max_ms"] >= record["hold_ack_per_rank_p99_ms"]
    assert record["hold_ack_per_rank_p99_ms"] >= record["hold_delivery_p50_ms"]
    # Only the victim failed, and the harness kept every lease.
    assert (record["unexpected_failures"], record["leases_lost"], record["rollbacks"]) == (0, 0, 0)
    assert any("WITHOUT building gloo groups" in note for note in report["notes"])


@pytest.mark.parametrize(
    ("variable", "value"),
    [("EP_BENCH_FANOUT_RANKS", "15"), ("EP_BENCH_FANOUT_ADMISSIONS", "many")],
)
def test_fanout_bad_setting_exits_1_naming_it(tmp_path: Path, variable: str, value: str) -> None:
    result = _epctl(tmp_path, "bench", "fanout", "--quick", timeout=60, env={variable: value})
    assert result.returncode == 1
    assert variable in result.stderr
