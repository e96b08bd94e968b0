"""The operations surface end to end: Drain, Admit, ListOperations, GetOperation
and WatchEvents against a coordinator process with real etcd, real gRPC and
real agents (tests/agent_harness.py), through epctl where an operator would
use it. Plus the pure parts of epctl (trace, Gantt chart, endpoint) on their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from epctl import admin, trace
from epctl.cli import main as epctl_main
from protos.ep_recovery.v1 import admin_pb2, common_pb2
from tests.agent_harness import ThreadRank, thread_cluster, wait_until

WORLD = 4


def epctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epctl.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def rank_status(status: admin_pb2.ClusterStatus, rank: int) -> admin_pb2.RankStatus:
    [found] = [r for r in status.ranks if r.rank == rank]
    return found


def phase_of(event: admin_pb2.ClusterEvent) -> str:
    return common_pb2.Phase.Name(event.phase.phase).removeprefix("PHASE_").lower()


def is_subsequence(wanted: list[str], seen: list[str]) -> bool:
    it = iter(seen)
    return all(any(x == w for x in it) for w in wanted)


def test_drain_a_rank_serve_with_three_then_admit_it_back(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    with thread_cluster(tmp_path, etcd, cluster_name, WORLD) as (coord, ranks):
        at = ("--endpoint", coord.endpoint)
        leaving = ranks[3]

        # Drain rank 3: everyone holds at one boundary, 0-2 go on without it.
        drained = epctl("drain", "3", "--wait", "--request-id", "drain-3", "-o", "json", *at)
        assert drained.returncode == 0, drained.stderr + coord.log_tail()
        reply = json.loads(drained.stdout)
        drain_op = reply["op_id"]
        assert drain_op.endswith("-drain") and reply["outcome"] == "completed", reply
        status = coord.status()
        assert list(status.members) == [0, 1, 2] and coord.phase() == "degraded"
        assert rank_status(status, 3).state == admin_pb2.RANK_STATE_DRAINED
        # Its engine was told to stop and did, cleanly: not a failure.
        wait_until(lambda: not leaving._thread.is_alive(), 20, "the drained engine to stop")
        assert leaving.agent.drained and leaving.error is None
        marks = {r: ranks[r].adapter.iteration for r in (0, 1, 2)}
        wait_until(
            lambda: all(ranks[r].adapter.iteration >= marks[r] + 20 for r in (0, 1, 2)),
            30,
            "ranks 0-2 to serve on without rank 3",
        )
        for r in (0, 1, 2):
            assert ranks[r].adapter.members == (0, 1, 2)
            assert ranks[r].adapter.epoch == status.epoch
        ranks.pop(3).stop()  # its agent has stopped already: this joins its threads

        # Retried with the same request id: the first answer, nothing changes.
        again = epctl("drain", "3", "--request-id", "drain-3", "-o", "json", *at)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout) == {
            "request_id": "drain-3",
            "message": reply["message"],
            "replayed": True,
            "op_id": drain_op,
        }
        assert coord.status().epoch == status.epoch

        # Relaunched, it registers and gets ready, but waits for an Admit even
        # though automatic rejoin is on.
        joiner = ThreadRank(3, WORLD, coord.endpoint, etcd, cluster_name, rejoin=True)
        ranks[3] = joiner.start()
        wait_until(lambda: rank_status(coord.status(), 3).ready, 30, "rank 3 to be ready")
        status = coord.status()
        assert rank_status(status, 3).state == admin_pb2.RANK_STATE_JOINING
        assert coord.phase() == "degraded" and not status.HasField("operation")
        shown = epctl("status", *at)
        assert shown.returncode == 0 and "joining (ready)" in shown.stdout

        admitted = epctl("admit", "3", "--wait", "-o", "json", *at)
        assert admitted.returncode == 0, admitted.stderr + coord.log_tail()
        grow_op = json.loads(admitted.stdout)["op_id"]
        assert grow_op.endswith("-grow") and json.loads(admitted.stdout)["outcome"] == "completed"
        assert coord.phase() == "steady" and list(coord.status().members) == [0, 1, 2, 3]
        wait_until(lambda: joiner.adapter.iteration >= 10, 30, "rank 3 to serve again")
        assert joiner.adapter.experts_ok()  # its experts came from healthy peers

        # Refusals, by exit code: bad rank 2, not a member 4, wrong state 5.
        outside = epctl("drain", "7", *at)
        assert outside.returncode == 2 and "rank 7 is outside the cluster" in outside.stderr
        member = epctl("admit", "1", *at)
        assert member.returncode == 5 and "already a member" in member.stderr

        # The operations, newest first.
        listed = epctl("ops", "-o", "json", *at)
        assert listed.returncode == 0, listed.stderr
        ops = json.loads(listed.stdout)["operations"]
        assert [(o["kind"], o["outcome"]) for o in ops] == [
            ("grow", "completed"),
            ("drain", "completed"),
            ("form", "completed"),
        ]
        assert [o["opId"] for o in ops[:2]] == [grow_op, drain_op]
        assert (ops[0]["joining"], ops[1]["leaving"], ops[1]["left"]) == ([3], [3], [3])
        newest = epctl("ops", "--limit", "1", "-o", "json", *at)
        assert [o["opId"] for o in json.loads(newest.stdout)["operations"]] == [grow_op]
        table = epctl("ops", *at)
        assert table.returncode == 0 and drain_op in table.stdout and "OPERATION" in table.stdout
        negative = epctl("ops", "--limit", "-1", *at)
        assert negative.returncode == 2 and "limit" in negative.stderr

        # One operation's timeline, as a table, JSON, a trace and a chart.
        trace_file, png_file = tmp_path / "drain.json", tmp_path / "drain.png"
        shown = epctl("timeline", drain_op, "--trace", str(trace_file), "--png", str(png_file), *at)
        assert shown.returncode == 0, shown.stderr
        assert "pausing" in shown.stdout and "shrinking" in shown.stdout
        assert "rank 3" in shown.stdout
        doc = json.loads(trace_file.read_text())
        tracks = {
            e["args"]["name"]: e["tid"] for e in doc["traceEvents"] if e["name"] == "thread_name"
        }
        assert set(tracks) == {"coordinator", "rank 0", "rank 1", "rank 2", "rank 3"}
        spans: dict[str, list[str]] = {name: [] for name in tracks}
        by_tid = {tid: name for name, tid in tracks.items()}
        for e in doc["traceEvents"]:
            if e["ph"] == "X":
                assert e["dur"] >= 0 and e["ts"] >= 0
                spans[by_tid[e["tid"]]].append(e["name"])
        assert spans["coordinator"] == ["pausing", "shrinking"]
        for r in (0, 1, 2):
            assert spans[f"rank {r}"] == ["hold", "rebuild", "resume"], spans
        assert spans["rank 3"] == ["hold"]  # then it was told to leave
        assert png_file.read_bytes().startswith(b"\x89PNG")
        as_json = epctl("timeline", drain_op, "-o", "json", *at)
        detail = json.loads(as_json.stdout)
        assert detail["summary"]["kind"] == "drain" and len(detail["ranks"]) == 4 + 3 + 3
        unknown = epctl("timeline", "no-such-op", *at)
        assert unknown.returncode == 4 and "no-such-op" in unknown.stderr

        # No failure was recorded along the way: draining is not failing.
        assert not coord.status().failures


def test_watch_streams_a_recovery_as_it_happens(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    with thread_cluster(tmp_path, etcd, cluster_name, WORLD) as (coord, ranks):
        at = ("--endpoint", coord.endpoint)

        # epctl watch: the snapshot, then two admin calls, then it exits.
        watcher = subprocess.Popen(
            [sys.executable, "-m", "epctl.cli", "watch", "--count", "2", "-o", "json", *at],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        assert watcher.stdout is not None
        pump = threading.Thread(target=lambda: lines.extend(watcher.stdout or ()), daemon=True)
        pump.start()
        try:
            wait_until(lambda: len(lines) >= 1, 30, "the watch's snapshot")
            for state in ("off", "on"):
                done = epctl("auto-rejoin", state, "--request-id", f"w-{state}", *at)
                assert done.returncode == 0, done.stderr
            assert watcher.wait(timeout=30) == 0, watcher.stderr
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait()
        pump.join(timeout=10)
        events = [json.loads(line) for line in lines]
        assert "snapshot" in events[0] and events[0]["snapshot"]["cluster"] == cluster_name
        calls = [e["adminCall"] for e in events[1:]]
        assert [(c["method"], c["arguments"], c["code"]) for c in calls] == [
            ("SetAutoRejoin", "enabled=False", "OK"),
            ("SetAutoRejoin", "enabled=True", "OK"),
        ]
        # The table form, for a person; --timeout ends it.
        table = epctl("watch", "--timeout", "1", *at)
        assert table.returncode == 0, table.stderr
        assert "snapshot" in table.stdout and f"cluster {cluster_name}" in table.stdout

        # A recovery seen through the stream: rank 2 goes away and comes back.
        received: list[admin_pb2.ClusterEvent] = []
        stream = coord.admin.WatchEvents(admin_pb2.WatchEventsRequest())

        def collect() -> None:
            try:
                for event in stream:
                    received.append(event)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.CANCELLED

        reader = threading.Thread(target=collect, daemon=True)
        reader.start()
        try:
            wait_until(lambda: len(received) >= 1, 30, "the snapshot")
            ranks.pop(2).stop()
            wait_until(lambda: coord.phase() == "degraded", 30, "the shrink without rank 2")
            ranks[2] = ThreadRank(2, WORLD, coord.endpoint, etcd, cluster_name, rejoin=True)
            ranks[2].start()

            def grown() -> bool:
                events = list(received)
                ends = [
                    i
                    for i, e in enumerate(events)
                    if e.WhichOneof("body") == "operation_ended"
                    and e.operation_ended.kind == "grow"
                    and e.operation_ended.outcome == "completed"
                ]
                # The phase after an operation is published after its end.
                return bool(ends) and any(
                    e.WhichOneof("body") == "phase" and phase_of(e) == "steady"
                    for e in events[ends[0] :]
                )

            wait_until(grown, 60, "the grow's end and the steady phase on the stream")
        finally:
            stream.cancel()
            reader.join(timeout=10)
        assert not reader.is_alive()

        first, rest = received[0], received[1:]
        assert first.WhichOneof("body") == "snapshot"
        assert first.snapshot.phase == common_pb2.PHASE_STEADY
        # Every event once, in order, right after the snapshot.
        assert [e.seq for e in rest] == list(range(first.seq + 1, first.seq + 1 + len(rest)))
        phases = [phase_of(e) for e in rest if e.WhichOneof("body") == "phase"]
        recovery = ["halting", "shrinking", "degraded", "admitting", "rebuilding", "pausing"]
        recovery += ["resyncing", "resuming", "steady"]
        assert is_subsequence(recovery, phases), phases
        failed = [e.rank_failed for e in rest if e.WhichOneof("body") == "rank_failed"]
        assert [f.rank for f in failed] == [2] and failed[0].reason
        started = [e.operation_started for e in rest if e.WhichOneof("body") == "operation_started"]
        ended = [e.operation_ended for e in rest if e.WhichOneof("body") == "operation_ended"]
        assert (started[0].kind, list(started[0].leaving)) == ("shrink", [2])
        assert started[0].outcome == "running"
        assert any(s.kind == "grow" and list(s.joining) == [2] for s in started)
        assert (ended[0].kind, ended[0].outcome) == ("shrink", "completed")
        assert ended[-1].op_id == started[-1].op_id

        # GetOperation of what the stream announced; an unknown id is NOT_FOUND.
        detail = coord.admin.GetOperation(
            admin_pb2.GetOperationRequest(op_id=ended[-1].op_id), timeout=5
        )
        assert detail.summary.kind == "grow" and detail.summary.outcome == "completed"
        steps = {(r.rank, r.step) for r in detail.ranks}
        assert (2, "wait_ready") in steps and {(r, "hold") for r in (0, 1, 3)} <= steps
        with pytest.raises(grpc.RpcError) as missing:
            coord.admin.GetOperation(admin_pb2.GetOperationRequest(op_id="nope"), timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


# --- the pure parts --------------------------------------------------------------


def _detail() -> admin_pb2.OperationDetail:
    """A drain of rank 3 out of 0-3, started at t0 = 1000 s."""
    t0 = 1_000_000.0
    detail = admin_pb2.OperationDetail(
        summary=admin_pb2.OperationSummary(
            op_id="c-000002-drain",
            kind="drain",
            outcome="completed",
            epoch=2,
            start_unix_ms=t0,
            end_unix_ms=t0 + 30.0,
            survivors=[0, 1, 2],
            leaving=[3],
            left=[3],
        )
    )
    detail.phases.add(
        phase=common_pb2.PHASE_PAUSING, start_unix_ms=t0, end_unix_ms=t0 + 10.0, epoch=1
    )
    detail.phases.add(
        phase=common_pb2.PHASE_SHRINKING, start_unix_ms=t0 + 10.0, end_unix_ms=t0 + 30.0, epoch=2
    )
    for r in range(4):
        detail.ranks.add(
            rank=r, step="hold", start_unix_ms=t0, end_unix_ms=t0 + 5.0 + r, outcome="done"
        )
    detail.ranks.add(
        rank=1, step="rebuild", start_unix_ms=t0 + 10, end_unix_ms=t0 + 20, outcome="failed"
    )
    return detail


def test_trace_has_one_track_per_rank_and_the_coordinators_phases() -> None:
    doc = trace.chrome_trace(_detail())
    json.dumps(doc)  # serializable as is
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert names == {0: "coordinator", 1: "rank 0", 2: "rank 1", 3: "rank 2", 4: "rank 3"}
    complete = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    pausing = next(e for e in complete if e["name"] == "pausing")
    assert (pausing["tid"], pausing["ts"], pausing["dur"], pausing["cat"]) == (
        0,
        0.0,
        10000.0,
        "phase",
    )
    failed = next(e for e in complete if e["name"] == "rebuild")
    assert (failed["tid"], failed["ts"], failed["args"]) == (2, 10000.0, {"outcome": "failed"})
    assert doc["otherData"]["op_id"] == "c-000002-drain"


def test_gantt_chart_is_a_png_and_needs_matplotlib_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "op.png"
    trace.gantt_png(_detail(), path)
    assert path.read_bytes().startswith(b"\x89PNG")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(trace.MissingDependency, match="needs matplotlib"):
        trace.gantt_png(_detail(), tmp_path / "again.png")


def test_endpoint_comes_from_the_flag_the_environment_or_the_daemons_config(
    tmp_path: Path,
) -> None:
    config = tmp_path / "coordinator.yaml"
    config.write_text("cluster: a\nworld_size: 2\nlisten: 0.0.0.0:6000\n")
    resolve = admin.resolve_endpoint
    assert resolve(None, None, {}) == "127.0.0.1:50051"
    assert resolve(None, config, {}) == "127.0.0.1:6000"  # a wildcard: reached on loopback
    assert resolve(None, config, {"EP_COORDINATOR_LISTEN": "10.1.2.3:7000"}) == "10.1.2.3:7000"
    env = {"EPCTL_ENDPOINT": "h:1", "EP_COORDINATOR_LISTEN": "10.1.2.3:7000"}
    assert resolve(None, config, env) == "h:1"
    assert resolve("flag:2", config, env) == "flag:2"
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [unclosed\n")
    with pytest.raises(admin.UsageError, match="not valid YAML"):
        resolve(None, bad, {})


def test_epctl_admin_commands_exit_3_when_the_coordinator_is_unreachable(
    free_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    at = ["--endpoint", f"127.0.0.1:{free_port}"]
    commands: list[list[str]] = [
        ["ops"],
        ["timeline", "x"],
        ["watch"],
        ["drain", "1"],
        ["admit", "1"],
    ]
    for command in commands:
        assert epctl_main([*command, *at]) == 3, command
        assert "UNAVAILABLE" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("- not a mapping\n")
    assert epctl_main(["ops", "--config", str(bad)]) == 2
    assert "top level must be a mapping" in capsys.readouterr().err
