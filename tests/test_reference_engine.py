"""The reference MoE engine: determinism, rollback, expert transfer, and real
multi-process expert-parallel serving through a rank's death."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from reference_engine.adapter import ReferenceEngineAdapter
from reference_engine.config import ModelConfig
from reference_engine.engine import EPEngine
from reference_engine.model import (
    CheckpointExperts,
    derive_weights,
    expert_weights,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from reference_engine.placement import build_placement
from reference_engine.reference import decode, reference_outputs
from reference_engine.requests import Request, make_requests
from worker_agent.adapter import GroupSpec, StepAborted

REPO = Path(__file__).resolve().parent.parent
CFG = ModelConfig()
WEIGHTS = derive_weights(CFG)


def steps_to_finish(request: Request) -> int:
    """Iterations a request runs: one token each, the prompt included."""
    return len(request.prompt) + request.max_new_tokens - 1


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def store() -> Iterator[dist.TCPStore]:
    master = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30)
    )
    yield master


# --- model and reference ------------------------------------------------------


def test_reference_is_deterministic_and_per_request() -> None:
    requests = make_requests(5, 6)
    first = reference_outputs(WEIGHTS, CFG, requests)
    assert first == reference_outputs(derive_weights(CFG), CFG, requests)
    # Decoding a request alone gives what it gets among others: no cross-talk.
    assert all(decode(WEIGHTS, CFG, r) == first[r.id] for r in requests)
    assert all(len(first[r.id]) == r.max_new_tokens for r in requests)
    assert len({tokens for tokens in first.values()}) > 1


def test_weights_derive_per_expert_and_survive_a_checkpoint(tmp_path: Path) -> None:
    w1, w2 = expert_weights(CFG, 1, 5)
    assert torch.equal(w1, WEIGHTS.layers[1].w1[5]) and torch.equal(w2, WEIGHTS.layers[1].w2[5])
    path = tmp_path / "model.pt"
    save_checkpoint(path, CFG, WEIGHTS)
    cfg, loaded = load_checkpoint(path)
    assert cfg == CFG
    assert fingerprint(cfg, loaded) == fingerprint(CFG, WEIGHTS)
    assert fingerprint(CFG) != fingerprint(ModelConfig(seed=CFG.seed + 1))
    requests = make_requests(3, 3)
    assert reference_outputs(loaded, cfg, requests) == reference_outputs(WEIGHTS, CFG, requests)


def test_reload_fills_changed_slots_from_the_checkpoint_and_retries_exactly(
    tmp_path: Path,
) -> None:
    """A survivor takes over experts that lost every replica: the slots the new
    placement changes get the checkpoint's tensors (read through mmap), the
    others stay; a load that fails half-way leaves the engine's placement
    describing what its slots hold, so a retry loads exactly the rest."""
    path = tmp_path / "model.pt"
    save_checkpoint(path, CFG, WEIGHTS)
    placement = build_placement(4, 1, CFG.n_experts, CFG.replicas, CFG.n_layers)
    engine = EPEngine(CFG, 1, 4, placement, WEIGHTS)
    spr = placement.slots_per_rank
    mine = list(placement.slots_of_rank(1))
    # Every layer gives its first two slots on rank 1 to two other experts.
    layers = []
    for slot_expert in placement.layers:
        slots = list(slot_expert)
        held = {slots[s] for s in mine}
        others = [e for e in range(CFG.n_experts) if e not in held]
        slots[mine[0]], slots[mine[1]] = others[0], others[1]
        layers.append(tuple(slots))
    new = type(placement)(placement.version + 1, spr, tuple(layers))
    checkpoint = CheckpointExperts(path)
    calls: list[tuple[int, int]] = []

    def failing_once(layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((layer, expert))
        if len(calls) == 3:
            raise OSError("disk hiccup")
        return checkpoint(layer, expert)

    with pytest.raises(OSError, match="disk hiccup"):
        engine.reload_experts(new, failing_once)
    assert engine.placement.version == placement.version  # not adopted
    loaded = engine.reload_experts(new, checkpoint)
    assert loaded == 2 * CFG.n_layers - 2  # the two loaded before the failure stay
    assert engine.placement == new
    for layer, slot_expert in enumerate(new.layers):
        for slot in mine:
            w1, w2 = engine.slot_tensors(layer, slot)
            expert = slot_expert[slot]
            assert torch.equal(w1, WEIGHTS.layers[layer].w1[expert])
            assert torch.equal(w2, WEIGHTS.layers[layer].w2[expert])
    assert engine.reload_experts(new, checkpoint) == 0  # idempotent
    with pytest.raises(KeyError, match="no expert 99 of layer 0"):
        checkpoint(0, 99)


# --- two ranks in threads -------------------------------------------------------


def run_ranks(*bodies: Callable[[], None], timeout_s: float = 30.0) -> None:
    errors: list[BaseException] = []

    def guarded(body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(b,), daemon=True) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), "a rank thread hung"
    if errors:
        raise errors[0]


class Pair:
    """Two ranks of one process, each with an engine, an adapter and its answers."""

    def __init__(self, store: dist.TCPStore, *, max_batch: int = 8, joiner: bool = False):
        self.port = store.port
        placement = build_placement(2, 1, CFG.n_experts, CFG.replicas, CFG.n_layers)
        self.answers: list[list[tuple[int, tuple[int, ...]]]] = [[], []]
        self.engines = [
            EPEngine(
                CFG,
                rank,
                2,
                placement,
                WEIGHTS,
                load_experts=not (joiner and rank == 1),
                on_complete=functools.partial(self._record, rank),
                max_batch=max_batch,
            )
            for rank in (0, 1)
        ]
        self.adapters = [ReferenceEngineAdapter(e, CFG) for e in self.engines]

    def _record(self, rank: int, request_id: int, tokens: tuple[int, ...]) -> None:
        self.answers[rank].append((request_id, tokens))

    def start(self, rank: int) -> None:
        spec = GroupSpec(1, "127.0.0.1", self.port, "epoch-1/", (0, 1), 10.0)
        self.adapters[rank].rebuild_groups(spec)
        self.adapters[rank].reset_state(1, 0, (0, 1))

    def outputs(self) -> dict[int, tuple[int, ...]]:
        flat = [answer for answers in self.answers for answer in answers]
        ids = [rid for rid, _ in flat]
        assert len(ids) == len(set(ids)), f"answered twice: {sorted(ids)}"
        return dict(flat)


def test_every_iteration_undone_and_redone_matches_reference(store: dist.TCPStore) -> None:
    """Rolling back each iteration once must neither lose nor repeat an answer:
    releases are one iteration late, and undone admissions go back to the queue."""
    requests = make_requests(11, 6)
    pair = Pair(store, max_batch=2)  # admissions spread over many iterations
    for r in requests:
        pair.engines[r.id % 2].submit(r)
    per_rank = [sum(steps_to_finish(r) for r in requests if r.id % 2 == k) for k in (0, 1)]
    iterations = max(per_rank) + 2

    def body(rank: int) -> Callable[[], None]:
        def run() -> None:
            engine = pair.engines[rank]
            pair.start(rank)
            for _ in range(iterations):
                engine.step()
                engine.rollback_to(engine.iteration - 1)
                engine.step()
            assert not engine.busy()

        return run

    run_ranks(body(0), body(1))
    assert pair.outputs() == reference_outputs(WEIGHTS, CFG, requests)
    engine = pair.engines[0]
    engine.rollback_to(engine.iteration)  # the current one: nothing to do
    with pytest.raises(ValueError, match="only the last completed"):
        engine.rollback_to(engine.iteration - 2)


def test_aborted_step_changes_nothing_and_serving_resumes_on_a_new_epoch(
    store: dist.TCPStore,
) -> None:
    requests = make_requests(13, 8)
    early, late = requests[:4], requests[4:]
    pair = Pair(store)
    for r in early:
        pair.engines[r.id % 2].submit(r)

    def body(rank: int) -> Callable[[], None]:
        def run() -> None:
            engine, adapter = pair.engines[rank], pair.adapters[rank]
            pair.start(rank)
            for _ in range(3):
                engine.step()
            for r in late:  # admitted by the step that fails
                if r.id % 2 == rank:
                    engine.submit(r)
            adapter.abort_collectives(1)
            with pytest.raises(StepAborted):
                engine.step()
            assert engine.iteration == 3
            adapter.rebuild_groups(GroupSpec(2, "127.0.0.1", pair.port, "epoch-2/", (0, 1), 10.0))
            adapter.reset_state(2, 3, (0, 1))
            while engine.iteration < 3 + sum(steps_to_finish(r) for r in requests) + 1:
                engine.step()

        return run

    run_ranks(body(0), body(1))
    assert pair.outputs() == reference_outputs(WEIGHTS, CFG, requests)


@pytest.mark.parametrize("skip_one", [False, True])
def test_joiner_serves_only_with_transferred_experts(store: dist.TCPStore, skip_one: bool) -> None:
    """Rank 1 starts with NaN experts; rank 0 sends its placement metadata and
    the expert weights. A missed transfer must show in the outputs."""
    requests = make_requests(21, 6)
    pair = Pair(store, joiner=True)
    for r in requests:
        pair.engines[r.id % 2].submit(r)
    placement = pair.engines[0].placement
    spr = placement.slots_per_rank
    assert all(
        torch.isnan(t).all()
        for s in placement.slots_of_rank(1)
        for t in pair.adapters[1].expert_tensors(0, s)
    )
    with pytest.raises(ValueError, match="not on rank 1"):
        pair.adapters[1].expert_tensors(0, 0)

    def body(rank: int) -> Callable[[], None]:
        def run() -> None:
            adapter, engine = pair.adapters[rank], pair.engines[rank]
            pair.start(rank)
            group = engine.group
            assert group is not None
            blob = group.broadcast_bytes(adapter.export_metadata() if rank == 0 else b"", 0)
            adapter.apply_metadata(blob, placement)
            # With 2 ranks each holds every expert: slot s on rank 0 is s + spr on rank 1.
            for layer in range(CFG.n_layers):
                for slot in placement.slots_of_rank(0):
                    if skip_one and (layer, slot) == (0, 3):
                        continue
                    tag = (layer * spr + slot) * 2
                    if rank == 0:
                        group.send(adapter.expert_tensors(layer, slot), 1, tag)
                    else:
                        group.recv(adapter.expert_tensors(layer, slot + spr), 0, tag)
            adapter.reset_state(1, 0, (0, 1))
            while engine.iteration < 40:
                engine.step()

        return run

    run_ranks(body(0), body(1))
    expected = reference_outputs(WEIGHTS, CFG, requests)
    if skip_one:
        assert pair.outputs() != expected
    else:
        assert pair.outputs() == expected
        assert json.loads(pair.adapters[1].export_metadata())["placement_version"] == 1


# --- real processes -------------------------------------------------------------


class Cluster:
    """Ranks as subprocesses (tests/ep_worker_proc.py); logs go to files."""

    def __init__(self, store: dist.TCPStore, tmp_path: Path, world: int, count: int, seed: int):
        self.store, self.tmp_path = store, tmp_path
        self.world, self.count, self.seed = world, count, seed
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, rank: int, *extra: str) -> None:
        log = (self.tmp_path / f"rank{rank}.log").open("wb")
        argv = [sys.executable, str(REPO / "tests" / "ep_worker_proc.py")]
        argv += ["--rank", str(rank), "--world-size", str(self.world)]
        argv += ["--port", str(self.store.port), "--requests", str(self.count)]
        argv += ["--seed", str(self.seed), *extra]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.procs[rank] = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=log)

    def answered(self, request_id: int) -> bool:
        return self.store.check([f"answer/{request_id}"])

    def all_answered(self) -> bool:
        for rank, proc in self.procs.items():
            if proc.poll() not in (None, 0, -signal.SIGKILL):
                raise AssertionError(f"rank {rank} exited with {proc.returncode}: {self.logs()}")
        return all(self.answered(i) for i in range(self.count))

    def results(self) -> tuple[dict[int, tuple[int, ...]], dict[int, int]]:
        outputs = {i: tuple(json.loads(self.store.get(f"answer/{i}"))) for i in range(self.count)}
        counts = {i: self.store.add(f"count/{i}", 0) for i in range(self.count)}
        return outputs, counts

    def stop(self) -> None:
        self.store.set("stop", "1")
        for rank, proc in self.procs.items():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"rank {rank} did not stop: {self.logs()}") from None

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- rank {r}\n" + (self.tmp_path / f"rank{r}.log").read_text(errors="replace")[-3000:]
            for r in self.procs
        )


def test_four_processes_match_reference(store: dist.TCPStore, tmp_path: Path) -> None:
    cluster = Cluster(store, tmp_path, world=4, count=12, seed=7)
    try:
        for rank in range(4):
            cluster.start(rank)
        wait_until(cluster.all_answered, 60, "every request answered")
        cluster.stop()
        outputs, counts = cluster.results()
    finally:
        cluster.kill_all()
    assert counts == {i: 1 for i in range(12)}
    assert outputs == reference_outputs(WEIGHTS, CFG, make_requests(7, 12))


def test_rank_killed_mid_iteration_survivors_shrink_and_finish(
    store: dist.TCPStore, tmp_path: Path
) -> None:
    world, count, seed, dead = 4, 12, 7, 1
    requests = make_requests(seed, count)
    own = sorted(steps_to_finish(r) for r in requests if r.id % world == dead)
    # It dies once one of its requests is answered (released an iteration after
    # it finished) and before another one is.
    die_at = own[0] + 1
    assert own[-1] + 1 > die_at, "pick a seed whose dead rank has requests of unequal length"

    cluster = Cluster(store, tmp_path, world, count, seed)
    try:
        for rank in range(world):
            cluster.start(rank, *(["--die-at", str(die_at)] if rank == dead else []))
        wait_until(lambda: cluster.procs[dead].poll() is not None, 60, "rank 1 to kill itself")
        assert cluster.procs[dead].returncode == -signal.SIGKILL, cluster.logs()
        survivors = [r for r in range(world) if r != dead]
        wait_until(lambda: store.check([f"failed/{r}" for r in survivors]), 10, "survivors to fail")
        killed_at = float(store.get("killed_at"))
        failures = {r: json.loads(store.get(f"failed/{r}")) for r in survivors}
        # gloo's timeout is 20 s: only a prompt release passes.
        assert all(f["t"] - killed_at < 3.0 for f in failures.values()), failures
        assert any(f["kind"] == "CollectiveFailed" for f in failures.values()), failures

        orphans = [r.id for r in requests if r.id % world == dead and not cluster.answered(r.id)]
        assert 0 < len(orphans) < len([r for r in requests if r.id % world == dead])
        adopt: dict[str, list[int]] = {}
        for i, request_id in enumerate(orphans):
            adopt.setdefault(str(survivors[i % len(survivors)]), []).append(request_id)
        cut = min(f["iteration"] for f in failures.values())
        store.set("plan", json.dumps({"cut": cut, "members": survivors, "adopt": adopt}))

        wait_until(cluster.all_answered, 60, "every request answered")
        cluster.stop()
        outputs, counts = cluster.results()
    finally:
        cluster.kill_all()
    assert counts == {i: 1 for i in range(count)}
    assert outputs == reference_outputs(WEIGHTS, CFG, requests)
