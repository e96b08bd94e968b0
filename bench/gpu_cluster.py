"""`python3 -m bench.gpu_cluster`: the recovery path on GPUs, one rank per GPU (issue 7).

One run, side by side, on one machine:

1. bounds, in this process: the device-to-device copy from GPU 0 to GPU 1
   (NVLink where the GPUs are so linked) and the pinned host-to-device copy
   on GPU 1, of the bytes a joiner receives.
2. ep-recovery, the real path: a throwaway etcd, the coordinator daemon, a
   request frontend and 2 ranks of the reference engine
   (`python -m reference_engine.worker --device cuda`: experts on the GPU,
   the step in a CUDA graph, NCCL groups). Requests are served; a rank is
   SIGKILLed; the survivor shrinks and keeps serving alone; the rank is
   relaunched with `--rejoin` and admitted. Every request must be answered
   once with the tokens of the never-failed single-process reference.
   Figures: detection, shrink, the grow's survivor stall (GetStatus), its
   phases, each rank's NCCL group build, the joiner's staged commit to
   the device, and the resync rate.
3. full-restart: both ranks SIGKILLed and started again against a running
   coordinator; kill to `steady`.
4. seed-style, in 2 fresh processes (one per GPU) holding the same engine:
   the survivor runs idle iterations with a readiness all_reduce over NCCL
   read back on the host each iteration (the seed's check); when the joiner
   is ready, every step is inside the pause: the new epoch's groups (the
   agent's gloo, the engine's NCCL), the resync with the agent's
   `execute_resync` into pinned staging, the commit to the device, and the
   first NCCL collective with the joiner. `floor`: a bare build of the two
   groups among the same warm processes. Transport bounds in the same
   processes: a raw gloo send of the expert bytes between pinned host
   buffers (what the agent's resync runs on) and an NCCL send from GPU 0 to
   GPU 1 (what a device-to-device resync would run on).

`--device cpu` runs the whole flow on this machine (gloo, the static step on
CPU) to try it before spending device time. One JSON object is the last
line of stdout; `--out FILE` writes it too. Exits 2 when the device is
missing (cuda: fewer than 2 GPUs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

import torch

from bench.common import BenchError, run_peers
from bench.stall import PHASE_NAME, _Cluster
from epctl.local_etcd import LocalEtcd
from protos.ep_recovery.v1 import admin_pb2
from reference_engine.config import ModelConfig
from worker_agent.groups import configure_nccl_env

MIB = 1 << 20
N_LAYERS = 2
N_EXPERTS = 8  # 2 ranks, 2 replicas: every rank holds all 8 experts (8 slots a layer)
D_MODEL = 32
RANKS = 2

_FIELD = r"(-?[0-9.]+)"


@dataclass(frozen=True)
class Options:
    device: str  # "cuda" or "cpu"
    expert_mb: int  # per rank
    requests: int
    grow_trials: int
    restart_trials: int
    peer_trials: int
    lease_ttl_s: int
    seed: int = 1234


def model_config(expert_mb: int, seed: int) -> ModelConfig:
    """Expert tensors of `expert_mb` MiB per rank: N_LAYERS x N_EXPERTS slots of
    (w1 [d, h] + w2 [h, d]) float64 = 2 * 8 * 32 * 2 * 8 * h bytes."""
    hidden = max(1, expert_mb * MIB // (N_LAYERS * N_EXPERTS * 2 * D_MODEL * 8))
    return ModelConfig(
        d_model=D_MODEL,
        n_layers=N_LAYERS,
        n_experts=N_EXPERTS,
        top_k=2,
        ffn_hidden=hidden,
        replicas=2,
        seed=seed,
    )


def progress(log: TextIO | None, line: str) -> None:
    if log is not None:
        log.write(f"gpu_cluster: {line}\n")
        log.flush()


def _median(values: list[float]) -> float | None:
    return round(float(statistics.median(values)), 3) if values else None


# --- 1. bounds -------------------------------------------------------------------------


def measure_bounds(nbytes: int, repeats: int = 10) -> dict[str, Any]:
    """GPU 0 -> GPU 1 copy and pinned host -> GPU 1 copy of `nbytes` random bytes."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    host = src.cpu().pin_memory()

    def timed(fn: Callable[[], None]) -> list[float]:
        out = []
        for i in range(repeats + 1):
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)
            if i:  # the first one warms up
                out.append(time.perf_counter() - t0)
        return out

    def peer_copy() -> None:
        dst.copy_(src, non_blocking=True)

    def host_copy() -> None:
        dst.copy_(host, non_blocking=True)

    d2d = timed(peer_copy)
    same = bool(torch.equal(dst[:4096].cpu(), host[:4096]))
    same = same and bool(torch.equal(dst[-4096:].cpu(), host[-4096:]))
    h2d = timed(host_copy)
    src = dst = host = torch.empty(0)
    torch.cuda.empty_cache()
    p2p = torch.cuda.can_device_access_peer(0, 1)
    d2d_s, h2d_s = statistics.median(d2d), statistics.median(h2d)
    return {
        "bytes": nbytes,
        "peer_access_0_1": p2p,
        "d2d_copy_ok": same,
        "d2d_gpu0_to_gpu1_bytes_per_s_p50": round(nbytes / d2d_s),
        "d2d_ms_p50": round(d2d_s * 1e3, 3),
        "h2d_pinned_gpu1_bytes_per_s_p50": round(nbytes / h2d_s),
        "h2d_ms_p50": round(h2d_s * 1e3, 3),
    }


