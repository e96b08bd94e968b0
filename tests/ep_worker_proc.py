"""One rank of the multi-process reference-engine tests (run as a script).

The test process plays coordinator and frontend through its TCPStore:
  answer/<id>, count/<id>   written by a rank when it releases a request
  abort/1                   set by the first survivor that fails: releases the
                            others (a watcher thread aborts epoch 1)
  failed/<rank>             a survivor's failure: kind, last completed iteration, time
  plan                      the test's answer: cut, epoch-2 members, requests to adopt
  killed_at                 written by the rank that kills itself, just before
  stop                      every rank exits
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from reference_engine.adapter import ReferenceEngineAdapter
from reference_engine.config import ModelConfig
from reference_engine.engine import EPEngine
from reference_engine.ep import CollectiveFailed, EPGroup, StepAborted
from reference_engine.model import derive_weights
from reference_engine.placement import build_placement
from reference_engine.requests import make_requests
from worker_agent.adapter import GroupSpec

HOST = "127.0.0.1"
GROUP_TIMEOUT_S = 20.0  # far above the tests' detection deadline: a hang shows


def store_client(port: int) -> dist.TCPStore:
    return dist.TCPStore(
        HOST, port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=30)
    )


def die_mid_iteration(group: EPGroup, engine: EPEngine, store: dist.TCPStore, at: int) -> None:
    """SIGKILL this rank in iteration `at`, after the first MoE layer's dispatch:
    peers have sent it rows and wait for the results."""
    real = group.alltoall
    calls = 0

    def alltoall(rows: torch.Tensor, send: Sequence[int], recv: Sequence[int]) -> torch.Tensor:
        nonlocal calls
        if engine.iteration == at:
            calls += 1
            if calls == 3:
                store.set("killed_at", repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
        return real(rows, send, recv)

    group.alltoall = alltoall  # type: ignore[method-assign,assignment]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--requests", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--die-at", type=int, default=-1)
    args = p.parse_args()
    torch.set_num_threads(1)
    rank, world = args.rank, args.world_size

    store = store_client(args.port)
    cfg = ModelConfig()
    placement = build_placement(world, 1, cfg.n_experts, cfg.replicas, cfg.n_layers)

    def answer(request_id: int, tokens: tuple[int, ...]) -> None:
        store.set(f"answer/{request_id}", json.dumps(tokens))
        store.add(f"count/{request_id}", 1)

    engine = EPEngine(cfg, rank, world, placement, derive_weights(cfg), on_complete=answer)
    adapter = ReferenceEngineAdapter(engine, cfg)
    requests = {r.id: r for r in make_requests(args.seed, args.requests)}
    for request in requests.values():
        if request.id % world == rank:
            engine.submit(request)

    def spec(epoch: int, members: tuple[int, ...]) -> GroupSpec:
        return GroupSpec(epoch, HOST, args.port, f"epoch-{epoch}/", members, GROUP_TIMEOUT_S)

    members = tuple(range(world))
    adapter.rebuild_groups(spec(1, members))
    adapter.reset_state(1, 0, members)
    if args.die_at >= 0:
        assert engine.group is not None
        die_mid_iteration(engine.group, engine, store, args.die_at)

    def watch() -> None:
        # Its own client: the main thread's may be blocked in a store call.
        watcher = store_client(args.port)
        while not watcher.check(["stop"]):
            if watcher.check(["abort/1"]):
                adapter.abort_collectives(1)
            time.sleep(0.002)
        # Peers leave at different iterations: release whatever waits on them.
        adapter.abort_collectives(1 << 30)

    threading.Thread(target=watch, daemon=True).start()

    while not store.check(["stop"]):
        try:
            engine.step()
        except (StepAborted, CollectiveFailed) as exc:
            failed_at = time.time()
            if store.check(["stop"]):
                break
            store.set("abort/1", str(rank))
            report = {"kind": type(exc).__name__, "iteration": engine.iteration, "t": failed_at}
            store.set(f"failed/{rank}", json.dumps(report))
            store.wait(["plan"], timedelta(seconds=30))
            plan = json.loads(store.get("plan"))
            members = tuple(plan["members"])
            adapter.rebuild_groups(spec(2, members))
            adapter.reset_state(2, plan["cut"], members)
            for request_id in plan["adopt"].get(str(rank), []):
                engine.submit(requests[request_id])
    sys.stdout.flush()
    # Skip interpreter teardown: destroying an abandoned gloo group whose worker
    # still waits on the dead peer would block until the group timeout.
    os._exit(0)


if __name__ == "__main__":
    main()
