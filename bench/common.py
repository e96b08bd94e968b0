"""What every benchmark shares: its result, the machine record, statistics and
the readable table."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import platform
import queue
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

Scalar = str | int | float | bool | None
Record = dict[str, Scalar]


@dataclass
class BenchResult:
    """Flat records (units in the key names) and the method notes behind them."""

    results: list[Record] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def machine_info() -> dict[str, Scalar]:
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    load1: float | None = None
    with contextlib.suppress(OSError, AttributeError):
        load1 = round(os.getloadavg()[0], 2)
    memory = _meminfo()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "cores_usable": usable,
        "ram_total_bytes": memory.get("MemTotal"),
        "ram_available_bytes_at_start": memory.get("MemAvailable"),
        # Other work on a shared machine moves every figure; this says how busy it was.
        "load_avg_1min_at_start": load1,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes, by field name (empty where there is none)."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                values[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def progress(log: TextIO | None, line: str) -> None:
    if log is not None:
        log.write(f"bench: {line}\n")
        log.flush()


def render_table(name: str, machine: dict[str, Scalar], result: BenchResult, out: TextIO) -> None:
    out.write(f"== epctl bench {name} ==\n")
    out.write(
        f"machine: {machine.get('cpu_model')}, {machine.get('cores_usable')} usable core(s), "
        f"load {machine.get('load_avg_1min_at_start')}, python {machine.get('python')}, "
        f"torch {machine.get('torch')}\n\n"
    )
    columns: list[str] = []
    for record in result.results:
        columns += [k for k in record if k not in columns]
    cells = [[_cell(record.get(c)) for c in columns] for record in result.results]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")
    if result.notes:
        out.write("\n")
        for note in result.notes:
            out.write(f"- {note}\n")


def _cell(value: Scalar) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1000:
            return f"{value:.4g}"
        return f"{value:.0f}" if 0.01 <= abs(value) < 1e7 else f"{value:.3e}"
    return str(value)


class BenchError(RuntimeError):
    """The benchmark could not produce its figures (a peer failed, a deadline passed)."""


def run_peers(
    target: Callable[..., Any], args: Sequence[tuple[Any, ...]], timeout_s: float
) -> list[Any]:
    """Run `target(rank, *args[rank])` in one fresh process per rank; returns
    what each returned, by rank. Every process is killed by pid on the way out.

    Spawned, not forked: the parent has torch (and its thread pools) loaded,
    and a fork of that is not a clean process to measure in.
    """
    ctx = mp.get_context("spawn")
    answers: mp.Queue[tuple[int, bool, Any]] = ctx.Queue()
    procs = [
        ctx.Process(target=_peer_main, args=(target, rank, a, answers), daemon=True)
        for rank, a in enumerate(args)
    ]
    try:
        for proc in procs:
            proc.start()
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < len(procs):
            try:
                rank, ok, payload = answers.get(timeout=0.2)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise BenchError(
                        f"peer pid {dead[0].pid} exited with {dead[0].exitcode}"
                    ) from None
                if time.monotonic() > deadline:
                    raise BenchError(f"peers gave no answer within {timeout_s:.0f} s") from None
                continue
            if not ok:
                raise BenchError(f"peer {rank} failed:\n{payload}")
            out[rank] = payload
        for proc in procs:
            proc.join(timeout=10)
        return [out[rank] for rank in range(len(procs))]
    finally:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                proc.kill()
            if proc.pid is not None:
                proc.join(timeout=5)
        answers.close()


def _peer_main(
    target: Callable[..., Any],
    rank: int,
    args: tuple[Any, ...],
    answers: mp.Queue[tuple[int, bool, Any]],
) -> None:
    try:
        answers.put((rank, True, target(rank, *args)))
    except BaseException:
        answers.put((rank, False, traceback.format_exc()))