# --- 2. and 3. the cluster ----------------------------------------------------------------


class GpuCluster(_Cluster):
    """bench.stall's cluster, with ranks on a device, behind a request frontend."""

    def __enter__(self) -> GpuCluster:
        return self

    def __init__(
        self,
        workdir: Path,
        log: TextIO | None,
        etcd: str,
        checkpoint: Path,
        device: str,
        frontend: tuple[str, int],
        frontend_key: bytes,
        lease_ttl_s: int,
    ) -> None:
        super().__init__(workdir, log, etcd, RANKS, checkpoint)
        self.name = f"gpu-cluster-{device}"
        self.device = device
        self.frontend = frontend
        self.frontend_key = frontend_key
        self.lease_ttl_s = lease_ttl_s

    def _start_rank(self, rank: int, rejoin: bool) -> None:
        argv = [
            sys.executable, "-m", "reference_engine.worker",
            "--cluster", self.cluster, "--rank", str(rank), "--world-size", str(self.ranks),
            "--coordinator", self.endpoint, "--etcd", self.etcd,
            "--checkpoint", str(self.checkpoint), "--lease-ttl", str(self.lease_ttl_s),
            "--device", self.device,
            "--frontend", f"{self.frontend[0]}:{self.frontend[1]}",
            "--frontend-key", self.frontend_key.hex(),
        ]  # fmt: skip
        if self.device == "cpu":
            argv.append("--static")  # the fixed-shape step, eagerly over gloo
        self._start(f"rank{rank}", [*argv, "--rejoin"] if rejoin else argv)

    def status(self) -> admin_pb2.ClusterStatus:
        status = self._status()
        if status is None:
            raise BenchError("GetStatus failed")
        return status

    def log_text(self, rank: int) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / f"{self.name}-rank{rank}.log").read_text(errors="replace")
        return ""


def _fields(text: str, event: str, key: str) -> list[float]:
    return [float(m) for m in re.findall(rf" {re.escape(event)} .*?\b{key}={_FIELD}", text)]


