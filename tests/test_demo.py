"""`epctl demo` end to end: real etcd, coordinator and rank processes, as a user
runs it; no process or file may outlive a run (tests/epctl_runs.py)."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.state_machine import DEFAULT_DEADLINES_S, Phase
from tests.epctl_runs import epctl_env, last_json, pids_mentioning, run_epctl

GROW_PHASES = ["admitting", "rebuilding", "pausing", "resyncing", "resuming"]


def _run_demo(tmp_path: Path, *args: str, timeout: float = 240) -> tuple[int, str, str]:
    return run_epctl(tmp_path, "demo", *args, timeout=timeout)


def _check_served_everything(report: dict[str, Any], ranks: int) -> None:
    req = report["requests"]
    assert req["submitted"] > 0
    assert req["completed"] == req["submitted"]
    assert req["lost"] == 0
    assert req["duplicated"] == 0
    assert report["outputs_match_reference"] is True
    assert report["ranks"] == ranks
    assert report["final_members"] == list(range(ranks))


def _grow_sequences(timeline: list[dict[str, Any]]) -> int:
    """How many times the timeline runs through the whole admission, in order."""
    phases = [span["phase"] for span in timeline]
    n = len(GROW_PHASES)
    return sum(phases[i : i + n] == GROW_PHASES for i in range(len(phases)))


def test_kill_one_rank_and_rejoin_it_json_contract(tmp_path: Path) -> None:
    rc, out, err = _run_demo(tmp_path, "--json")
    assert rc == 0, err[-3000:]
    report = last_json(out)
    _check_served_everything(report, 4)
    assert report["unplanned_exits"] == []  # the demo killed rank 1; nothing else ended

    assert [f["rank"] for f in report["failures"]] == [1]
    assert report["failures"][0]["detect_ms"] > 0
    assert [r["rank"] for r in report["rejoins"]] == [1]
    assert report["rejoins"][0]["stall_ms"] > 0
    # form (1), shrink (2), grow (3): the epoch moved once per membership change
    assert report["final_epoch"] == 3

    timeline = report["timeline"]
    assert timeline[0]["phase"] == "steady"
    assert timeline[-1]["phase"] == "steady" and timeline[-1]["end_ms"] is None
    assert "degraded" in [s["phase"] for s in timeline]
    assert _grow_sequences(timeline) == 1
    for before, after in itertools.pairwise(timeline):
        assert before["end_ms"] == after["start_ms"], "timeline spans must tile"
        assert before["start_ms"] <= before["end_ms"]


def test_kill_rank_0_then_a_whole_node(tmp_path: Path) -> None:
    rc, out, err = _run_demo(
        tmp_path, "--json", "--ranks-per-node", "2", "--kill", "0", "--kill", "2,3"
    )
    assert rc == 0, err[-3000:]
    report = last_json(out)
    _check_served_everything(report, 4)
    assert sorted(f["rank"] for f in report["failures"]) == [0, 2, 3]
    # one admission per rank, each listed once
    assert sorted(r["rank"] for r in report["rejoins"]) == [0, 2, 3]
    assert _grow_sequences(report["timeline"]) == 3


def test_a_total_loss_forms_again_without_an_operator(tmp_path: Path) -> None:
    """Every rank SIGKILLed at once; the supervisor relaunches them all with
    --rejoin (as systemd or Kubernetes would): they form the cluster again from
    the checkpoint, in a later epoch, and every request is answered once."""
    rc, out, err = _run_demo(tmp_path, "--json", "--kill", "0,1,2,3")
    assert out.strip(), err[-3000:]
    report = last_json(out)
    assert rc == 0, f"{err[-3000:]}\n{report}"
    _check_served_everything(report, 4)
    assert report["unplanned_exits"] == []
    assert sorted(f["rank"] for f in report["failures"]) == [0, 1, 2, 3]
    assert report["requests"]["reassigned"] > 0  # in flight at the loss, served after it
    phases = [s["phase"] for s in report["timeline"]]
    assert "forming" in phases[1:] and phases[-1] == "steady"  # formed again
    assert report["final_epoch"] > 2


def test_experts_that_lose_every_replica_are_reloaded_and_serving_goes_on(
    tmp_path: Path,
) -> None:
    """Ranks 0 and 2 hold the only replicas of some experts: the survivors load
    those from the checkpoint into spare slots and serve every request with
    the reference's tokens; both ranks then rejoin."""
    rc, out, err = _run_demo(tmp_path, "--json", "--kill", "0,2", "--workdir", str(tmp_path / "w"))
    assert out.strip(), err[-3000:]
    report = last_json(out)
    assert rc == 0, f"{err[-3000:]}\n{report}"
    _check_served_everything(report, 4)
    assert report["unplanned_exits"] == []
    assert sorted(r["rank"] for r in report["rejoins"]) == [0, 2]
    reloaded = [
        line
        for rank in (1, 3)
        for line in (tmp_path / "w" / f"rank{rank}.log").read_text().splitlines()
        if "experts reloaded from the checkpoint" in line
    ]
    assert len(reloaded) == 2 and all("slots=0" not in line for line in reloaded)


