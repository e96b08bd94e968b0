"""The GPU paths of the reference engine and of the agent's groups (issue 6).

What runs on this CPU machine runs here and can fail: the fixed-shape
("static") step that CUDA captures in a graph, run eagerly over gloo, must
give the single-process reference's tokens (also when every iteration is
undone and redone, after an abort, and on a joiner whose experts came through
the staging path); backend selection; the staging logic itself.

Tests marked with `needs_cuda` / `needs_two_gpus` need a CUDA device (two,
for the NCCL pair with a dead peer) and SKIP, saying so, on a machine without
one, such as CI. They were run on the lent GPU machine: docs/gpu.md records
the command and the output.

This file is also the subprocess of the two-GPU test:
`python tests/test_gpu_paths.py --rank R --port P ...`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script (the two-GPU test's ranks)
    sys.path.insert(0, str(REPO))

from coordinator.plan import transfer_plan  # noqa: E402
from reference_engine.adapter import ReferenceEngineAdapter  # noqa: E402
from reference_engine.config import ModelConfig  # noqa: E402
from reference_engine.engine import EPEngine  # noqa: E402
from reference_engine.ep import AbortSignal  # noqa: E402
from reference_engine.model import derive_weights  # noqa: E402
from reference_engine.placement import build_placement  # noqa: E402
from reference_engine.reference import reference_outputs  # noqa: E402
from reference_engine.requests import Request, make_requests  # noqa: E402
from reference_engine.staging import ExpertStore  # noqa: E402
from reference_engine.worker import resolve_device  # noqa: E402
from worker_agent.adapter import GroupSpec, StepAborted  # noqa: E402
from worker_agent.groups import (  # noqa: E402
    GLOO,
    NCCL,
    abort_group,
    backend_for_device,
    build_gloo_group,
    build_group,
    is_nccl,
)
from worker_agent.resync import execute_resync  # noqa: E402

CFG = ModelConfig()
WEIGHTS = derive_weights(CFG)
HOST = "127.0.0.1"

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="needs a CUDA device (none here); run on the lent GPU, see docs/gpu.md"
)
needs_two_gpus = pytest.mark.skipif(
    not CUDA or torch.cuda.device_count() < 2,
    reason="needs two CUDA devices (an NCCL pair); run on the lent 2-GPU machine, see docs/gpu.md",
)


def steps_to_finish(request: Request) -> int:
    return len(request.prompt) + request.max_new_tokens - 1


@pytest.fixture
def store() -> Iterator[dist.TCPStore]:
    yield dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False, timeout=timedelta(30))


def run_ranks(*bodies: Callable[[], None], timeout_s: float = 60.0) -> None:
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


# --- backend selection and groups ------------------------------------------------


def test_backend_follows_the_device() -> None:
    assert backend_for_device("cpu") == GLOO
    assert backend_for_device("cuda") == NCCL
    assert backend_for_device(torch.device("cuda", 1)) == NCCL
    with pytest.raises(ValueError, match="no process-group backend"):
        backend_for_device("meta")
    # The agent builds its specs without a backend: gloo, as before.
    assert GroupSpec(1, HOST, 1, "p/", (0,), 1.0).backend == GLOO


def test_build_group_dispatches_on_the_spec(store: dist.TCPStore) -> None:
    spec = GroupSpec(1, HOST, store.port, "dispatch/", (0,), 10.0)
    group = build_group(spec, 0, "ep", lambda: False)
    assert group.size() == 1 and not is_nccl(group)
    assert abort_group(group) == 0.0  # gloo: left alone
    with pytest.raises(ValueError, match="needs the rank's CUDA device"):
        build_group(replace(spec, backend=NCCL), 0, "ep", lambda: False)
    with pytest.raises(ValueError, match="unknown group backend"):
        build_group(replace(spec, backend="mpi"), 0, "ep", lambda: False)


def test_engine_options_pick_path_backend_and_staging() -> None:
    placement = build_placement(2, 1, CFG.n_experts, CFG.replicas, CFG.n_layers)
    row = EPEngine(CFG, 0, 2, placement, WEIGHTS)
    assert (row.backend, row.static, row.device.type) == (GLOO, False, "cpu")
    assert row.commit_received() is None and row.warm_up() == 0.0
    static = EPEngine(CFG, 0, 2, placement, WEIGHTS, static=True)
    assert static.static and static._static is not None
    assert not static._static.experts.staging  # staging defaults to CUDA only
    staged = EPEngine(CFG, 0, 2, placement, WEIGHTS, static=True, staging=True)
    assert staged._static is not None and staged._static.experts.staging
    assert staged.expert_bytes == row.expert_bytes
    with pytest.raises(ValueError, match="no process-group backend"):
        EPEngine(CFG, 0, 2, placement, WEIGHTS, device="meta")
    short = EPEngine(CFG, 0, 2, placement, WEIGHTS, static=True, max_seq=4)
    with pytest.raises(ValueError, match="max_seq is 4"):
        short.submit(Request(0, (1, 2, 3), 3))
    assert resolve_device("cpu", 5) == "cpu"


def test_abort_signal_tells_listeners_and_gloo_groups_stay() -> None:
    signal_ = AbortSignal()
    seen: list[int] = []
    signal_.subscribe(seen.append)
    signal_.abort(3)
    signal_.abort(2)
    assert seen == [3, 2] and signal_.aborted(3) and not signal_.aborted(4)


# --- the staging logic ------------------------------------------------------------


def test_expert_store_stages_receives_until_commit() -> None:
    store = ExpertStore(2, 2, 3, 4, torch.float64, torch.device("cpu"), staging=True, pin=False)
    w1, w2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    store.load((0, 0), w1, w2)
    assert store.filled == {(0, 0)}
    sent = store.transfer_views((0, 0))  # a filled slot: sent from its mirror
    assert torch.equal(sent[0], w1) and not store.pending
    assert sent[0].data_ptr() != store.device_views((0, 0))[0].data_ptr()
    into = store.transfer_views((1, 1))  # not filled: received into the mirror
    assert store.pending == {(1, 1)}
    r1, r2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    into[0].copy_(r1)
    into[1].copy_(r2)
    assert torch.isnan(store.device_views((1, 1))[0]).all()  # not on the device yet
    result = store.commit()
    assert (result.slots, result.bytes) == (1, (12 + 12) * 8)
    d1, d2 = store.device_views((1, 1))
    assert torch.equal(d1, r1) and torch.equal(d2, r2)
    assert store.filled == {(0, 0), (1, 1)} and store.commit().slots == 0
    store.empty((0, 0))
    assert torch.isnan(store.device_views((0, 0))[1]).all()
    assert torch.isnan(store.transfer_views((0, 0))[1]).all() and store.pending == {(0, 0)}


def test_expert_store_without_staging_receives_in_place() -> None:
    store = ExpertStore(1, 1, 2, 2, torch.float64, torch.device("cpu"), staging=False)
    views = store.transfer_views((0, 0))
    assert views[0].data_ptr() == store.device_views((0, 0))[0].data_ptr()
    views[0].fill_(1.0)
    views[1].fill_(2.0)
    result = store.commit()
    assert (result.slots, result.bytes) == (1, 0) and store.filled == {(0, 0)}


# --- the static step on CPU over gloo ------------------------------------------------


class StaticPair:
    """Two static-path ranks in one process (threads), gloo groups."""

    def __init__(
        self,
        store: dist.TCPStore,
        *,
        max_batch: int = 8,
        joiner: bool = False,
        staging: bool = False,
        device: str = "cpu",
    ) -> None:
        self.port = store.port
        self.placement = build_placement(2, 1, CFG.n_experts, CFG.replicas, CFG.n_layers)
        self.answers: list[list[tuple[int, tuple[int, ...]]]] = [[], []]
        self.engines = [
            EPEngine(
                CFG,
                rank,
                2,
                self.placement,
                WEIGHTS,
                load_experts=not (joiner and rank == 1),
                on_complete=functools.partial(self._record, rank),
                max_batch=max_batch,
                device=device,
                static=True,
                staging=staging,
            )
            for rank in (0, 1)
        ]
        self.adapters = [ReferenceEngineAdapter(e, CFG) for e in self.engines]

    def _record(self, rank: int, request_id: int, tokens: tuple[int, ...]) -> None:
        self.answers[rank].append((request_id, tokens))

    def spec(self, epoch: int) -> GroupSpec:
        return GroupSpec(epoch, HOST, self.port, f"epoch-{epoch}/", (0, 1), 20.0)

    def start(self, rank: int, epoch: int = 1) -> None:
        self.adapters[rank].rebuild_groups(self.spec(epoch))
        self.adapters[rank].reset_state(epoch, 0, (0, 1))

    def outputs(self) -> dict[int, tuple[int, ...]]:
        flat = [answer for answers in self.answers for answer in answers]
        ids = [rid for rid, _ in flat]
        assert len(ids) == len(set(ids)), f"answered twice: {sorted(ids)}"
        return dict(flat)


@pytest.mark.parametrize("undo", [False, True])
def test_static_step_on_cpu_gives_the_reference_tokens(store: dist.TCPStore, undo: bool) -> None:
    """max_batch 3 makes rows free and fill again; with `undo`, every iteration
    is rolled back once and redone, so a row of the undo state must never be
    handed to a new request."""
    requests = make_requests(31, 10)
    pair = StaticPair(store, max_batch=3)
    for r in requests:
        pair.engines[r.id % 2].submit(r)

    def body(rank: int) -> Callable[[], None]:
        def run() -> None:
            engine = pair.engines[rank]
            pair.start(rank)
            assert engine.group is not None and engine.group.backend == GLOO
            for _ in range(sum(steps_to_finish(r) for r in requests) + 2):
                engine.step()
                if undo:
                    engine.rollback_to(engine.iteration - 1)
                    engine.step()
            assert not engine.busy()

        return run

    run_ranks(body(0), body(1))
    assert pair.outputs() == reference_outputs(WEIGHTS, CFG, requests)
    counted = sum(sum(row) for row in pair.engines[0].expert_tokens)
    assert counted > 0


def test_static_rows_of_the_undo_state_survive_an_aborted_step(store: dist.TCPStore) -> None:
    """A request finishes in iteration i (its row is free in state i) while
    another waits; rank 0's step i+1 admits the waiting one and is aborted
    after writing its first cache position; the cut is i-1, which brings the
    finished request back with its cache. Its row must not have been reused."""
    requests = make_requests(17, 8)
    pair = StaticPair(store, max_batch=2)
    for r in requests:
        pair.engines[r.id % 2].submit(r)
    barrier = threading.Barrier(2)
    stop_at: list[int] = []

    def body(rank: int) -> Callable[[], None]:
        def run() -> None:
            engine, adapter = pair.engines[rank], pair.adapters[rank]
            pair.start(rank)
            while not stop_at:
                engine.step()
                if rank == 0 and engine._state.finished and engine._queue:
                    stop_at.append(engine.iteration)
                barrier.wait()
            cut = stop_at[0] - 1
            static = engine._static
            assert static is not None
            before = static.k_cache.clone()
            if rank == 0:  # rank 1 never enters the step: the exchange cannot complete
                adapter.abort_collectives(1)
                with pytest.raises(StepAborted):
                    engine.step()
                assert engine.iteration == stop_at[0]
            barrier.wait()
            adapter.rebuild_groups(pair.spec(2))
            adapter.reset_state(2, cut, (0, 1))
            # Every committed cache position of the restored sequences is intact.
            for seq in engine._state.running:
                kept = static.k_cache[:, seq.row, : seq.fed]
                assert torch.equal(kept, before[:, seq.row, : seq.fed]), seq.request.id
            while engine.iteration < cut + sum(steps_to_finish(r) for r in requests) + 1:
                engine.step()

        return run

    run_ranks(body(0), body(1))
    assert stop_at, "no request finished while another waited"
    assert pair.outputs() == reference_outputs(WEIGHTS, CFG, requests)


def test_static_step_aborted_then_served_on_a_new_epoch(store: dist.TCPStore) -> None:
    requests = make_requests(13, 8)
    early, late = requests[:4], requests[4:]
    pair = StaticPair(store)
    for r in early:
        pair.engines[r.id % 2].submit(r)

    def body(rank: int) -> Callable[[], None]:
        def run() -> None:
            engine, adapter = pair.engines[rank], pair.adapters[rank]
            pair.start(rank)
            for _ in range(3):
                engine.step()
            for r in late:
                if r.id % 2 == rank:
                    engine.submit(r)
            adapter.abort_collectives(1)
            with pytest.raises(StepAborted):
                engine.step()
            assert engine.iteration == 3
            adapter.rebuild_groups(pair.spec(2))
            adapter.reset_state(2, 3, (0, 1))
            while engine.iteration < 3 + sum(steps_to_finish(r) for r in requests) + 1:
                engine.step()

        return run

    run_ranks(body(0), body(1))
    assert pair.outputs() == reference_outputs(WEIGHTS, CFG, requests)


@pytest.mark.parametrize("skip_one", [False, True])
def test_joiner_resynced_through_staging_serves_the_reference(
    store: dist.TCPStore, skip_one: bool
) -> None:
    """Rank 1 starts with no experts; the agent's resync (execute_resync over
    the agent's gloo group, the coordinator's plan) lands them in its host
    mirror, and only reset_state's commit puts them where the step reads them.
    A transfer left out must show in the outputs."""
    requests = make_requests(21, 6)
    pair = StaticPair(store, joiner=True, staging=True)
    for r in requests:
        pair.engines[r.id % 2].submit(r)
    plan = transfer_plan(pair.placement, [0], [1])
    if skip_one:
        plan = replace(plan, transfers=plan.transfers[1:])
    joiner = pair.engines[1]
    assert joiner._static is not None and not joiner._static.experts.filled

    def body(rank: int) -> Callable[[], None]:
        def run() -> None:
            adapter, engine = pair.adapters[rank], pair.engines[rank]
            spec = pair.spec(1)
            adapter.rebuild_groups(spec)
            agent_group = build_gloo_group(spec, rank, "agent", lambda: False)
            result = execute_resync(
                group=agent_group,
                rank=rank,
                members=(0, 1),
                plan=plan,
                metadata_source=0,
                placement=pair.placement,
                adapter=adapter,
                aborted=lambda: False,
            )
            if rank == 1:
                assert result.bytes_received > 0
                static = engine._static
                assert static is not None
                assert torch.isnan(static.experts.w1).all()  # staged, not committed
            adapter.reset_state(1, 0, (0, 1))
            while engine.iteration < 40:
                engine.step()

        return run

    run_ranks(body(0), body(1))
    static = joiner._static
    assert static is not None and not static.experts.pending
    expected = reference_outputs(WEIGHTS, CFG, requests)
    if skip_one:
        assert torch.isnan(static.experts.w1).any()
        assert pair.outputs() != expected
    else:
        assert not torch.isnan(static.experts.w1).any()
        assert pair.outputs() == expected


# --- CUDA ------------------------------------------------------------------------


@needs_cuda
def test_cuda_staging_commits_pinned_host_bytes() -> None:
    dev = torch.device("cuda", 0)
    store = ExpertStore(2, 4, 32, 4096, torch.float64, dev, staging=True)
    assert store.pinned and store.host1 is not None and store.host1.is_pinned()
    sources = []
    for layer in range(2):
        for i in range(4):
            views = store.transfer_views((layer, i))
            pair = [torch.randn_like(v) for v in views]
            for v, src in zip(views, pair, strict=True):
                v.copy_(src)
            sources.append(((layer, i), pair))
    assert torch.isnan(store.w1).all()
    result = store.commit()
    assert result.slots == 8 and result.bytes == 8 * store.slot_bytes
    for key, (s1, s2) in sources:
        d1, d2 = store.device_views(key)
        assert torch.equal(d1.cpu(), s1) and torch.equal(d2.cpu(), s2)


@needs_cuda
def test_cuda_survivor_alone_serves_the_reference_from_a_graph(store: dist.TCPStore) -> None:
    """One rank on cuda:0, NCCL group of itself (a survivor after a shrink, the
    2-rank placement holds every expert on each rank): the captured step gives
    the CPU reference's tokens."""
    placement = build_placement(2, 1, CFG.n_experts, CFG.replicas, CFG.n_layers)
    answers: dict[int, tuple[int, ...]] = {}
    engine = EPEngine(
        CFG,
        0,
        2,
        placement,
        WEIGHTS,
        on_complete=lambda rid, toks: answers.__setitem__(rid, toks),
        device="cuda:0",
    )
    assert engine.backend == NCCL and engine._static is not None
    assert engine.warm_up() > 0
    adapter = ReferenceEngineAdapter(engine, CFG)
    spec = GroupSpec(1, HOST, store.port, "cuda-alone/", (0,), 60.0)
    adapter.rebuild_groups(spec)
    adapter.reset_state(1, 0, (0,))
    assert engine.group is not None and is_nccl(engine.group.pg)
    requests = make_requests(41, 12)
    for r in requests:
        engine.submit(r)
    while len(answers) < len(requests):
        engine.step()
        assert engine.iteration < 500
    assert answers == reference_outputs(WEIGHTS, CFG, requests)
    assert engine.graph_replays > 0
    # A retired NCCL group is aborted off the engine's thread, once the next
    # group has completed a step. The next group is built beside the serving
    # one (as in a grow, before the pause) and installed at the resume.
    current = engine.group
    adapter.rebuild_groups(replace(spec, epoch=2, store_prefix="cuda-alone-2/"))
    assert engine.group is current
    engine.step()  # still on epoch 1's communicator
    adapter.reset_state(2, engine.iteration, (0,))
    retired = engine._retired[-1]
    assert retired is current and retired.backend == NCCL and retired.abort_thread is None
    engine.step()
    assert retired.abort_thread is None
    engine.step()
    assert retired.backend == NCCL and retired.abort_thread is not None
    retired.abort_thread.join(30)
    assert retired.abort_ms is not None and retired.abort_ms >= 0