def _spans(status: admin_pb2.ClusterStatus, op_id: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for span in status.timeline:
        if span.op_id == op_id and span.end_unix_ms:
            name = PHASE_NAME[span.phase]
            out[name] = round(out.get(name, 0.0) + span.end_unix_ms - span.start_unix_ms, 2)
    return out


def run_cluster(
    opts: Options,
    workdir: Path,
    checkpoint: Path,
    expected: Callable[[], dict[int, tuple[int, ...]]],
    log: TextIO | None,
) -> dict[str, Any]:
    from reference_engine.frontend import RequestRouter
    from reference_engine.requests import make_requests

    requests = make_requests(opts.seed, opts.requests)
    parts = 2 * opts.grow_trials + 1  # per trial: one before the kill, one while degraded
    size = -(-len(requests) // parts)
    batches = [requests[i : i + size] for i in range(0, len(requests), size)]
    router = RequestRouter()
    etcd = LocalEtcd(name="gpu-cluster")
    out: dict[str, Any] = {"trials": []}
    try:
        etcd.start()
        with GpuCluster(
            workdir, log, etcd.endpoint, checkpoint, opts.device, router.address,
            router.authkey, opts.lease_ttl_s,
        ) as cluster:  # fmt: skip
            started = time.perf_counter()
            cluster.form(standby=opts.restart_trials)
            out["form_ms"] = round((time.perf_counter() - started) * 1000.0, 1)
            progress(log, f"formed in {out['form_ms']} ms")
            for trial in range(opts.grow_trials):
                victim = (RANKS - 1 - trial) % RANKS  # rank 1, then rank 0
                out["trials"].append(
                    _kill_and_rejoin(cluster, router, victim, batches, log)
                )  # fmt: skip
            for rest in batches:
                router.submit(rest)
            if not router.wait_all_answered(300):
                raise BenchError(f"requests never answered: {router.unanswered()}")
            answers = dict(router.ledger.answers)
            reference = expected()
            out["requests"] = {
                "submitted": router.ledger.submitted,
                "completed": len(answers),
                "duplicated": router.ledger.duplicated,
                "reassigned": router.ledger.reassigned,
            }
            out["outputs_match_reference"] = len(answers) == len(requests) and all(
                answers[r.id] == reference[r.id] for r in requests
            )
            texts = {r: cluster.log_text(r) for r in range(RANKS)}
            out["graph_captures"] = sum(
                len(_fields(t, "cuda graph captured", "capture_ms")) for t in texts.values()
            )
            out["capture_ms"] = [
                v for t in texts.values() for v in _fields(t, "cuda graph captured", "capture_ms")
            ]
            out["warm_up_ms"] = [v for t in texts.values() for v in _fields(t, "warmed up", "ms")]
            out["communicator_abort_ms"] = [
                v for t in texts.values() for v in _fields(t, "communicator aborted", "ms")
            ]
            out["full_restart_ms"] = []
            for trial in range(opts.restart_trials):
                ms = cluster.full_restart(trial)
                out["full_restart_ms"].append(round(ms, 1))
                progress(log, f"full restart {trial}: {ms:.0f} ms to steady")
            status = cluster.status()
            out["final_epoch"] = status.epoch
    finally:
        router.close()
        etcd.stop()
    return out


def _kill_and_rejoin(
    cluster: GpuCluster,
    router: Any,
    victim: int,
    batches: list[list[Any]],
    log: TextIO | None,
) -> dict[str, Any]:
    rec: dict[str, Any] = {"victim": victim}
    survivor = 1 - victim
    answered = len(router.ledger.answers)
    if batches:  # both ranks serve when the kill comes
        router.submit(batches.pop(0))
    cluster._wait(lambda: len(router.ledger.answers) > answered, 120, "answers before the kill")
    before = cluster.status()
    failures_before = {(f.rank, f.confirmed_unix_ms) for f in before.failures}
    ops_before = {op.op_id for op in before.operations}
    texts_before = {r: len(cluster.log_text(r)) for r in range(RANKS)}
    kill_unix_ms = time.time() * 1000.0
    cluster._kill(f"rank{victim}")

    def removed() -> bool:
        s = cluster._status()
        return s is not None and victim not in s.members and PHASE_NAME[s.phase] == "degraded"

    cluster._wait(removed, 120, f"rank {victim} to be removed")
    rec["shrink_done_ms"] = round(time.time() * 1000.0 - kill_unix_ms, 1)
    status = cluster.status()
    for f in status.failures:
        if f.rank == victim and (f.rank, f.confirmed_unix_ms) not in failures_before:
            rec["detect_ms"] = round(f.confirmed_unix_ms - kill_unix_ms, 1)
            rec["detect_reason"] = f.reason
    shrink = [op for op in status.operations if op.op_id not in ops_before and op.kind == "shrink"]
    if shrink:
        rec["shrink_phases_ms"] = _spans(status, shrink[-1].op_id)
    # The survivor serves alone: a batch submitted now is answered by it.
    answered = len(router.ledger.answers)
    if batches:
        router.submit(batches.pop(0))
        cluster._wait(
            lambda: len(router.ledger.answers) > answered, 120, "the survivor to answer alone"
        )
    rec["answered_while_degraded"] = len(router.ledger.answers) - answered
    progress(log, f"rank {victim} killed: shrink done in {rec['shrink_done_ms']} ms")

    seen = {op.op_id for op in status.operations}
    texts_relaunch = {r: len(cluster.log_text(r)) for r in range(RANKS)}
    relaunched = time.perf_counter()
    cluster._start_rank(victim, rejoin=True)
    found: list[admin_pb2.OperationSummary] = []

    def admitted() -> bool:
        s = cluster._status()
        if s is None or PHASE_NAME[s.phase] != "steady":
            return False
        found[:] = [
            op
            for op in s.operations
            if op.op_id not in seen and op.kind == "grow" and op.outcome == "completed"
        ]
        return bool(found)

    cluster._wait(admitted, 300, f"rank {victim} to be admitted again")
    rec["relaunch_to_steady_ms"] = round((time.perf_counter() - relaunched) * 1000.0, 1)
    grow = found[-1]
    rec["grow_stall_ms"] = round(grow.stall_ms, 2)
    status = cluster.status()
    rec["grow_phases_ms"] = _spans(status, grow.op_id)
    # Each rank's own figures, from its log lines written after the kill.
    time.sleep(1.5)  # the retired communicator's abort (after a first step) is logged
    survivor_log = cluster.log_text(survivor)
    shrink_text = survivor_log[texts_before[survivor] : texts_relaunch[survivor]]
    grow_text = survivor_log[texts_relaunch[survivor] :]
    joiner_text = cluster.log_text(victim)[texts_relaunch[victim] :]
    rec["survivor_stall_ms"] = _fields(grow_text, "resumed", "stall_ms")[-1:]
    rec["survivor_shrink_group_build_ms"] = _fields(shrink_text, "ep group installed", "build_ms")
    rec["survivor_group_build_ms"] = _fields(grow_text, "ep group installed", "build_ms")
    rec["survivor_capture_ms"] = _fields(grow_text, "cuda graph captured", "capture_ms")
    rec["survivor_first_step_ms"] = _fields(grow_text, "first step on group", "ms")[-1:]
    rec["survivor_aborts_started"] = grow_text.count("communicator abort started")
    rec["survivor_aborts_done_ms"] = _fields(grow_text, "communicator aborted", "ms")
    rec["survivor_captures_after_grow"] = grow_text.count("cuda graph captured")
    rec["joiner_first_step_ms"] = _fields(joiner_text, "first step on group", "ms")[-1:]
    rec["joiner_group_build_ms"] = _fields(joiner_text, "ep group installed", "build_ms")
    rec["joiner_warm_up_ms"] = _fields(joiner_text, "warmed up", "ms")
    committed = _fields(joiner_text, "experts committed", "bytes")
    commit_ms = _fields(joiner_text, "experts committed", "ms")
    rec["joiner_committed_bytes"] = int(committed[-1]) if committed else 0
    rec["joiner_commit_ms"] = commit_ms[-1] if commit_ms else None
    resync_ms = rec["grow_phases_ms"].get("resyncing")
    if resync_ms:  # the joiner receives every slot it holds (2 ranks hold all experts)
        nbytes = int(os.environ.get("EP_BENCH_EXPERT_BYTES", "0"))
        rec["resync_bytes_per_s"] = round(nbytes / (resync_ms / 1000.0))
    progress(log, f"rank {victim} rejoined: grow stall {rec['grow_stall_ms']} ms")
    return rec


# --- 4. seed-style, floor and transport bounds in fresh processes ------------------------


def _settle(engine: Any) -> None:
    """Wait for retired communicators' background aborts (off the timed paths)."""
    for group in list(engine._retired):
        if group.abort_thread is not None:
            group.abort_thread.join(60)


def _seed_peer(rank: int, kind: str, checkpoint: str, trials: int, port: int) -> dict[str, Any]:
    import torch.distributed as dist

    from coordinator.plan import transfer_plan
    from reference_engine.adapter import ReferenceEngineAdapter
    from reference_engine.engine import EPEngine
    from reference_engine.model import load_checkpoint
    from reference_engine.placement import build_placement
    from reference_engine.worker import resolve_device
    from worker_agent.adapter import GroupSpec
    from worker_agent.groups import build_gloo_group, build_group
    from worker_agent.resync import execute_resync

    device = resolve_device(kind, rank)
    cuda = device != "cpu"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    cfg, weights = load_checkpoint(Path(checkpoint))
    joiner, survivors, everyone = 1, (0,), (0, 1)
    placement = build_placement(RANKS, 1, cfg.n_experts, cfg.replicas, cfg.n_layers)
    engine = EPEngine(
        cfg, rank, RANKS, placement, weights, load_experts=rank != joiner, device=device,
        static=True,
    )  # fmt: skip
    engine.warm_up()
    adapter = ReferenceEngineAdapter(engine, cfg)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=300))

    def never() -> bool:
        return False

    def spec(epoch: int, members: tuple[int, ...]) -> GroupSpec:
        return GroupSpec(epoch, "127.0.0.1", port, f"seed/epoch-{epoch}/", members, 120.0)

    def barrier(name: str) -> None:
        store.add(name, 1)
        while int(store.add(name, 0)) < RANKS:
            time.sleep(0.001)

    def now() -> float:
        return time.perf_counter()

    old_engine = None
    if rank != joiner:  # the survivors' group of the epoch they serve (the engine's backend)
        old_engine = build_group(
            replace(spec(1, survivors), backend=engine.backend), rank, "old", never, device=device
        )
    flag = torch.zeros(1, device=device)
    barrier("warm")  # one untimed build of everyone: no trial pays a first build
    build_gloo_group(spec(2, everyone), rank, "agent", never)
    adapter.rebuild_groups(spec(2, everyone))
    engine.install_staged(2)  # the seed installs what it builds at once
    plan = transfer_plan(placement, survivors, [joiner])
    epoch = 2
    out: dict[str, list[float]] = {}

    def add(key: str, ms: float) -> None:
        out.setdefault(key, []).append(round(ms, 3))

    for _ in range(trials):
        _settle(engine)
        epoch += 1
        barrier(f"go/floor/{epoch}")
        t0 = now()
        agent = build_gloo_group(spec(epoch, everyone), rank, "agent", never)
        adapter.rebuild_groups(spec(epoch, everyone))
        engine.install_staged(epoch)
        add("floor_ms", (now() - t0) * 1000.0)
        barrier(f"built/floor/{epoch}")
        del agent
        _settle(engine)

        epoch += 1
        barrier(f"go/seed/{epoch}")
        ready = f"ready/{epoch}"
        if rank == joiner:
            assert engine._static is not None
            engine._static.experts.filled.clear()  # its slots are receive targets again
            time.sleep(0.02)  # the survivors serve when the joiner gets ready
            store.set(ready, "1")
            t0 = now()
        else:
            assert old_engine is not None
            iterations = 0
            while True:  # idle iterations, each with the seed's readiness check
                flag.fill_(float(store.check([ready])))
                old_engine.allreduce([flag]).wait()
                iterations += 1
                if flag.item() > 0:  # read back on the host: a device sync
                    break
                time.sleep(0.002)
            t0 = now()  # every survivor stops at this boundary
        agent = build_gloo_group(spec(epoch, everyone), rank, "agent", never)
        adapter.rebuild_groups(spec(epoch, everyone))
        engine.install_staged(epoch)
        t1 = now()
        result = execute_resync(
            group=agent, rank=rank, members=everyone, plan=plan, metadata_source=0,
            placement=placement, adapter=adapter, aborted=never,
        )  # fmt: skip
        t2 = now()
        commit = engine.commit_received()
        t3 = now()
        first = torch.ones(1, device=device)
        assert engine.group is not None
        work = engine.group.pg.allreduce([first])
        work.wait()
        sync()
        if float(first.item()) != RANKS:
            raise RuntimeError(f"first collective with the joiner gave {first.item()}")
        t4 = now()
        add("seed_stall_ms", (t4 - t0) * 1000.0)
        add("seed_build_ms", (t1 - t0) * 1000.0)
        add("seed_resync_ms", (t2 - t1) * 1000.0)
        add("seed_commit_ms", (t3 - t2) * 1000.0)
        add("seed_first_collective_ms", (t4 - t3) * 1000.0)
        if rank == joiner:
            add("resync_bytes", float(result.bytes_received))
            add("committed_bytes", float(commit.bytes if commit else 0))
            _check_experts(engine, weights, placement)
        barrier(f"done/seed/{epoch}")

    # Transport bounds between the same two processes, same bytes.
    _settle(engine)
    static = engine._static
    assert static is not None
    host = [t for t in (static.experts.host1, static.experts.host2) if t is not None]
    if not host:
        host = [static.experts.w1, static.experts.w2]
    nbytes = sum(t.numel() * t.element_size() for t in host)
    epoch += 1
    raw = build_gloo_group(spec(epoch, everyone), rank, "raw", never)
    for i in range(4):  # gloo between pinned host buffers: the agent's transport
        barrier(f"gloo/{i}")
        t0 = now()
        works = [
            raw.send([t], 1, j) if rank == 0 else raw.recv([t], 0, j) for j, t in enumerate(host)
        ]
        for w in works:
            w.wait()
        if i:
            add("gloo_send_ms", (now() - t0) * 1000.0)
    if cuda:  # NCCL from GPU 0 to GPU 1, device buffers: a device-to-device resync
        assert engine.group is not None
        pg = engine.group.pg
        tensors = [static.experts.w1, static.experts.w2]
        for i in range(4):
            barrier(f"nccl/{i}")
            sync()
            t0 = now()
            works = [
                pg.send([t], 1, j) if rank == 0 else pg.recv([t], 0, j)
                for j, t in enumerate(tensors)
            ]
            for w in works:
                w.wait()
            sync()
            if i:
                add("nccl_send_ms", (now() - t0) * 1000.0)
    barrier("done")
    return {"bytes": nbytes, **out}


