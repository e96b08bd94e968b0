"""`epctl bench stall`: how long the survivors are held when a rank is admitted.

Four systems, side by side in one run, at the same rank counts and expert bytes:

- `ep-recovery`: the real path. A throwaway etcd, the coordinator daemon and N
  ranks of the reference engine (`python -m reference_engine.worker`) loaded
  from a checkpoint whose expert tensors are sized to the chosen bytes per
  rank. One rank is SIGKILLed; once the shrink is done it is relaunched with
  `--rejoin`. The figure is the completed grow's `stall_ms` from GetStatus: the
  longest survivor stall, from the boundary where it was held to its resume.
  The survivors' own `resumed ... stall_ms=` log lines give the median. The
  joiner's experts and the next epoch's groups are moved and built while
  everyone serves (docs/architecture.md): the pause holds the metadata
  hand-off and the resume.
- `seed-style`: the seed's way, emulated on the same builders and plan: N
  fresh processes hold the same expert tensors; the survivors run idle
  iterations with a readiness all_reduce in each. When it reports the joiner,
  every survivor stops there, and the new epoch's groups are built (the agent's
  and the engine's, with `build_gloo_group`), the joiner's experts are sent with
  `execute_resync` and the coordinator's plan, and the first collective with
  the joiner completes. All of that is inside the pause.
- `full-restart`: every rank SIGKILLed and started again (fresh processes,
  weights loaded from the checkpoint) against a coordinator already running;
  the time from the kill until GetStatus says `steady`.
- `floor`: a bare build of the same epoch's two groups among the same warm
  processes as `seed-style`, on a fresh store prefix.

Every figure is the longest survivor's, in ms; a system's `stall_ms` is the
median over its trials (the floor's: the minimum, the best a build does).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TextIO

import grpc
import torch

from bench.common import BenchError, BenchResult, Record, median, progress, run_peers
from epctl.local_etcd import LocalEtcd
from protos.ep_recovery.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from reference_engine.config import ModelConfig

MIB = 1 << 20
N_LAYERS = 2
SLOTS_PER_RANK = 2  # n_experts = ranks, 2 replicas: every rank holds 2 slots per layer
D_MODEL = 32
LEASE_TTL_S = 3  # 8 rank processes on 2 loaded cores: leave the keepalive some slack
FORM_TIMEOUT_S = 300.0
SYSTEMS = ("ep-recovery", "seed-style", "full-restart", "floor")

PHASE_NAME = {v: k.removeprefix("PHASE_").lower() for k, v in common_pb2.Phase.items()}
_RESUMED = re.compile(r" resumed .*stall_ms=([0-9.]+)")


@dataclass(frozen=True)
class StallPlan:
    """What one run measures. `grow` lists the (ranks, expert MiB) of the real
    path; `baselines` those where seed-style and full-restart also run. The
    floor runs wherever seed-style's processes are."""

    grow: tuple[tuple[int, int], ...]
    baselines: tuple[tuple[int, int], ...]
    grow_trials: int
    peer_trials: int
    restart_trials: int


def quick_plan() -> StallPlan:
    return StallPlan(
        grow=((8, 1), (8, 64)),
        baselines=((8, 64),),
        grow_trials=1,
        peer_trials=3,
        restart_trials=1,
    )


def full_plan() -> StallPlan:
    grow = [(n, mb) for n in (4, 8) for mb in (1, 64)]
    baselines = [(4, 64), (8, 64)]
    # 1 GiB per rank: each reference rank also keeps the whole checkpoint
    # (ranks/2 x its expert bytes), so only 4 ranks, and only with room to spare.
    if _mem_available_bytes() >= 20 * 1024 * MIB:
        grow.append((4, 1024))
        baselines.append((4, 1024))
    return StallPlan(
        grow=tuple(grow),
        baselines=tuple(baselines),
        grow_trials=3,
        peer_trials=5,
        restart_trials=2,
    )


