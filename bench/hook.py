"""`epctl bench hook`: the idle iteration hook against seed-style checks.

The hook is the real `WorkerAgent.at_boundary`. The agent is constructed but
not started: the idle hot path reads only `_iteration` and `_hold_at`, never
the agent's thread, etcd or the coordinator, so starting them would measure
nothing more. It is put in the state a completed `resume` leaves behind
(admitted, nothing pending), which is the state a serving rank spends its life
in.

The seed checked, every iteration, whether a relaunched rank was ready: a
small collective across ranks and a device-to-host copy of a per-rank flag
tensor. Their CPU analogues are measured in the same run:
- a 1-element all_reduce over gloo between 2 processes on loopback (the honest
  one: a check across ranks needs a peer), and over a group of 1 (the floor:
  gloo with no peer to wait for);
- `.item()` of a 1-element tensor and `.tolist()` of a per-rank flag tensor.
  On CPU these are plain reads; on a GPU the same call is a device sync, so
  these figures understate the seed's cost there.

Figures are per call, from batches: the time of a batch of calls divided by
its calls (a call of tens of ns is below the clock's resolution); p50 and p90
over batches, mean over all calls. Local methods take turns batch by batch, so
load from other work on the machine falls on all of them alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TextIO, cast

import torch
import torch.distributed as dist

from bench.common import (
    BenchError,
    BenchResult,
    Record,
    median,
    percentile,
    progress,
    run_peers,
)
from protos.types import Placement
from worker_agent.adapter import GroupSpec
from worker_agent.agent import NEVER, AgentConfig, WorkerAgent
from worker_agent.groups import build_gloo_group

WORLD_FLAGS = 8  # one health flag per rank, as the seed's active-ranks tensor


def run(quick: bool, log: TextIO | None = None) -> BenchResult:
    batches = 200 if quick else 2000
    peer_batches = 50 if quick else 500
    result = BenchResult()

    progress(log, f"hook: {batches} batches of each in-process method")
    local = _measure_local(batches)
    progress(log, f"hook: gloo all_reduce between 2 processes, {peer_batches} batches")
    local["allreduce_gloo_2proc"] = _measure_two_process_allreduce(peer_batches)

    hook_p50 = median(local["agent_hook_idle"][1])
    for method, (calls, per_call) in local.items():
        where, what = _DESCRIPTIONS[method]
        p50 = median(per_call)
        record: Record = {
            "method": method,
            "where": where,
            "calls_per_batch": calls,
            "batches": len(per_call),
            "ns_per_call_p50": round(p50, 1),
            "ns_per_call_mean": round(sum(per_call) / len(per_call), 1),
            "ns_per_call_p90": round(percentile(per_call, 90), 1),
            "times_hook_p50": round(p50 / hook_p50, 1),
            "measures": what,
        }
        result.results.append(record)
        progress(log, f"hook: {method}: {p50:.1f} ns/call (p50)")
    result.notes += [
        "agent_hook_idle: WorkerAgent.at_boundary(i) on a constructed agent in its "
        "post-resume state (admitted, _hold_at = NEVER): the engine's idle hot path",
        "python_call_floor: a no-op function called in the same loop; the part of "
        "every figure that is Python's loop and call, not the check",
        "allreduce_gloo_2proc: rank 0's figure; both processes loop the same count",
        "tensor_item/tensor_tolist: CPU reads; a GPU device-to-host copy also syncs the "
        "device, so the seed paid more than these",
        "ns_per_call_p50/p90: over batches of (batch time / calls); mean: all time / all calls",
    ]
    return result


_DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "agent_hook_idle": ("in-process", "WorkerAgent.at_boundary, nothing pending"),
    "python_call_floor": ("in-process", "no-op function, same loop"),
    "tensor_item": ("in-process", "1-element int32 tensor .item()"),
    "tensor_tolist": ("in-process", f"{WORLD_FLAGS}-element flag tensor .tolist()"),
    "allreduce_gloo_1proc": ("in-process", "gloo all_reduce, group of 1"),
    "allreduce_gloo_2proc": ("2 processes, loopback", "gloo all_reduce, group of 2"),
}


def _idle_agent() -> WorkerAgent:
    agent = WorkerAgent(
        # Never contacted: the agent is not started.
        AgentConfig(cluster="bench", rank=0, coordinator="127.0.0.1:1", etcd="127.0.0.1:1"),
        _IdleAdapter(),
    )
    # Setting a renamed attribute would only add a new one, and the hook would
    # then block in its slow path: refuse instead.
    if not (hasattr(agent, "_admitted") and hasattr(agent, "_hold_at")):
        raise BenchError("WorkerAgent no longer has _admitted/_hold_at: update bench.hook")
    # What the `resume` command leaves: admitted, and no hold target.
    agent._admitted = True
    agent._hold_at = NEVER
    return agent


def _measure_local(batches: int) -> dict[str, tuple[int, list[float]]]:
    agent = _idle_agent()
    flag = torch.ones(1, dtype=torch.int32)
    flags = torch.ones(WORLD_FLAGS, dtype=torch.int32)
    solo = _gloo_group(dist.HashStore(), 0, 1)
    one = torch.ones(1)

    # Batches of 1 to 10 ms: long enough for the clock, short enough that a
    # preemption spoils one batch, not the figure.
    loops: dict[str, tuple[int, Callable[[int, int], int]]] = {
        "agent_hook_idle": (10_000, lambda start, n: _loop_int(agent.at_boundary, start, n)),
        "python_call_floor": (10_000, lambda start, n: _loop_int(_noop, start, n)),
        "tensor_item": (1_000, lambda _start, n: _loop_void(flag.item, n)),
        "tensor_tolist": (1_000, lambda _start, n: _loop_void(flags.tolist, n)),
        "allreduce_gloo_1proc": (100, lambda _start, n: _allreduce_loop(solo, one, n)),
    }
    per_call: dict[str, list[float]] = {name: [] for name in loops}
    iteration = 0
    for round_ in range(batches + 1):
        for name, (calls, loop) in loops.items():
            elapsed_ns = loop(iteration, calls)
            iteration += calls
            if round_ > 0:  # the first round warms caches and allocators
                per_call[name].append(elapsed_ns / calls)
    if agent._hold_at != NEVER or not agent._admitted:
        raise BenchError("the hook left its idle path: the figure would be wrong")
    return {name: (loops[name][0], values) for name, values in per_call.items()}


def _noop(iteration: int) -> None:
    pass


def _loop_int(fn: Callable[[int], object], start: int, n: int) -> int:
    t0 = time.perf_counter_ns()
    for i in range(start, start + n):
        fn(i)
    return time.perf_counter_ns() - t0


def _loop_void(fn: Callable[[], object], n: int) -> int:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return time.perf_counter_ns() - t0


def _allreduce_loop(group: dist.ProcessGroup, tensor: torch.Tensor, n: int) -> int:
    buf = [tensor]
    t0 = time.perf_counter_ns()
    for _ in range(n):
        group.allreduce(buf).wait()
    return time.perf_counter_ns() - t0


def _gloo_group(store: dist.Store, rank: int, size: int) -> dist.ProcessGroup:
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    opts._timeout = timedelta(seconds=60)
    # The gloo backend serves the ProcessGroup calls made here (as in worker_agent.groups).
    return cast(dist.ProcessGroup, dist.ProcessGroupGloo(store, rank, size, opts))


def _measure_two_process_allreduce(batches: int) -> tuple[int, list[float]]:
    calls = 100
    # Hosted here, as the coordinator hosts the epoch store, so neither peer is special.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    answers = run_peers(
        _allreduce_peer, [(store.port, calls, batches)] * 2, timeout_s=120 + batches
    )
    return calls, cast(list[float], answers[0])


def _allreduce_peer(rank: int, store_port: int, calls: int, batches: int) -> list[float]:
    spec = GroupSpec(
        epoch=1,
        store_host="127.0.0.1",
        store_port=store_port,
        store_prefix="bench-hook/",
        members=(0, 1),
        timeout_s=60.0,
    )
    group = build_gloo_group(spec, rank, "allreduce", lambda: False)
    one = torch.ones(1)
    out: list[float] = []
    for round_ in range(batches + 1):
        elapsed_ns = _allreduce_loop(group, one, calls)
        if round_ > 0:
            out.append(elapsed_ns / calls)
    return out


class _IdleAdapter:
    """An EngineAdapter the idle hook never calls; every method says so."""

    def _unused(self) -> RuntimeError:
        return RuntimeError("the idle hook called the engine adapter")

    def fingerprint(self) -> str:
        raise self._unused()

    def placement(self) -> Placement:
        raise self._unused()

    def abort_collectives(self, epoch: int) -> None:
        raise self._unused()

    def rebuild_groups(self, spec: GroupSpec) -> None:
        raise self._unused()

    def expert_tensors(self, layer: int, slot: int) -> Sequence[torch.Tensor]:
        raise self._unused()

    def export_metadata(self) -> bytes:
        raise self._unused()

    def apply_metadata(self, blob: bytes, placement: Placement) -> None:
        raise self._unused()

    def reload_experts(self, placement: Placement) -> int:
        raise self._unused()

    def reset_state(self, epoch: int, iteration: int, members: Sequence[int]) -> None:
        raise self._unused()