def _check_experts(engine: Any, weights: Any, placement: Any) -> None:
    """The joiner's device slots hold the checkpoint's experts (first and last slot)."""
    spr = placement.slots_per_rank
    slots = placement.slots_of_rank(engine.rank)
    for layer in (0, len(placement.layers) - 1):
        for slot in (slots[0], slots[-1]):
            w1, _ = engine._static.experts.device_views((layer, slot - engine.rank * spr))
            expert = placement.layers[layer][slot]
            if not torch.equal(w1.cpu(), weights.layers[layer].w1[expert]):
                raise RuntimeError(f"joiner slot {slot} of layer {layer} differs after resync")


def run_seed_style(opts: Options, checkpoint: Path, log: TextIO | None) -> dict[str, Any]:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    args = [(opts.device, str(checkpoint), opts.peer_trials, store.port)] * RANKS
    answers = run_peers(_seed_peer, args, 600.0)
    progress(log, "seed-style, floor and transport bounds done")
    survivor, joiner = answers[0], answers[1]
    nbytes = joiner["bytes"]
    parts = ("seed_build_ms", "seed_resync_ms", "seed_commit_ms", "seed_first_collective_ms")
    resync_ms = _median(joiner["seed_resync_ms"]) or float("nan")

    def longest(key: str) -> list[float]:
        return [max(a, b) for a, b in zip(survivor[key], joiner[key], strict=True)]

    def rate(key: str) -> int | None:
        ms = _median(joiner.get(key, []))
        return round(nbytes / (ms / 1000.0)) if ms else None

    return {
        "trials": opts.peer_trials,
        "seed_stall_ms": longest("seed_stall_ms"),
        "seed_parts_ms_p50": {key: _median(survivor[key]) for key in parts},
        "joiner_commit_ms_p50": _median(joiner["seed_commit_ms"]),
        "floor_ms": longest("floor_ms"),
        "resync_bytes": int(joiner["resync_bytes"][0]),
        "resync_bytes_per_s_p50": round(joiner["resync_bytes"][0] / (resync_ms / 1000.0)),
        "gloo_host_send_bytes_per_s_p50": rate("gloo_send_ms"),
        "nccl_gpu_send_bytes_per_s_p50": rate("nccl_send_ms"),
        "transport_bytes": nbytes,
    }