@needs_two_gpus
def test_nccl_pair_survivor_released_from_a_dead_peer(store: dist.TCPStore, tmp_path: Path) -> None:
    """Ranks on cuda:0 and cuda:1 serve over NCCL from a CUDA graph; rank 1 is
    SIGKILLed at a boundary, so rank 0 waits inside a replayed all-to-all that
    never completes. The abort (the agent thread's call, here a watcher's) must
    release it: its step raises StepAborted; it shrinks to itself and finishes
    every request with the reference's tokens."""
    world, count, seed, die_at = 2, 12, 7, 6
    requests = make_requests(seed, count)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    logs = {r: tmp_path / f"rank{r}.log" for r in range(world)}

    def log_text() -> str:
        return "\n".join(
            f"--- rank {r}\n{p.read_text(errors='replace')[-4000:]}" for r, p in logs.items()
        )

    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    try:
        for rank in range(world):
            argv = [sys.executable, str(Path(__file__)), "--rank", str(rank)]
            argv += ["--port", str(store.port), "--requests", str(count), "--seed", str(seed)]
            if rank == 1:
                argv += ["--die-at", str(die_at)]
            with logs[rank].open("wb") as out:
                procs[rank] = subprocess.Popen(
                    argv, cwd=REPO, env=env, stdout=out,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
        deadline = time.monotonic() + 120
        while procs[1].poll() is None:
            assert time.monotonic() < deadline, log_text()
            time.sleep(0.05)
        assert procs[1].returncode == -signal.SIGKILL, log_text()
        time.sleep(0.5)  # rank 0 is now inside a step that cannot complete
        assert not store.check(["failed/0"]), "rank 0 left the step before the abort"
        store.set("abort/1", repr(time.time()))
        store.wait(["failed/0"], timedelta(seconds=30))
        failure = json.loads(store.get("failed/0"))
        assert failure["kind"] == "StepAborted", failure
        assert failure["released_ms"] < 5000, failure
        orphans = [
            r.id for r in requests if r.id % world == 1 and not store.check([f"answer/{r.id}"])
        ]
        store.set("plan", json.dumps({"cut": failure["iteration"], "adopt": orphans}))
        deadline = time.monotonic() + 120
        while not all(store.check([f"answer/{r.id}"]) for r in requests):
            assert procs[0].poll() is None, log_text()
            assert time.monotonic() < deadline, log_text()
            time.sleep(0.05)
        store.set("stop", "1")
        procs[0].wait(timeout=60)
        outputs = {r.id: tuple(json.loads(store.get(f"answer/{r.id}"))) for r in requests}
        counts = {r.id: store.add(f"count/{r.id}", 0) for r in requests}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(json.dumps({"survivor": failure}))
    assert counts == {r.id: 1 for r in requests}
    assert outputs == reference_outputs(WEIGHTS, CFG, requests)


def _pair_rank_main() -> None:
    """One rank of test_nccl_pair_survivor_released_from_a_dead_peer."""
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--requests", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--die-at", type=int, default=-1)
    args = p.parse_args()
    rank, world = args.rank, 2
    device = resolve_device("cuda", rank)
    client = dist.TCPStore(HOST, args.port, is_master=False, timeout=timedelta(seconds=60))
    placement = build_placement(world, 1, CFG.n_experts, CFG.replicas, CFG.n_layers)

    def answer(request_id: int, tokens: tuple[int, ...]) -> None:
        client.set(f"answer/{request_id}", json.dumps(tokens))
        client.add(f"count/{request_id}", 1)

    engine = EPEngine(CFG, rank, world, placement, WEIGHTS, on_complete=answer, device=device)
    engine.warm_up()
    adapter = ReferenceEngineAdapter(engine, CFG)
    requests = {r.id: r for r in make_requests(args.seed, args.requests)}
    for r in requests.values():
        if r.id % world == rank:
            engine.submit(r)

    def spec(epoch: int, members: tuple[int, ...]) -> GroupSpec:
        return GroupSpec(epoch, HOST, args.port, f"pair/epoch-{epoch}/", members, 60.0)

    adapter.rebuild_groups(spec(1, (0, 1)))
    adapter.reset_state(1, 0, (0, 1))
    abort_at: list[float] = []

    def watch() -> None:  # the agent thread's part: abort_collectives on Abort
        watcher = dist.TCPStore(HOST, args.port, is_master=False, timeout=timedelta(seconds=60))
        while not watcher.check(["stop"]):
            if watcher.check(["abort/1"]) and not abort_at:
                abort_at.append(time.perf_counter())
                adapter.abort_collectives(1)
            time.sleep(0.002)

    threading.Thread(target=watch, daemon=True).start()
    while not client.check(["stop"]):
        if engine.iteration == args.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            engine.step()
        except StepAborted as exc:
            released_ms = (time.perf_counter() - abort_at[0]) * 1000.0 if abort_at else -1.0
            report = {
                "kind": type(exc).__name__,
                "iteration": engine.iteration,
                "released_ms": round(released_ms, 2),
                "graph_replays": engine.graph_replays,
            }
            client.set("failed/0", json.dumps(report))
            client.wait(["plan"], timedelta(seconds=60))
            plan = json.loads(client.get("plan"))
            adapter.rebuild_groups(spec(2, (0,)))
            adapter.reset_state(2, plan["cut"], (0,))
            for request_id in plan["adopt"]:
                engine.submit(requests[request_id])
            group = engine._retired[-1] if engine._retired else None
            if group is not None and group.abort_thread is not None:
                group.abort_thread.join(30)
                report["communicator_abort_ms"] = group.abort_ms
                client.set("failed/0/abort", json.dumps(report))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    _pair_rank_main()