def run(quick: bool, log: TextIO | None = None) -> BenchResult:
    return run_plan(quick_plan() if quick else full_plan(), log)


def model_config(ranks: int, expert_mb: int) -> ModelConfig:
    """A reference model whose expert tensors total `expert_mb` MiB per rank.

    Per rank: N_LAYERS x SLOTS_PER_RANK slots x (w1 [d, h] + w2 [h, d]) float64
    = 64 * d * h bytes, so h = expert_mb MiB / (64 d).
    """
    hidden = expert_mb * MIB // (8 * 2 * N_LAYERS * SLOTS_PER_RANK * D_MODEL)
    return ModelConfig(
        d_model=D_MODEL,
        n_layers=N_LAYERS,
        n_experts=ranks * SLOTS_PER_RANK // 2,
        top_k=2,
        ffn_hidden=hidden,
        replicas=2,
    )


def run_plan(plan: StallPlan, log: TextIO | None = None) -> BenchResult:
    samples: dict[tuple[str, int, int], list[float]] = {}
    medians: dict[tuple[str, int, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="ep-bench-stall-") as tmp:
        workdir = Path(tmp)
        etcd = LocalEtcd(name="bench-stall")
        try:
            etcd.start()
            for ranks, mb in plan.grow:
                checkpoint = workdir / f"model-{ranks}x{mb}.pt"
                _save_checkpoint(checkpoint, model_config(ranks, mb))
                restarts = plan.restart_trials if (ranks, mb) in plan.baselines else 0
                with _Cluster(workdir, log, etcd.endpoint, ranks, checkpoint) as cluster:
                    cluster.form(standby=restarts)
                    for trial in range(plan.grow_trials):
                        victim = 1 + trial % (ranks - 1)
                        stall, survivors = cluster.kill_and_rejoin(victim)
                        samples.setdefault(("ep-recovery", ranks, mb), []).append(stall)
                        medians.setdefault(("ep-recovery", ranks, mb), []).append(
                            median(survivors) if survivors else math.nan
                        )
                        progress(log, f"stall: ep-recovery {ranks} ranks {mb} MiB: {stall} ms")
                    for trial in range(restarts):
                        ms = cluster.full_restart(trial)
                        samples.setdefault(("full-restart", ranks, mb), []).append(ms)
                        progress(log, f"stall: full-restart {ranks} ranks {mb} MiB: {ms:.0f} ms")
                checkpoint.unlink()
        finally:
            etcd.stop()
    for ranks in sorted({n for n, _ in plan.grow} | {n for n, _ in plan.baselines}):
        sizes = sorted({mb for n, mb in plan.grow if n == ranks})
        seed_sizes = tuple(mb for n, mb in plan.baselines if n == ranks)
        if not sizes:
            continue
        progress(log, f"stall: seed-style and floor, {ranks} fresh processes, sizes {sizes} MiB")
        for (system, mb), values in _peer_stalls(ranks, sizes, seed_sizes, plan.peer_trials, log):
            samples[(system, ranks, mb)] = values
    return _report(samples, medians, plan)


def _report(
    samples: dict[tuple[str, int, int], list[float]],
    medians: dict[tuple[str, int, int], list[float]],
    plan: StallPlan,
) -> BenchResult:
    result = BenchResult()
    keys = sorted(samples, key=lambda k: (k[1], k[2], SYSTEMS.index(k[0])))
    for system, ranks, mb in keys:
        values = samples[(system, ranks, mb)]
        # A floor is the best the build does; every other system is its median.
        stall = min(values) if system == "floor" else median(values)
        floor = samples.get(("floor", ranks, mb))
        record: Record = {
            "system": system,
            "ranks": ranks,
            "expert_mb": mb,
            "trials": len(values),
            "stall_ms": round(stall, 2),
            "stall_ms_min": round(min(values), 2),
            "stall_ms_max": round(max(values), 2),
            "survivor_median_ms": None,
            "of_floor": round(stall / min(floor), 2) if floor else None,
        }
        survivor = [v for v in medians.get((system, ranks, mb), []) if not math.isnan(v)]
        if survivor:
            record["survivor_median_ms"] = round(median(survivor), 2)
        result.results.append(record)
    result.notes += [
        "stall_ms: the longest survivor's stall (held at a boundary to resumed), median over "
        "trials (floor: the minimum); survivor_median_ms: the median survivor's, from the "
        "ranks' own logs",
        "expert_mb: MiB of expert tensors per rank (float64, "
        f"{N_LAYERS} layers x {SLOTS_PER_RANK} slots, d_model {D_MODEL}); the joiner receives "
        "all of them",
        "ep-recovery: reference-engine ranks, idle (2 ms sleep between iterations), one rank "
        "SIGKILLed, then relaunched with --rejoin; figure from the coordinator's GetStatus. "
        "The joiner's experts (prefetch) and the next epoch's groups (rebuild) are moved and "
        "built while everyone serves; the pause holds the resync of metadata and the resume",
        "seed-style: emulated in fresh processes with the agent's builders and the "
        "coordinator's plan: a readiness all_reduce per idle iteration, then group rebuild + "
        "execute_resync + first collective with the joiner, all inside the pause",
        "full-restart: every rank SIGKILLed and started again against a running coordinator, "
        "from the kill to phase steady (process start, torch import, checkpoint load, form)",
        "floor: build_gloo_group of the epoch's two groups (agent, engine) on a fresh store "
        "prefix, among the seed-style processes; of_floor = stall_ms / floor stall_ms",
        "a group build opens a new TCPStore client per group; on this machine one such "
        "connect in a few takes ~5.0 s when 8 processes connect at once (torch 2.13, either "
        "store backend), so seed-style and floor trials are bimodal: see min and max",
        f"trials: ep-recovery {plan.grow_trials}, seed-style and floor {plan.peer_trials}, "
        f"full-restart {plan.restart_trials}",
    ]
    return result


def _save_checkpoint(path: Path, cfg: ModelConfig) -> None:
    from reference_engine.model import save_checkpoint

    save_checkpoint(path, cfg)


def _mem_available_bytes() -> int:
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# --- the real path: a cluster of reference-engine ranks ------------------------


class _Cluster:
    """The coordinator and the ranks of one cluster; every process stopped by pid."""

    def __init__(
        self, workdir: Path, log: TextIO | None, etcd: str, ranks: int, checkpoint: Path
    ) -> None:
        self.workdir = workdir
        self.log = log
        self.etcd = etcd
        self.ranks = ranks
        self.checkpoint = checkpoint
        self.name = f"bench-stall-{ranks}-{checkpoint.stem}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.endpoint = ""
        self._channel: grpc.Channel | None = None
        self._stub: admin_pb2_grpc.AdminServiceStub | None = None
        self._generation = 0
        self._standby: list[tuple[str, str]] = []

    def __enter__(self) -> _Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        for name in list(self.procs):
            self._kill(name)

    def _kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
        proc.wait()

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{self.name}-{name}.log").open("ab") as logfile:
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
        with contextlib.suppress(OSError):
            text = (self.workdir / f"{self.name}-{name}.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def _start_coordinator(self) -> tuple[str, str]:
        """A coordinator for a fresh cluster name; returns (name, endpoint)."""
        self._generation += 1
        cluster = f"{self.name}-g{self._generation}"
        ready = self.workdir / f"{cluster}.json"
        name = f"coordinator-g{self._generation}"
        proc = self._start(
            name,
            [
                sys.executable, "-m", "coordinator",
                "--cluster", cluster, "--world-size", str(self.ranks),
                "--listen", "127.0.0.1:0", "--etcd", self.etcd,
                "--ready-file", str(ready),
            ],
        )  # fmt: skip
        self._wait(
            lambda: ready.exists() or proc.poll() is not None, FORM_TIMEOUT_S, "the coordinator"
        )
        if proc.poll() is not None:
            raise BenchError(f"coordinator exited:\n{self._log_tail(name)}")
        return cluster, f"127.0.0.1:{json.loads(ready.read_text())['listen_port']}"

    def _connect(self, endpoint: str) -> None:
        if self._channel is not None:
            self._channel.close()
        self.endpoint = endpoint
        self._channel = grpc.insecure_channel(endpoint)
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)

    def form(self, standby: int = 0) -> None:
        progress(self.log, f"stall: forming {self.ranks} ranks from {self.checkpoint.name}")
        self.cluster, endpoint = self._start_coordinator()
        # The coordinators of the full restarts start now, while the machine is
        # quiet: with the ranks spinning, a coordinator's start took over a minute.
        self._standby = [self._start_coordinator() for _ in range(standby)]
        self._connect(endpoint)
        for rank in range(self.ranks):
            self._start_rank(rank, rejoin=False)
        self._wait(lambda: self._phase() == "steady", FORM_TIMEOUT_S, "the cluster to form")

    def _start_rank(self, rank: int, rejoin: bool) -> None:
        argv = [
            sys.executable, "-m", "reference_engine.worker",
            "--cluster", self.cluster, "--rank", str(rank), "--world-size", str(self.ranks),
            "--coordinator", self.endpoint, "--etcd", self.etcd,
            "--checkpoint", str(self.checkpoint), "--lease-ttl", str(LEASE_TTL_S),
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
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:  # a rank that exited (etcd unreachable on a loaded machine, say)
                raise BenchError(
                    f"{dead[0]} exited while waiting for {what}:\n{self._log_tail(dead[0])}"
                )
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {name}.log\n{self._log_tail(name)}" for name in self.procs)
                raise BenchError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")
            time.sleep(0.02)

    def kill_and_rejoin(self, victim: int) -> tuple[float, list[float]]:
        """SIGKILL `victim`, relaunch it with --rejoin; returns the grow's stall_ms
        and each survivor's own stall from its log."""
        self._kill(f"rank{victim}")

        def removed() -> bool:
            s = self._status()
            return s is not None and victim not in s.members and PHASE_NAME[s.phase] == "degraded"

        self._wait(removed, 60, f"rank {victim} to be removed")
        status = self._status()
        seen = {op.op_id for op in status.operations} if status is not None else set()
        survivors = [r for r in range(self.ranks) if r != victim]
        before = {r: len(self._resumed(r)) for r in survivors}
        self._start_rank(victim, rejoin=True)
        found: list[admin_pb2.OperationSummary] = []

        def admitted() -> bool:
            s = self._status()
            if s is None or PHASE_NAME[s.phase] != "steady":
                return False
            found[:] = [
                op
                for op in s.operations
                if op.op_id not in seen
                and op.kind == "grow"
                and op.outcome == "completed"
                and victim in op.joined
            ]
            return bool(found)

        self._wait(admitted, FORM_TIMEOUT_S, f"rank {victim} to be admitted again")
        # A survivor logs its resume just after its ack: give the lines a moment.
        own: list[float] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            fresh = {r: self._resumed(r)[before[r] :] for r in survivors}
            if all(fresh.values()):
                own = [lines[-1] for lines in fresh.values()]
                break
            time.sleep(0.05)
        return round(found[-1].stall_ms, 2), own

    def _resumed(self, rank: int) -> list[float]:
        with contextlib.suppress(OSError):
            text = (self.workdir / f"{self.name}-rank{rank}.log").read_text(errors="replace")
            return [float(m.group(1)) for m in _RESUMED.finditer(text)]
        return []

    def full_restart(self, trial: int) -> float:
        """Kill every rank, start them all again; ms from the kill to steady."""
        # The coordinator is a standing service, not a rank: a fresh one (a fresh
        # cluster record) is up before the kill, as the old one would be.
        old = [f"coordinator-g{self.cluster.rsplit('-g', 1)[1]}"]
        cluster, endpoint = self._standby.pop(0) if self._standby else self._start_coordinator()
        started = time.perf_counter()
        for rank in range(self.ranks):
            self._kill(f"rank{rank}")
        for name in old:
            self._kill(name)
        self.cluster = cluster
        self._connect(endpoint)
        for rank in range(self.ranks):
            self._start_rank(rank, rejoin=False)
        self._wait(lambda: self._phase() == "steady", FORM_TIMEOUT_S, "the restarted cluster")
        return (time.perf_counter() - started) * 1000.0


# --- seed-style and floor: the same builders among fresh processes ------------


def _peer_stalls(
    ranks: int,
    sizes: Sequence[int],
    seed_sizes: Sequence[int],
    trials: int,
    log: TextIO | None,
) -> list[tuple[tuple[str, int], list[float]]]:
    import torch.distributed as dist

    # Hosted here, as the coordinator hosts an epoch's store.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    joiner = 1
    budget_s = 240.0 + trials * sum(mb * ranks / 20 for mb in sizes)
    args = [(ranks, joiner, tuple(sizes), tuple(seed_sizes), trials, store.port)] * ranks
    answers: list[dict[tuple[str, int], list[float]]] = run_peers(_peer, args, budget_s)
    out: list[tuple[tuple[str, int], list[float]]] = []
    keys = sorted(answers[0], key=lambda k: (k[1], k[0]))
    for key in keys:
        # Per trial, the longest survivor's figure.
        per_trial = [
            max(answers[r][key][t] for r in range(ranks) if r != joiner)
            for t in range(len(answers[0][key]))
        ]
        out.append((key, per_trial))
        shown = ", ".join(f"{v:.0f}" for v in per_trial)
        progress(log, f"stall: {key[0]} {ranks} ranks {key[1]} MiB: {shown} ms")
    return out


class _SlotAdapter:
    """The part of an EngineAdapter that execute_resync uses: sized expert slots."""

    def __init__(self, tensors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.tensors = tensors

    def expert_tensors(self, layer: int, slot: int) -> Sequence[torch.Tensor]:
        return self.tensors[(layer, slot)]

    def export_metadata(self) -> bytes:
        return json.dumps({"expert_tokens": [[0]]}).encode()

    def apply_metadata(self, blob: bytes, placement: object) -> None:
        json.loads(blob)


def _peer(
    rank: int,
    ranks: int,
    joiner: int,
    sizes: tuple[int, ...],
    seed_sizes: tuple[int, ...],
    trials: int,
    store_port: int,
) -> dict[tuple[str, int], list[float]]:
    from dataclasses import replace

    import torch.distributed as dist

    from coordinator.plan import transfer_plan
    from reference_engine.placement import build_placement
    from worker_agent.adapter import GroupSpec
    from worker_agent.groups import build_gloo_group, wait_work
    from worker_agent.resync import execute_resync

    def never() -> bool:
        return False

    store = dist.TCPStore(
        "127.0.0.1", store_port, is_master=False, wait_for_workers=False,
        timeout=timedelta(seconds=120),
    )  # fmt: skip
    everyone = tuple(range(ranks))
    survivors = tuple(r for r in everyone if r != joiner)

    def spec(epoch: int, members: tuple[int, ...]) -> GroupSpec:
        return GroupSpec(epoch, "127.0.0.1", store_port, f"bench/epoch-{epoch}/", members, 60.0)

    def groups(s: GroupSpec) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
        # The agent's group, then the engine's, as WorkerAgent's rebuild does.
        agent = build_gloo_group(s, rank, "agent", never)
        engine = build_gloo_group(
            replace(s, store_prefix=s.store_prefix + "engine/"), rank, "ep", never
        )
        return agent, engine

    def barrier(name: str) -> None:
        store.add(name, 1)
        while int(store.add(name, 0)) < ranks:
            time.sleep(0.001)

    def all_reduce_any(group: dist.ProcessGroup, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int32)
        wait_work(group.allreduce([t]), never)  # a sum: nonzero when any rank said yes
        return int(t.item())

    # The survivors have served an epoch together: their groups exist and are warm.
    old: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None
    if rank != joiner:
        old = groups(spec(1, survivors))
        all_reduce_any(old[1], 0)
    # The joiner is a started process too: one untimed build of everyone first,
    # so that no trial pays a process's first gloo build.
    barrier("warm")
    all_reduce_any(groups(spec(2, everyone))[1], 0)
    epoch = 2
    out: dict[tuple[str, int], list[float]] = {}
    for mb in sizes:
        cfg = model_config(ranks, mb)
        placement = build_placement(ranks, 1, cfg.n_experts, cfg.replicas, cfg.n_layers)
        d, h = cfg.d_model, cfg.ffn_hidden
        tensors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in range(cfg.n_layers):
            for slot in placement.slots_of_rank(rank):
                value = 0.0 if rank == joiner else float(slot + 1)
                pair = (
                    torch.full((d, h), value, dtype=torch.float64),
                    torch.full((h, d), value, dtype=torch.float64),
                )
                tensors[(layer, slot)] = pair
        adapter = _SlotAdapter(tensors)
        plan = transfer_plan(placement, survivors, [joiner])
        for _ in range(trials):
            epoch += 1
            barrier(f"go/floor/{epoch}")
            started = time.perf_counter()
            built = groups(spec(epoch, everyone))
            out.setdefault(("floor", mb), []).append((time.perf_counter() - started) * 1000.0)
            # A rank whose build returned may still be the other end of a peer's
            # handshake: nobody drops its group before everyone has built it.
            barrier(f"built/floor/{epoch}")
            del built
            if mb not in seed_sizes:
                continue
            epoch += 1
            barrier(f"go/seed/{epoch}")
            ready = f"ready/{epoch}"
            if rank == joiner:
                time.sleep(0.02)  # the survivors are serving when the joiner gets ready
                store.set(ready, "1")
                started = time.perf_counter()
            else:
                assert old is not None
                # Idle iterations, each with the seed's readiness check across ranks.
                while not all_reduce_any(old[0], int(store.check([ready]))):
                    time.sleep(0.002)
                started = time.perf_counter()  # every survivor stops at this boundary
            agent, engine = groups(spec(epoch, everyone))
            execute_resync(
                group=agent,
                rank=rank,
                members=everyone,
                plan=plan,
                metadata_source=survivors[0],
                placement=placement,
                adapter=adapter,  # type: ignore[arg-type]
                aborted=never,
            )
            all_reduce_any(engine, 1)  # the first iteration with the joiner
            out.setdefault(("seed-style", mb), []).append((time.perf_counter() - started) * 1000.0)
            if rank == joiner:
                expected = [float(t.src_slot + 1) for t in plan.receives_of(rank)]
                got = [
                    float(tensors[(t.layer, t.dst_slot)][0][0, 0]) for t in plan.receives_of(rank)
                ]
                if got != expected:
                    raise RuntimeError(f"joiner received {got}, expected {expected}")
                for pair in tensors.values():
                    for t in pair:
                        t.zero_()
        del tensors, adapter
    barrier("done")
    return out


if __name__ == "__main__":  # the smallest plan: 2 ranks, 1 MiB, one trial of each (tests)
    small = StallPlan(
        grow=((2, 1),), baselines=((2, 1),), grow_trials=1, peer_trials=1, restart_trials=1
    )
    report = run_plan(small, sys.stderr)
    print(json.dumps({"results": report.results, "notes": report.notes}))