# --- entry ---------------------------------------------------------------------------------


def _machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cores": os.cpu_count(),
    }
    if device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
        info["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
    info["env"] = {
        k: os.environ.get(k)
        for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
                  "TORCH_NCCL_ASYNC_ERROR_HANDLING")
    }  # fmt: skip
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.gpu_cluster", description=__doc__)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--expert-mb", type=int, help="expert MiB per rank (cuda 1024, cpu 1)")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--grow-trials", type=int, default=4)
    p.add_argument("--restart-trials", type=int, default=1)
    p.add_argument("--peer-trials", type=int, default=5)
    p.add_argument("--lease-ttl", type=int, default=2)
    p.add_argument("--skip", default="", help="comma list of parts to skip: cluster,seed,bounds")
    p.add_argument("--out", type=Path)
    p.add_argument("--workdir", type=Path, help="keep the logs here (default: a temporary dir)")
    args = p.parse_args(argv)
    configure_nccl_env()  # inherited by every process started below
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.device == "cuda" and (not torch.cuda.is_available() or torch.cuda.device_count() < 2):
        print("bench.gpu_cluster: needs 2 CUDA devices (or --device cpu)", file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    opts = Options(
        device=args.device,
        expert_mb=args.expert_mb or (1024 if args.device == "cuda" else 1),
        requests=args.requests,
        grow_trials=args.grow_trials,
        restart_trials=args.restart_trials,
        peer_trials=args.peer_trials,
        lease_ttl_s=args.lease_ttl,
    )
    log = sys.stderr
    report: dict[str, Any] = {"bench": "gpu_cluster", "machine": _machine(opts.device)}
    report["options"] = opts.__dict__
    cfg = model_config(opts.expert_mb, opts.seed)
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = args.workdir
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ep-gpu-")))
        from reference_engine.model import derive_weights, save_checkpoint

        started = time.perf_counter()
        weights = derive_weights(cfg)
        checkpoint = workdir / "model.pt"
        save_checkpoint(checkpoint, cfg, weights)
        progress(log, f"checkpoint {cfg.ffn_hidden=} in {time.perf_counter() - started:.1f} s")
        expert_bytes = N_LAYERS * N_EXPERTS * 2 * cfg.d_model * cfg.ffn_hidden * 8
        report["expert_bytes_per_rank"] = expert_bytes
        os.environ["EP_BENCH_EXPERT_BYTES"] = str(expert_bytes)

        # The never-failed reference, computed while the cluster runs.
        reference: dict[int, tuple[int, ...]] = {}

        def compute_reference() -> None:
            from reference_engine.reference import reference_outputs
            from reference_engine.requests import make_requests

            reference.update(
                reference_outputs(weights, cfg, make_requests(opts.seed, opts.requests))
            )

        worker = threading.Thread(target=compute_reference, daemon=True)
        worker.start()

        def expected() -> dict[int, tuple[int, ...]]:
            worker.join()
            return reference

        if opts.device == "cuda" and "bounds" not in skip:
            report["bounds"] = measure_bounds(expert_bytes)
            progress(log, f"bounds: {report['bounds']}")
        if "cluster" not in skip:
            report["ep_recovery"] = run_cluster(opts, workdir, checkpoint, expected, log)
        if "seed" not in skip:
            report["seed_style"] = run_seed_style(opts, checkpoint, log)
    report["summary"] = summarize(report)
    for key, value in report["summary"].items():
        print(f"{key:<44} {value}", flush=True)
    line = json.dumps(report)
    if args.out is not None:
        args.out.write_text(line + "\n")
    print(line, flush=True)
    return 0


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    ep = report.get("ep_recovery")
    if ep:
        trials = ep["trials"]
        s["outputs_match_reference"] = ep.get("outputs_match_reference")
        s["ep_recovery_grow_stall_ms"] = [t["grow_stall_ms"] for t in trials]
        s["ep_recovery_detect_ms"] = [t.get("detect_ms") for t in trials]
        s["ep_recovery_shrink_done_ms"] = [t["shrink_done_ms"] for t in trials]
        s["answered_while_degraded"] = [t["answered_while_degraded"] for t in trials]
        s["ep_recovery_rebuilding_ms"] = [t["grow_phases_ms"].get("rebuilding") for t in trials]
        s["ep_recovery_resyncing_ms"] = [t["grow_phases_ms"].get("resyncing") for t in trials]
        s["ep_recovery_resync_bytes_per_s"] = [t.get("resync_bytes_per_s") for t in trials]
        s["joiner_nccl_group_build_ms"] = [t["joiner_group_build_ms"] for t in trials]
        s["survivor_nccl_group_build_ms"] = [t["survivor_group_build_ms"] for t in trials]
        s["joiner_commit_ms"] = [t["joiner_commit_ms"] for t in trials]
        s["survivor_first_step_after_grow_ms"] = [t["survivor_first_step_ms"] for t in trials]
        s["full_restart_ms"] = ep.get("full_restart_ms")
        s["graph_captures"] = ep.get("graph_captures")
    seed = report.get("seed_style")
    if seed:
        s["seed_style_stall_ms"] = seed["seed_stall_ms"]
        s["seed_style_parts_ms_p50"] = seed["seed_parts_ms_p50"]
        s["floor_ms"] = seed["floor_ms"]
        s["seed_resync_bytes_per_s_p50"] = seed["resync_bytes_per_s_p50"]
        s["gloo_host_send_bytes_per_s_p50"] = seed["gloo_host_send_bytes_per_s_p50"]
        s["nccl_gpu_send_bytes_per_s_p50"] = seed["nccl_gpu_send_bytes_per_s_p50"]
    bounds = report.get("bounds")
    if bounds:
        s["d2d_gpu0_to_gpu1_bytes_per_s_p50"] = bounds["d2d_gpu0_to_gpu1_bytes_per_s_p50"]
        s["h2d_pinned_bytes_per_s_p50"] = bounds["h2d_pinned_gpu1_bytes_per_s_p50"]
        if seed and seed["resync_bytes_per_s_p50"]:
            s["resync_of_d2d_bound"] = round(
                seed["resync_bytes_per_s_p50"] / bounds["d2d_gpu0_to_gpu1_bytes_per_s_p50"], 4
            )
    if ep and seed and ep["trials"]:
        ep_stall = statistics.median([t["grow_stall_ms"] for t in ep["trials"]])
        seed_stall = statistics.median(seed["seed_stall_ms"])
        s["ep_recovery_over_seed_style_stall"] = round(ep_stall / seed_stall, 3)
        if ep.get("full_restart_ms"):
            s["full_restart_over_ep_recovery_stall"] = round(
                statistics.median(ep["full_restart_ms"]) / ep_stall, 2
            )
    return s


if __name__ == "__main__":
    sys.exit(main())
