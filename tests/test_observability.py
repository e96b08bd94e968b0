"""The coordinator's operations surface: Prometheus /metrics, gRPC health, reflection.

Real coordinator processes against the session etcd, real sockets on loopback.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from coordinator import state_machine as sm
from coordinator.metrics import CoordinatorMetrics
from protos.ep_recovery.v1 import worker_pb2, worker_pb2_grpc
from tests.agent_harness import CoordinatorProcess, thread_cluster, wait_until

WORKER = "ep_recovery.v1.WorkerService"
ADMIN = "ep_recovery.v1.AdminService"

FAMILIES = {
    "ep_coordinator_phase_duration_seconds": "histogram",
    "ep_coordinator_grow_stall_seconds": "histogram",
    "ep_coordinator_failure_detection_seconds": "histogram",
    "ep_coordinator_operations": "counter",
    "ep_coordinator_refused_messages": "counter",
    "ep_coordinator_ranks": "gauge",
    "ep_coordinator_epoch": "gauge",
    "ep_coordinator_phase": "gauge",
}


def http_get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        conn.close()


def scrape(port: int) -> dict[str, Metric]:
    status, content_type, body = http_get(port)
    assert status == 200, body
    assert content_type.startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(body)}


def sample(families: dict[str, Metric], name: str, **labels: str) -> float | None:
    """The value of sample `name` (e.g. a counter's NAME_total) with these labels."""
    for family in families.values():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def refused_code(
    worker: worker_pb2_grpc.WorkerServiceStub, first: worker_pb2.WorkerMessage
) -> grpc.StatusCode | None:
    """Open a session with `first` and keep it open (as an agent does) until it ends."""
    done = threading.Event()

    def requests() -> Iterator[worker_pb2.WorkerMessage]:
        yield first
        done.wait(10)

    try:
        list(worker.Session(requests(), timeout=5))
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    finally:
        done.set()
    return None


def metrics_port(coord: CoordinatorProcess) -> int:
    port = int(json.loads(coord.ready_file.read_text())["metrics_port"])
    assert port > 0
    return port


@pytest.fixture
def idle_coordinator(tmp_path: Path, etcd: str, cluster_name: str) -> Iterator[CoordinatorProcess]:
    """A coordinator waiting for 2 ranks that never come, metrics on a free port."""
    coord = CoordinatorProcess(
        tmp_path, cluster_name, 2, etcd,
        "--metrics-listen", "127.0.0.1:0", "--fingerprint", "fp-1",
    )  # fmt: skip
    try:
        yield coord
    finally:
        coord.stop()


def test_health_reflection_metrics_and_refusals(idle_coordinator: CoordinatorProcess) -> None:
    coord = idle_coordinator
    port = metrics_port(coord)
    with grpc.insecure_channel(coord.endpoint) as channel:
        # grpc.health.v1: the server and both services serve; others are unknown.
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", WORKER, ADMIN):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as missing:
            health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        # Reflection lists the services (what `grpcurl -plaintext HOST:PORT list` asks).
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )
        listed = {s.name for s in replies[0].list_services_response.service}
        assert {WORKER, ADMIN, "grpc.health.v1.Health"} <= listed
        # ... and can describe them (grpcurl describe).
        replies = list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=WORKER)]),
                timeout=5,
            )
        )
        assert replies[0].file_descriptor_response.file_descriptor_proto

        # Two refused sessions: a first message that is not a hello (refused by
        # the service) and a hello with the wrong fingerprint (by the machine).
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        refused = {
            first.WhichOneof("body"): refused_code(worker, first)
            for first in (
                worker_pb2.WorkerMessage(ready=worker_pb2.JoinerReady()),
                worker_pb2.WorkerMessage(
                    hello=worker_pb2.Hello(
                        cluster=coord.status().cluster, rank=0, fingerprint="other", incarnation="x"
                    )
                ),
            )
        }
        assert refused == {
            "ready": grpc.StatusCode.INVALID_ARGUMENT,
            "hello": grpc.StatusCode.FAILED_PRECONDITION,
        }

    families = scrape(port)
    for name, kind in FAMILIES.items():
        assert name in families, name
        assert families[name].type == kind, name
    m = "ep_coordinator_"
    assert sample(families, m + "ranks", state="absent") == 2
    assert sample(families, m + "ranks", state="serving") == 0
    assert sample(families, m + "phase", phase="forming") == 1
    assert sample(families, m + "phase", phase="steady") == 0
    assert sample(families, m + "epoch") == coord.status().epoch
    refusals = m + "refused_messages"
    assert sample(families, refusals + "_total", code="INVALID_ARGUMENT") == 1
    assert sample(families, refusals + "_total", code="FAILED_PRECONDITION") == 1
    ops = m + "operations"
    assert sample(families, ops + "_total", kind="form", outcome="completed") == 0

    # Only /metrics, only GET and HEAD.
    assert http_get(port, "/")[0] == 404
    assert http_get(port, method="POST")[0] == 405
    status, _, body = http_get(port, method="HEAD")
    assert (status, body) == (200, "")


