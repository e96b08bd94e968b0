"""`epctl soak`: its schedule of faults (pure, property-tested) and a short run
end to end with real etcd, coordinators and rank processes."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from epctl.faults import parse_fault
from epctl.local_cluster import expert_lost_with, unservable_loss
from epctl.soak import ADMISSION_PHASES, STOP_PHASES, plan_cycle
from tests.epctl_runs import last_json, run_epctl


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(4, 1), (8, 2), (8, 1), (2, 1)]))
def test_a_cycle_never_plans_the_loss_of_an_experts_last_replica(
    seed: int, shape: tuple[int, int]
) -> None:
    ranks, per_node = shape
    rng = random.Random(seed)
    for _ in range(5):
        plan = plan_cycle(rng, ranks, per_node, seed)
        first, then = plan.first, plan.then
        # Each is a fault `epctl demo --fault` would take as written.
        # (Its hold, if any, is `epctl demo --fault-hold`'s.)
        assert parse_fault(str(first), ranks) == replace(first, hold_s=None)
        assert first.phase == "steady"
        lost = {first.rank} if first.rank is not None else set()
        if then is None:
            continue
        assert first.target == "rank", "only a rank's admission follows"
        assert parse_fault(str(then), ranks) == then and then.phase in ADMISSION_PHASES
        assert not then.stop or then.phase in STOP_PHASES
        if then.rank is not None:
            assert then.rank not in lost
            lost.add(then.rank)
        # Both may take every replica of an expert, never more than the
        # survivors can reload.
        assert unservable_loss(ranks, per_node, seed, lost) is None


def test_the_seed_fixes_the_schedule() -> None:
    def schedule(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [str(plan_cycle(rng, 4, 1, seed)) for _ in range(20)]

    assert schedule(5) == schedule(5)
    assert schedule(5) != schedule(6)


def test_the_schedule_covers_every_kind_of_fault() -> None:
    rng = random.Random(0)
    plans = [plan_cycle(rng, 4, 1, 0) for _ in range(200)]
    firsts = {(p.first.target, p.first.stop) for p in plans}
    assert firsts == {
        ("rank", False),
        ("rank", True),
        ("coordinator", False),
        ("coordinator", True),
        ("etcd", False),
    }
    held = [p.first for p in plans if p.first.target == "etcd" or p.first.target == "coordinator"]
    assert all((f.hold_s is not None) == (f.stop or f.target == "etcd") for f in held)
    assert any(
        p.then is not None
        and p.then.rank is not None
        and expert_lost_with(4, 1, 0, {p.first.rank or 0, p.then.rank}) is not None
        for p in plans
    ), "no cycle takes every replica of an expert"
    thens = [p.then for p in plans if p.then is not None]
    assert {t.target for t in thens} == {"rank", "joiner", "coordinator"}
    assert {t.phase for t in thens} == set(ADMISSION_PHASES)
    assert any(t.stop for t in thens)


def test_a_short_soak_converges_every_cycle_and_serves_every_request(tmp_path: Path) -> None:
    # Seed 30's first cycles: SIGKILL rank 2, then rank 0 as the admission
    # resumes (together they held every replica of some experts: the survivors
    # reload them), then etcd down for 3.4 s (everyone serves on).
    rc, out, err = run_epctl(
        tmp_path, "soak", "--minutes", "10", "--cycles", "2", "--seed", "30", "--json", timeout=500
    )
    report = last_json(out)
    assert rc == 0, f"{err[-3000:]}\n{report}"
    assert report["error"] is None and report["cycles"] == 2
    faults = [(f["fault"], f["fired"]) for f in report["faults"]]
    assert faults == [
        ("rank:2@steady", True),
        ("rank:0@resuming", True),
        ("etcd@steady", True),
    ]
    kill, second, outage = (f["resolution"] for f in report["faults"])
    assert kill == "completed"  # the shrink
    assert second in ("completed", "rolled_back")
    assert outage == "ridden_out"
    req = report["requests"]
    assert req["submitted"] == req["completed"] == 16
    assert req["lost"] == req["duplicated"] == 0
    assert report["outputs_match_reference"] is True
    assert [f["rank"] for f in report["failures"]] == [2]
    assert report["rejoins"] >= 2 and report["stall_ms"]["max"] > 0
    assert report["final_members"] == [0, 1, 2, 3]


def test_bad_arguments_exit_2_naming_the_problem(tmp_path: Path) -> None:
    rc, out, err = run_epctl(tmp_path, "soak", "--minutes", "1", "--ranks", "1", timeout=60)
    assert (rc, out) == (2, "") and "--ranks must be at least 2" in err