def test_human_report_shows_phases_and_verdict(tmp_path: Path) -> None:
    rc, out, err = _run_demo(tmp_path, "--kill", "3", "--requests", "16")
    assert rc == 0, err[-3000:]
    assert "phase pausing" in out and "phase degraded" in out
    assert "outputs match the single-process reference" in out
    assert out.rstrip().endswith("OK")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kill", "9"], "rank 9 is outside the cluster"),
        (["--kill", "0,1,2"], "no survivor slot can be spared"),
        (["--kill", "1,x"], "--kill takes ranks like"),
        (["--ranks", "1"], "--ranks must be at least 2"),
        (["--ranks-per-node", "3"], "must divide --ranks 4"),
        (["--fault", "rank:7@pausing"], "rank 7 is outside the cluster (0..3)"),
        (["--fault", "joiner@pausin"], "unknown phase 'pausin'"),
        (["--fault", "node:1@pausing"], "unknown target 'node:1'"),
        (["--fault", "rank:2"], "expected [stop:]WHO@PHASE"),
        (["--fault", "stop:etcd@pausing"], "stop: applies to rank:N, joiner and coordinator"),
        (["--fault", "etcd@degraded", "--fault-hold", "-1"], "must be 0 or more seconds"),
        (["--fault-hold", "5"], "--fault-hold needs a --fault"),
        (
            ["--fault", "rank:2@pausing", "--fault-hold", "5"],
            "--fault-hold applies to stop: faults and to etcd; rank:2@pausing is a SIGKILL",
        ),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem_and_start_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    rc, out, err = _run_demo(tmp_path, *args, timeout=60)
    assert rc == 2
    assert message in err
    assert out == ""


