"""An operation's timeline as a Chrome/Perfetto trace and as a Gantt chart.

Both take the `OperationDetail` that GetOperation returns: the coordinator's
phases on one track, and one track per rank the operation concerned, each
with its part of every step (from the command sent to its answer). Times are
milliseconds since the operation started.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protos.ep_recovery.v1 import admin_pb2, common_pb2

COORDINATOR_TRACK = "coordinator"


class MissingDependency(RuntimeError):
    """An optional package (matplotlib) is not installed."""


@dataclass(frozen=True)
class Span:
    track: str
    name: str
    start_ms: float  # since the operation's start
    end_ms: float
    args: dict[str, Any]


def phase_name(phase: int) -> str:
    return common_pb2.Phase.Name(phase).removeprefix("PHASE_").lower()


def tracks_of(detail: admin_pb2.OperationDetail) -> list[str]:
    """The coordinator's track, then one per rank in rank order."""
    s = detail.summary
    ranks = set(s.survivors) | set(s.joining) | set(s.leaving) | {r.rank for r in detail.ranks}
    return [COORDINATOR_TRACK, *(f"rank {r}" for r in sorted(ranks))]


def spans_of(detail: admin_pb2.OperationDetail, now_unix_ms: float | None = None) -> list[Span]:
    """Every span of the operation, relative to its start. A phase still open
    (the operation runs) ends at the operation's end, or now."""
    s = detail.summary
    t0 = s.start_unix_ms or min(
        [p.start_unix_ms for p in detail.phases] + [r.start_unix_ms for r in detail.ranks],
        default=0.0,
    )
    open_end = s.end_unix_ms or (now_unix_ms if now_unix_ms is not None else time.time() * 1000.0)
    spans = [
        Span(
            COORDINATOR_TRACK,
            phase_name(p.phase),
            p.start_unix_ms - t0,
            (p.end_unix_ms or open_end) - t0,
            {"epoch": p.epoch},
        )
        for p in detail.phases
    ]
    spans += [
        Span(
            f"rank {r.rank}",
            r.step,
            r.start_unix_ms - t0,
            r.end_unix_ms - t0,
            {"outcome": r.outcome},
        )
        for r in detail.ranks
    ]
    return spans


def chrome_trace(detail: admin_pb2.OperationDetail) -> dict[str, Any]:
    """The Trace Event Format (chrome://tracing, ui.perfetto.dev): one process
    for the operation, one thread (track) per rank plus the coordinator's."""
    s = detail.summary
    tids = {name: i for i, name in enumerate(tracks_of(detail))}
    events: list[dict[str, Any]] = [
        {
            "ph": "M",
            "name": "process_name",
            "pid": 1,
            "tid": 0,
            "args": {"name": f"operation {s.op_id} ({s.kind}, {s.outcome})"},
        }
    ]
    for name, tid in tids.items():
        events.append(
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": name}}
        )
        # Without a sort index viewers order tracks by first event, not by rank.
        events.append(
            {
                "ph": "M",
                "name": "thread_sort_index",
                "pid": 1,
                "tid": tid,
                "args": {"sort_index": tid},
            }
        )
    for span in spans_of(detail):
        events.append(
            {
                "ph": "X",
                "name": span.name,
                "cat": "phase" if span.track == COORDINATOR_TRACK else "step",
                "pid": 1,
                "tid": tids[span.track],
                "ts": round(span.start_ms * 1000.0, 3),  # microseconds
                "dur": round(max(span.end_ms - span.start_ms, 0.0) * 1000.0, 3),
                "args": span.args,
            }
        )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "op_id": s.op_id,
            "kind": s.kind,
            "outcome": s.outcome,
            "start_unix_ms": s.start_unix_ms,
        },
    }


def gantt_png(detail: admin_pb2.OperationDetail, path: Path) -> None:
    """A Gantt chart of the same tracks, written as PNG. Needs matplotlib
    (a dev extra); imported here only, so the CLI works without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write files only
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependency(
            "--png needs matplotlib, which is not installed (pip install matplotlib, "
            "or install ep-recovery with its dev extras)"
        ) from exc
    tracks = tracks_of(detail)
    spans = spans_of(detail)
    names = sorted({span.name for span in spans})
    palette = plt.get_cmap("tab10")
    colors = {name: palette(i % 10) for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.45 * len(tracks)))
    try:
        for span in spans:
            row = tracks.index(span.track)
            width = max(span.end_ms - span.start_ms, 0.0)
            failed = span.args.get("outcome") == "failed"
            ax.barh(
                row,
                width,
                left=span.start_ms,
                height=0.6,
                color=colors[span.name],
                edgecolor="red" if failed else "black",
                linewidth=1.5 if failed else 0.3,
            )
        ax.set_yticks(range(len(tracks)), labels=tracks)
        ax.invert_yaxis()  # the coordinator on top, then ranks in order
        ax.set_xlabel("ms since the operation started")
        s = detail.summary
        ax.set_title(f"{s.op_id}  ({s.kind}, {s.outcome})")
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[n]) for n in names]
        ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
