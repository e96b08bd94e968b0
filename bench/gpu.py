"""`python3 -m bench.gpu`: the GPU path on one lent GPU (issue 6).

Three measurements, one run, one JSON object on the last line of stdout:

1. hook: the idle hook `WorkerAgent.at_boundary(i)` (the real one, on an
   agent in its post-resume state, as `bench.hook` builds it) against the
   seed's per-iteration check, a device-to-host copy of a small
   `active_ranks` int tensor (`.item()` and `.cpu()`), each run after every
   replay of a CUDA-graph-captured MoE-like decode step. Modes take turns
   batch by batch; the step-only mode runs twice, so its spread is the noise.
2. nccl: ProcessGroupNCCL of world size 1 on a TCPStore hosted here, one
   store prefix per epoch: build, eager connect, all_reduce, abort, and the
   next epoch's group again.
3. h2d: expert bytes "received" (a host copy, as `recv_into` would write them)
   into pinned staging slots of 64 MiB and copied to the device with
   non_blocking copies on a side stream, double-buffered; against the
   device's pinned host-to-device bound (one copy of the whole size) measured
   in the same run.

Exits 2 with a message when there is no CUDA device.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist

# NVLink multicast stays off on the lent machines (KINDS.md); the aborts below
# are ours to make, so the watchdog aborts the communicator only (groups.md).
for _key, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2"),
):
    os.environ.setdefault(_key, _value)

MiB = 1 << 20
SLOT_BYTES = 64 * MiB
WORLD_FLAGS = 8


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


# --- 1. the hook against a device-to-host check ------------------------------------


class MoEStep:
    """A small MoE-like decode step: per layer an attention-sized projection
    pair, a router with top-2 gates, and `active` experts (SwiGLU) run densely
    on all tokens, weighted by their gates. bf16; weights stream from HBM."""

    def __init__(
        self, layers: int, batch: int = 64, d_model: int = 4096, ffn: int = 1408, experts: int = 64
    ) -> None:
        dev = torch.device("cuda")
        g = torch.Generator(device=dev).manual_seed(1234 + layers)
        self.active = 8
        self.layers = layers

        def w(*shape: int) -> torch.Tensor:
            scale = shape[-2] ** -0.5
            return (torch.randn(*shape, device=dev, generator=g) * scale).to(torch.bfloat16)

        self.w_in = [w(d_model, d_model) for _ in range(layers)]
        self.w_out = [w(d_model, d_model) for _ in range(layers)]
        self.w_router = [w(d_model, experts) for _ in range(layers)]
        self.w_up = [w(self.active, d_model, 2 * ffn) for _ in range(layers)]
        self.w_down = [w(self.active, ffn, d_model) for _ in range(layers)]
        self.x = torch.randn(batch, d_model, device=dev, generator=g).to(torch.bfloat16)
        # The seed's per-rank flags; the step writes them, as a step that saw
        # a rank fail would.
        self.active_ranks = torch.ones(WORLD_FLAGS, dtype=torch.int32, device=dev)
        self.weight_bytes = sum(
            t.numel() * t.element_size()
            for ts in (self.w_in, self.w_out, self.w_router, self.w_up, self.w_down)
            for t in ts
        )

    def __call__(self) -> torch.Tensor:
        h = self.x
        for i in range(self.layers):
            a = torch.nn.functional.silu(h @ self.w_in[i]) @ self.w_out[i]
            h = h + a
            logits = (h @ self.w_router[i]).float()
            top, idx = torch.topk(logits, 2, dim=-1)
            gates = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))
            g = gates[:, : self.active].t().unsqueeze(-1).to(h.dtype)  # [E, B, 1]
            up = torch.bmm(h.unsqueeze(0).expand(self.active, -1, -1), self.w_up[i])
            gate_part, lin = up.chunk(2, dim=-1)
            down = torch.bmm(torch.nn.functional.silu(gate_part) * lin, self.w_down[i])
            h = h + (down * g).sum(0)
        self.active_ranks.copy_((h[:WORLD_FLAGS, 0] == h[:WORLD_FLAGS, 0]).to(torch.int32))
        return h


def _capture(step: MoEStep) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, float]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    # Correct first: the replay against an eager run, in float64 terms.
    graph.replay()
    ref = step()
    torch.cuda.synchronize()
    diff = (out.double() - ref.double()).norm() / ref.double().norm()
    rel = float(diff)
    if not torch.isfinite(out).all() or rel > 1e-2:
        raise RuntimeError(f"graph replay differs from eager run: rel error {rel}")
    return graph, out, rel


def measure_hook(layers: int, batches: int, steps: int) -> dict[str, Any]:
    from bench.hook import _idle_agent
    from worker_agent.agent import NEVER

    step = MoEStep(layers)
    graph, _out, rel = _capture(step)
    agent = _idle_agent()
    flags = step.active_ranks
    sink: list[int] = [0]

    def none(_i: int) -> None:
        pass

    def item(_i: int) -> None:
        sink[0] += int(flags[0].item())

    def cpu(_i: int) -> None:
        sink[0] += int(flags.cpu()[0])

    modes: dict[str, Callable[[int], None]] = {
        "step": none,
        "step_hook": agent.at_boundary,
        "step_d2h_item": item,
        "step_d2h_cpu": cpu,
        "step_again": none,
    }
    wall: dict[str, list[float]] = {m: [] for m in modes}
    gpu: dict[str, list[float]] = {m: [] for m in modes}
    start_ev = torch.cuda.Event(enable_timing=True)
    end_ev = torch.cuda.Event(enable_timing=True)
    iteration = 0
    for round_ in range(batches + 2):
        for name, check in modes.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter_ns()
            start_ev.record()
            for _ in range(steps):
                graph.replay()
                check(iteration)
                iteration += 1
            end_ev.record()
            end_ev.synchronize()
            t1 = time.perf_counter_ns()
            if round_ >= 2:  # two warm-up rounds
                wall[name].append((t1 - t0) / steps)
                gpu[name].append(start_ev.elapsed_time(end_ev) * 1e6 / steps)
    if agent._hold_at != NEVER or not agent._admitted:
        raise RuntimeError("the hook left its idle path: the figure would be wrong")
    if sink[0] == 0:
        raise RuntimeError("the device-to-host checks read nothing")

    # The hook alone, as a CPU cost (batches of 10,000 calls, no device work).
    hook_alone: list[float] = []
    for _ in range(200):
        t0 = time.perf_counter_ns()
        for i in range(iteration, iteration + 10_000):
            agent.at_boundary(i)
        hook_alone.append((time.perf_counter_ns() - t0) / 10_000)
        iteration += 10_000
    item_alone: list[float] = []
    for _ in range(200):
        t0 = time.perf_counter_ns()
        for _ in range(100):
            flags[0].item()
        item_alone.append((time.perf_counter_ns() - t0) / 100)

    base_wall = _median(wall["step"])
    base_gpu = _median(gpu["step"])
    records = []
    for name in modes:
        w_ns = _median(wall[name])
        records.append(
            {
                "layers": layers,
                "mode": name,
                "steps": steps * batches,
                "wall_ns_per_step_p50": round(w_ns, 1),
                "wall_ns_per_step_min": round(min(wall[name]), 1),
                "wall_ns_per_step_max": round(max(wall[name]), 1),
                "event_ns_per_step_p50": round(_median(gpu[name]), 1),
                "added_wall_ns_p50": round(w_ns - base_wall, 1),
                "added_share_of_step": round((w_ns - base_wall) / base_wall, 5),
            }
        )
    return {
        "layers": layers,
        "weight_bytes": step.weight_bytes,
        "graph_vs_eager_rel_err": rel,
        "step_event_ns_p50": round(base_gpu, 1),
        "step_wall_ns_p50": round(base_wall, 1),
        "hook_alone_ns_p50": round(_median(hook_alone), 1),
        "hook_alone_share_of_step": round(_median(hook_alone) / base_wall, 7),
        "item_alone_idle_device_ns_p50": round(_median(item_alone), 1),
        "modes": records,
    }


# --- 2. NCCL groups of one epoch, aborted and rebuilt -------------------------------


def measure_nccl(epochs: int) -> dict[str, Any]:
    if not dist.is_nccl_available():
        return {"available": False}
    device = torch.device("cuda", 0)
    base = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    out: list[dict[str, Any]] = []
    abort_api = ""
    for epoch in range(1, epochs + 1):
        rec: dict[str, Any] = {"epoch": epoch}
        t0 = time.perf_counter()
        store = dist.PrefixStore(f"epoch-{epoch}/nccl/", base)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=60)
        backend = dist.ProcessGroupNCCL(store, 0, 1, opts)
        # The backend serves the ProcessGroup calls made here (as gloo's does in
        # worker_agent.groups); the stubs only know them on ProcessGroup.
        pg = cast(dist.ProcessGroup, backend)
        t1 = time.perf_counter()
        rec["construct_ms"] = round((t1 - t0) * 1e3, 3)
        connect = getattr(backend, "eager_connect_single_device", None)
        if connect is not None:
            connect(device)
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        rec["eager_connect_ms"] = round((t2 - t1) * 1e3, 3) if connect is not None else None
        value = torch.full((1024,), float(epoch), device=device)
        pg.allreduce([value]).wait()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        rec["first_allreduce_ms"] = round((t3 - t2) * 1e3, 3)
        rec["allreduce_ok"] = bool((value == float(epoch)).all())
        steady: list[float] = []
        for _ in range(200):
            s0 = time.perf_counter_ns()
            pg.allreduce([value]).wait()
            torch.cuda.synchronize()
            steady.append((time.perf_counter_ns() - s0) / 1e3)
        rec["allreduce_us_p50"] = round(_median(steady[20:]), 2)
        # The abort a survivor makes: the communicator only, never a destroy.
        t4 = time.perf_counter()
        for name in ("abort", "_abort"):
            fn = getattr(backend, name, None)
            if fn is not None:
                fn()
                abort_api = f"ProcessGroupNCCL.{name}()"
                break
        else:
            raise RuntimeError("ProcessGroupNCCL has no abort method")
        t5 = time.perf_counter()
        rec["abort_ms"] = round((t5 - t4) * 1e3, 3)
        rec["rebuild_total_ms"] = round(((t1 - t0) + (t3 - t1)) * 1e3, 3)
        del pg, backend
        out.append(rec)
    return {
        "available": True,
        "nccl_version": ".".join(str(v) for v in torch.cuda.nccl.version()),
        "abort_api": abort_api,
        "async_error_handling": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"),
        "epochs": out,
    }


# --- 3. resync bytes into device memory ---------------------------------------------


def measure_h2d(sizes_mib: list[int], repeats: dict[int, int]) -> list[dict[str, Any]]:
    staging = [torch.empty(SLOT_BYTES, dtype=torch.uint8).pin_memory() for _ in range(2)]
    records: list[dict[str, Any]] = []
    for size_mib in sizes_mib:
        records += _h2d_one_size(size_mib, repeats[size_mib], staging)
    return records


def _h2d_one_size(size_mib: int, repeats: int, staging: list[torch.Tensor]) -> list[dict[str, Any]]:
    device = torch.device("cuda", 0)
    copy_stream = torch.cuda.Stream()
    done = [torch.cuda.Event() for _ in range(2)]
    total = size_mib * MiB
    slots = max(1, total // SLOT_BYTES)
    # Random bytes, as a peer's expert weights would be (never zeros).
    src = torch.randint(0, 256, (total,), dtype=torch.uint8, device=device).cpu()
    big_pinned = src.pin_memory()
    dst = torch.empty(total, dtype=torch.uint8, device=device)

    def bounds(s: int) -> tuple[int, int]:
        return s * SLOT_BYTES, min(total, (s + 1) * SLOT_BYTES)

    def staged() -> None:
        for s in range(slots):
            b = s % 2
            done[b].synchronize()  # the slot's last copy to the device is over
            lo, hi = bounds(s)
            staging[b][: hi - lo].copy_(src[lo:hi])  # what recv_into writes
            with torch.cuda.stream(copy_stream):
                dst[lo:hi].copy_(staging[b][: hi - lo], non_blocking=True)
                done[b].record(copy_stream)
        copy_stream.synchronize()

    def slots_from_pinned() -> None:
        with torch.cuda.stream(copy_stream):
            for s in range(slots):
                lo, hi = bounds(s)
                dst[lo:hi].copy_(big_pinned[lo:hi], non_blocking=True)
        copy_stream.synchronize()

    def bound() -> None:
        with torch.cuda.stream(copy_stream):
            dst.copy_(big_pinned, non_blocking=True)
        copy_stream.synchronize()

    def host_fill() -> None:
        for s in range(slots):
            lo, hi = bounds(s)
            staging[s % 2][: hi - lo].copy_(src[lo:hi])

    def pageable() -> None:
        dst.copy_(src)
        torch.cuda.synchronize()

    methods: dict[str, Callable[[], None]] = {
        "staged_h2d": staged,
        "h2d_per_slot_from_pinned": slots_from_pinned,
        "h2d_pinned_bound": bound,
        "host_fill_only": host_fill,
        "h2d_pageable_blocking": pageable,
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    check_step = max(1, total // (1 << 16))
    for rep in range(repeats + 1):
        for name, fn in methods.items():
            writes_device = name != "host_fill_only"
            if writes_device:
                dst.fill_(0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
            if writes_device and rep == 0:
                same = torch.equal(dst[::check_step].cpu(), src[::check_step])
                same = same and torch.equal(dst[-4096:].cpu(), src[-4096:])
                if not same:
                    raise RuntimeError(f"{name}: device bytes differ at {size_mib} MiB")
            if rep > 0:  # the first repeat warms up and checks
                times[name].append(elapsed)
    bound_p50 = _median(times["h2d_pinned_bound"])
    records: list[dict[str, Any]] = []
    for name, ts in times.items():
        p50 = _median(ts)
        records.append(
            {
                "size_mib": size_mib,
                "method": name,
                "repeats": len(ts),
                "ms_p50": round(p50 * 1e3, 3),
                "gb_per_s_p50": round(total / p50 / 1e9, 2),
                "gb_per_s_best": round(total / min(ts) / 1e9, 2),
                "of_bound_p50": round(bound_p50 / p50, 3),
            }
        )
    return records


# --- entry ---------------------------------------------------------------------------


def _device_info() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    driver = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.strip()
    return {
        "device": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }


def main() -> int:
    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    quick = "--quick" in sys.argv[1:]
    torch.backends.cuda.matmul.allow_tf32 = False
    report: dict[str, Any] = {"bench": "gpu", "quick": quick, "machine": _device_info()}
    batches, steps = (5, 100) if quick else (20, 100)
    report["hook"] = [measure_hook(layers, batches, steps) for layers in (4, 1)]
    for h in report["hook"]:
        for r in h["modes"]:
            print(
                f"hook L={r['layers']} {r['mode']:<15} wall {r['wall_ns_per_step_p50']:>10.0f} "
                f"ns/step  event {r['event_ns_per_step_p50']:>10.0f}  "
                f"added {r['added_wall_ns_p50']:>8.0f} ns ({r['added_share_of_step']:.2%})",
                flush=True,
            )
    report["nccl"] = measure_nccl(3)
    print(f"nccl: {json.dumps(report['nccl'])}", flush=True)
    sizes = [64, 1024]
    report["h2d"] = measure_h2d(sizes, {64: 5, 1024: 2} if quick else {64: 20, 1024: 5})
    for r in report["h2d"]:
        print(
            f"h2d {r['size_mib']:>5} MiB {r['method']:<26} {r['ms_p50']:>9.2f} ms "
            f"{r['gb_per_s_p50']:>7.2f} GB/s  of bound {r['of_bound_p50']:.3f}",
            flush=True,
        )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