def test_health_turns_not_serving_on_shutdown(idle_coordinator: CoordinatorProcess) -> None:
    coord = idle_coordinator
    seen: list[int] = []
    with grpc.insecure_channel(coord.endpoint) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stream = health.Watch(health_pb2.HealthCheckRequest(service=ADMIN), timeout=15)

        def read() -> None:
            try:
                for reply in stream:
                    seen.append(reply.status)
            except grpc.RpcError:
                pass  # the server went away after NOT_SERVING

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_until(lambda: bool(seen), 5, "the first health status")
        os.kill(coord.proc.pid, signal.SIGTERM)
        assert coord.proc.wait(timeout=10) == 0
        reader.join(timeout=10)
        stream.cancel()
    assert seen == [
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    ]


def test_form_then_shrink(tmp_path: Path, etcd: str, cluster_name: str) -> None:
    """One form, then a rank leaves: one shrink, and the phases it went through."""
    m = "ep_coordinator_"
    ops = m + "operations_total"
    durations = m + "phase_duration_seconds"
    with thread_cluster(tmp_path, etcd, cluster_name, 3, "--metrics-listen", "127.0.0.1:0") as (
        coord,
        ranks,
    ):
        port = metrics_port(coord)
        epoch = coord.status().epoch
        formed = scrape(port)
        ranks[2].stop()
        wait_until(lambda: coord.phase() == "degraded", 20, "the shrink")
        shrunk = scrape(port)
        shrunk_epoch = coord.status().epoch

    assert sample(formed, ops, kind="form", outcome="completed") == 1
    assert sample(formed, ops, kind="shrink", outcome="completed") == 0
    assert sample(formed, m + "ranks", state="serving") == 3
    assert sample(formed, m + "phase", phase="steady") == 1
    assert sample(formed, m + "epoch") == epoch >= 1
    # A form is not a grow: no survivor stall.
    assert sample(formed, m + "grow_stall_seconds_count") == 0

    assert sample(shrunk, ops, kind="form", outcome="completed") == 1
    assert sample(shrunk, ops, kind="shrink", outcome="completed") == 1
    assert sample(shrunk, m + "ranks", state="serving") == 2
    assert sample(shrunk, m + "ranks", state="failed") == 1
    assert sample(shrunk, m + "phase", phase="degraded") == 1
    assert sample(shrunk, m + "epoch") == shrunk_epoch > epoch
    for phase in ("steady", "halting", "shrinking"):
        assert sample(shrunk, durations + "_count", phase=phase) == 1, phase


def test_metrics_from_events() -> None:
    """What the runtime feeds: stalls of completed grows only, detection latency
    only where a suspicion preceded the confirmation."""
    metrics = CoordinatorMetrics()
    metrics.observe_operation(
        sm.OperationEnded("g1", sm.OpKind.GROW, "completed", 3, (1,), (), stall_ms=40.0)
    )
    metrics.observe_operation(
        sm.OperationEnded("g2", sm.OpKind.GROW, "rolled_back", 4, (), (), stall_ms=900.0)
    )
    metrics.observe_failure(sm.RankFailed(1, "lease expired", suspected_at=10.0, at=10.5))
    metrics.observe_failure(sm.RankFailed(2, "lease expired", suspected_at=None, at=11.0))
    metrics.observe_phase(sm.Phase.PAUSING, 0.02)
    metrics.set_state(3, sm.Phase.DEGRADED, ["serving", "serving", "failed"])
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    m = "ep_coordinator_"
    assert sample(families, m + "grow_stall_seconds_sum") == 0.04
    assert sample(families, m + "grow_stall_seconds_count") == 1
    ops = m + "operations"
    assert sample(families, ops + "_total", kind="grow", outcome="rolled_back") == 1
    detect = m + "failure_detection_seconds"
    assert sample(families, detect + "_count", reason="lease expired") == 1
    assert sample(families, detect + "_sum", reason="lease expired") == 0.5
    durations = m + "phase_duration_seconds"
    assert sample(families, durations + "_sum", phase="pausing") == 0.02
    assert sample(families, m + "ranks", state="failed") == 1
    assert sample(families, m + "phase", phase="degraded") == 1
    # Each coordinator has its own registry: a second one starts from zero.
    other = {
        f.name: f for f in text_string_to_metric_families(CoordinatorMetrics().render()[0].decode())
    }
    assert sample(other, ops + "_total", kind="grow", outcome="rolled_back") == 0


@pytest.mark.parametrize("value", ["nohostport", "127.0.0.1:70000"])
def test_bad_metrics_listen_exits_2(value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "coordinator", "--cluster", "c", "--world-size", "2",
         "--metrics-listen", value],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "invalid metrics_listen" in result.stderr


def test_metrics_port_taken_exits_1(tmp_path: Path, etcd: str, cluster_name: str) -> None:
    """A metrics address that cannot be bound is a failure to serve, like the gRPC one."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ready = tmp_path / "ready.json"
        result = subprocess.run(
            [sys.executable, "-m", "coordinator", "--cluster", cluster_name, "--world-size", "2",
             "--listen", "127.0.0.1:0", "--etcd", etcd,
             "--metrics-listen", f"127.0.0.1:{port}", "--ready-file", str(ready)],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "cannot serve metrics" in result.stderr
    assert not ready.exists()


def test_grpc_port_taken_exits_1(tmp_path: Path, etcd: str, cluster_name: str) -> None:
    """The gRPC address taken: exit 1 with "cannot serve", not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "coordinator", "--cluster", cluster_name, "--world-size", "2",
             "--listen", f"127.0.0.1:{port}", "--etcd", etcd],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "cannot serve" in result.stderr
    assert "Traceback" not in result.stderr