def test_ctrl_c_stops_everything_it_started(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "epctl.cli", "demo"],
        env=epctl_env(tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        seen = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("cluster formed"):
                break
        assert seen and seen[-1].startswith("cluster formed"), "".join(seen)
        assert pids_mentioning(tmp), "the running demo should own processes under its TMPDIR"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    assert "interrupted" in err
    assert pids_mentioning(tmp) == []
    assert list(tmp.iterdir()) == []


def test_list_phases_prints_the_timeline_names_in_order(tmp_path: Path) -> None:
    rc, out, err = _run_demo(tmp_path, "--list-phases", timeout=60)
    assert rc == 0, err
    phases = out.split()
    assert phases[:2] == ["forming", "steady"] and phases[-5:] == GROW_PHASES
    assert len(phases) == len(set(phases)) == 10


# The CI part of the fault matrix: one cell per target, each in a phase of the
# admission that follows the demo's kill of rank 1 (the full WHO x PHASE matrix
# runs with `pytest -m matrix`; see docs/faults.md).
FAULT_CELLS = [
    ("rank:2@pausing", {"rolled_back"}, [1, 2]),
    ("stop:joiner@resyncing", {"rolled_back"}, [1]),
    ("coordinator@rebuilding", {"failed_over"}, [1]),
    ("etcd@admitting", {"completed", "rolled_back"}, [1]),
]


def _check_fault_cell(
    tmp_path: Path, fault: str, resolutions: set[str], rejoined: list[int]
) -> None:
    rc, out, err = _run_demo(tmp_path, "--json", "--requests", "24", "--fault", fault, timeout=600)
    assert out.strip(), err[-3000:]
    report = last_json(out)
    assert rc == 0, f"{err[-3000:]}\n{report}"
    _check_served_everything(report, 4)
    [injected] = report["faults"]
    assert injected["fault"] == fault and injected["fired"] is True
    assert injected["phase_at_fire"] == fault.rpartition("@")[2]
    assert injected["resolution"] in resolutions, injected
    if injected["fault"].startswith("coordinator@"):
        # The new leader ends the admission it took over within one leader
        # lease (the demo's is 2 s) plus that phase's deadline.
        assert injected["op_outcome"] in ("completed", "rolled_back"), injected
        limit_s = DEFAULT_DEADLINES_S[Phase(injected["phase_at_fire"])]
        if limit_s is not None:
            assert injected["resolved_ms"] <= (2 + limit_s) * 1000, injected
    # Completed admissions only, one entry per rank.
    assert [r["rank"] for r in report["rejoins"]] == rejoined


@pytest.mark.timeout(660)
@pytest.mark.parametrize(("fault", "resolutions", "rejoined"), FAULT_CELLS)
def test_a_fault_in_an_admission_converges(
    tmp_path: Path, fault: str, resolutions: set[str], rejoined: list[int]
) -> None:
    _check_fault_cell(tmp_path, fault, resolutions, rejoined)


MATRIX = [
    (f"{stop}{who}@{phase}", who)
    for who in ("rank:2", "joiner", "coordinator", "etcd")
    for phase in GROW_PHASES
    for stop in ("", "stop:")
    if not (stop and who == "etcd")
    and (not stop or phase in ("pausing", "resyncing"))
    and not (stop and who == "coordinator")
]


# Control-plane faults held long past every lease (docs/faults.md, "Do no
# harm"): serving never stops and nothing exits but, at most, a frozen leader.
HELD_CELLS = [
    (["--kill", "1", "--fault", "etcd@degraded", "--fault-hold", "15"], [1], set()),
    (
        ["--kill", "3", "--fault", "stop:coordinator@halting", "--fault-hold", "15"],
        [3],
        {"coordinator"},
    ),
]


@pytest.mark.matrix
@pytest.mark.timeout(660)
@pytest.mark.parametrize(("args", "rejoined", "may_exit"), HELD_CELLS)
def test_held_control_plane_faults_stop_no_serving(
    tmp_path: Path, args: list[str], rejoined: list[int], may_exit: set[str]
) -> None:
    rc, out, err = _run_demo(tmp_path, "--json", *args, timeout=600)
    assert out.strip(), err[-3000:]
    report = last_json(out)
    assert rc == 0, f"{err[-3000:]}\n{report}"
    _check_served_everything(report, 4)
    assert [r["rank"] for r in report["rejoins"]] == rejoined
    assert {x["who"] for x in report["unplanned_exits"]} <= may_exit, report["unplanned_exits"]
    [injected] = report["faults"]
    assert injected["fired"] is True and injected["resolution"], injected


@pytest.mark.matrix
@pytest.mark.timeout(660)
@pytest.mark.parametrize(("fault", "who"), MATRIX)
def test_fault_matrix(tmp_path: Path, fault: str, who: str) -> None:
    resolutions = {
        "coordinator": {"failed_over"},
        "etcd": {"completed", "rolled_back"},
    }.get(who, {"completed", "rolled_back"})
    rejoined = [1, 2] if who == "rank:2" else [1]
    _check_fault_cell(tmp_path, fault, resolutions, rejoined)
