"""The configuration file, `check-config`, and the precedence of its layers.

Every test runs the real `python -m coordinator` process: check-config, or the
daemon itself against the session's real etcd.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from pydantic import ValidationError

from coordinator.config import CoordinatorConfig
from protos.ep_recovery.v1 import admin_pb2, admin_pb2_grpc
from tests.agent_harness import coordinator_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "examples" / "coordinator.yaml"


def coordinator(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=coordinator_env() if env is None else env,
        cwd=ROOT,
    )


def test_example_file_is_valid_and_documents_every_field() -> None:
    result = coordinator("check-config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert set(printed) == set(CoordinatorConfig.model_fields)
    CoordinatorConfig(**printed)  # what it prints is itself a valid configuration

    lines = EXAMPLE.read_text().splitlines()
    example = yaml.safe_load(EXAMPLE.read_text())
    assert set(example) == set(CoordinatorConfig.model_fields), "every field, no other key"
    for name in example:
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{name}:"))
        assert lines[index - 1].startswith("#"), f"{name} has no comment above it"


@pytest.mark.parametrize(
    ("world_size", "interval_ms", "budget", "expected_ms"),
    [
        (8, 50, 250, 50),  # small: the configured interval
        (64, 50, 250, 256),  # 64 ranks at 50 ms would be 1,280 reports/s
        (1024, 50, 250, 4096),
        (1024, 5000, 250, 5000),  # a longer configured interval stands
        (65536, 50, 250, 10_000),  # never rarer than every 10 s
    ],
)
def test_a_large_cluster_reports_progress_within_the_budget(
    world_size: int, interval_ms: int, budget: int, expected_ms: int
) -> None:
    config = CoordinatorConfig(
        cluster="c",
        world_size=world_size,
        progress_interval_ms=interval_ms,
        progress_reports_per_s=budget,
    )
    assert config.rank_progress_interval_ms == expected_ms


def test_check_config_json_output(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("cluster: c1\nworld_size: 4\nauto_rejoin: no\n")
    result = coordinator("check-config", str(path), "--format", "json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["cluster"] == "c1"
    assert doc["world_size"] == 4
    assert doc["auto_rejoin"] is False
    assert doc["listen"] == CoordinatorConfig.model_fields["listen"].default


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("cluster: c\nworld_size: 0\n", ["invalid world_size", "greater than or equal to 1"]),
        ("cluster: c\nworld_size: 4\netcd: nohostport\n", ["invalid etcd", "host:port"]),
        ("cluster: c\nworld_size: 4\nwrld_size: 4\n", ["invalid wrld_size", "unknown key"]),
        ("cluster: c\nworld_size: 4\nlog_format: xml\n", ["invalid log_format"]),
        ("cluster: [c\nworld_size: 4\n", ["not valid YAML", "line"]),
        ("- cluster: c\n- world_size: 4\n", ["top level must be a mapping", "list"]),
        ("just a string\n", ["top level must be a mapping", "str"]),
        ("cluster: c\n", ["invalid world_size", "missing"]),
        (
            "cluster: c\nworld_size: 4\nphase_deadlines_s: {pausin: 5}\n",
            ["invalid phase_deadlines_s", "pausin", "pausing"],
        ),
        (
            "cluster: c\nworld_size: 4\nphase_deadlines_s: {pausing: -1}\n",
            ["invalid phase_deadlines_s", "greater than 0"],
        ),
        ("cluster: c\nworld_size: true\n", ["invalid world_size", "a boolean is not a number"]),
        ("cluster: c\nworld_size: 4\nhold_lead_s: yes\n", ["invalid hold_lead_s", "boolean"]),
        (
            "cluster: c\nworld_size: 4\nphase_deadlines_s: {pausing: true}\n",
            ["invalid phase_deadlines_s.pausing", "a boolean is not a number"],
        ),
        ("cluster: c\nworld_size: 4\nauto_rejoin: 1\n", ["invalid auto_rejoin", "true or false"]),
        (
            "cluster: c\nworld_size: 4\nlisten: '127.0.0.1:1'\nworld_size: 8\n",
            ["invalid world_size", "duplicate key at line 4", "first at line 2"],
        ),
        (
            "cluster: c\nworld_size: 4\nphase_deadlines_s:\n  pausing: 5\n  pausing: 6\n",
            ["invalid phase_deadlines_s.pausing", "duplicate key at line 5", "first at line 4"],
        ),
        ("cluster: c\nworld_size: 4\netcd: 127.0.0.1:0\n", ["invalid etcd", "port 0"]),
        ("cluster: c\nworld_size: 4\netcd: 0.0.0.0:2379\n", ["invalid etcd", "every interface"]),
        ("cluster: c\nworld_size: 4\netcd: 10.0.0.256:2379\n", ["invalid etcd", "not a valid IP"]),
        ("cluster: c\nworld_size: 4\nlisten: '::1:50051'\n", ["invalid listen", "brackets"]),
        ("cluster: c\nworld_size: 4\nlisten: 'h:x'\n", ["invalid listen", "port must be a number"]),
        (
            "cluster: c\nworld_size: 4\nstore_host: 'not a host!!'\n",
            ["invalid store_host", "not an IP address or a host name"],
        ),
        (
            "cluster: c\nworld_size: 4\nadvertise_host: 'evil host:1/x'\n",
            ["invalid advertise_host", "not an IP address or a host name"],
        ),
    ],
    ids=[
        "bad-value",
        "bad-endpoint",
        "unknown-key",
        "bad-choice",
        "bad-yaml",
        "list-top",
        "scalar-top",
        "missing-field",
        "unknown-phase",
        "negative-deadline",
        "bool-as-int",
        "bool-as-float",
        "bool-as-deadline",
        "int-as-bool",
        "duplicate-key",
        "duplicate-nested-key",
        "etcd-port-0",
        "etcd-wildcard",
        "etcd-bad-ip",
        "listen-bare-ipv6",
        "listen-bad-port",
        "bad-store-host",
        "bad-advertise-host",
    ],
)
def test_check_config_refuses_bad_input(tmp_path: Path, content: str, expected: list[str]) -> None:
    path = tmp_path / "coordinator.yaml"
    path.write_text(content)
    result = coordinator("check-config", str(path))
    assert result.returncode == 2, result.stdout
    assert str(path) in result.stderr
    for text in expected:
        assert text in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("field", "value", "fine"),
    [
        ("listen", "[::1]:0", True),
        ("listen", "localhost:50051", True),
        ("listen", "head-1.example.:50051", True),
        ("listen", "[::1]", False),
        ("listen", "[not-v6]:1", False),
        ("listen", "-bad.example:1", False),
        ("listen", "h:99999", False),
        ("listen", "h:1\n", False),
        ("etcd", "etcd-a.example:2379", True),
        ("etcd", "127.0.0.1:65535", True),
        ("metrics_listen", "127.0.0.1:0", True),
        ("metrics_listen", "127.0.0.1:", False),
        ("store_host", "127.0.0.2", True),
        ("store_host", "::1", True),
        ("store_host", "localhost", True),
        ("store_host", "", False),
        ("store_host", "::", False),
        ("store_host", "127.0.0.1:29500", False),
        ("advertise_host", "head-1.example", True),
        ("advertise_host", "fd00::5", True),
        ("advertise_host", "10.0.0.5", True),
        ("advertise_host", "[fd00::5]", False),
        ("advertise_host", "a" * 64 + ".example", False),
        ("advertise_host", "head_1", True),
    ],
)
def test_hosts_and_addresses_are_validated(field: str, value: str, fine: bool) -> None:
    # insecure_listen: whether a host is valid, not whether it is loopback.
    values: dict[str, object] = {"cluster": "c", "world_size": 2, "insecure_listen": True}
    values[field] = value
    if field == "store_host":
        values["listen"] = "[::1]:0"  # loopback either way: store_host alone decides
    if fine:
        CoordinatorConfig(**values)  # type: ignore[arg-type]
    else:
        with pytest.raises(ValidationError) as refused:
            CoordinatorConfig(**values)  # type: ignore[arg-type]
        assert refused.value.errors()[0]["loc"] == (field,)


def test_environment_and_flags_go_through_the_same_checks(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("cluster: c1\nworld_size: 4\n")
    for var, value, field in [
        ("EP_COORDINATOR_WORLD_SIZE", "true", "world_size"),
        ("EP_COORDINATOR_AUTO_REJOIN", "2", "auto_rejoin"),
        ("EP_COORDINATOR_ETCD", "127.0.0.1:0", "etcd"),
        ("EP_COORDINATOR_ADVERTISE_HOST", "evil host:1/x", "advertise_host"),
        ("EP_COORDINATOR_STORE_HOST", "not a host!!", "store_host"),
    ]:
        result = coordinator("check-config", str(path), env=coordinator_env(**{var: value}))
        assert result.returncode == 2, (var, result.stdout)
        assert f"environment {var}: invalid {field}" in result.stderr
    for flags, field in [
        (["--etcd", "127.0.0.1:0"], "etcd"),
        (["--advertise-host", "evil host:1/x"], "advertise_host"),
        (["--store-host", "not a host!!"], "store_host"),
        (["--listen", "::1:50051"], "listen"),
    ]:
        result = coordinator("--config", str(path), *flags)
        assert result.returncode == 2, (flags, result.stdout)
        assert f"{flags[0]}: invalid {field}" in result.stderr


def test_check_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    result = coordinator("check-config", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr
    assert "No such file" in result.stderr


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("cluster: c1\nworld_size: 4\n")
    env = coordinator_env(EP_COORDINATOR_WORLD_SIZE="7", EP_COORDINATOR_LOG_LEVEL="debug")
    result = coordinator("check-config", str(path), "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["world_size"] == 7
    assert doc["log_level"] == "DEBUG"
    assert doc["cluster"] == "c1"


def test_bad_or_unknown_environment_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("cluster: c1\nworld_size: 4\n")
    bad = coordinator("check-config", str(path), env=coordinator_env(EP_COORDINATOR_WORLD_SIZE="x"))
    assert bad.returncode == 2
    assert "EP_COORDINATOR_WORLD_SIZE" in bad.stderr
    assert "invalid world_size" in bad.stderr
    unknown = coordinator(
        "check-config", str(path), env=coordinator_env(EP_COORDINATOR_WORLDSIZE="4")
    )
    assert unknown.returncode == 2
    assert "EP_COORDINATOR_WORLDSIZE" in unknown.stderr
    assert "world_size" in unknown.stderr


def test_flag_overrides_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("cluster: c1\nworld_size: 4\n")
    # A bad flag over a good environment value: the flag is what is used, and refused.
    env = coordinator_env(EP_COORDINATOR_WORLD_SIZE="4")
    result = coordinator("--config", str(path), "--world-size", "0", env=env)
    assert result.returncode == 2
    assert "--world-size" in result.stderr
    assert "invalid world_size" in result.stderr


@contextlib.contextmanager
def running(args: list[str], env: dict[str, str], ready: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the coordinator did not get ready in 30 s"
            time.sleep(0.02)
        if proc.poll() is not None:
            raise AssertionError(f"coordinator exited {proc.returncode}: {proc.communicate()[0]}")
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_daemon_runs_with_all_layers(tmp_path: Path, etcd: str, cluster_name: str) -> None:
    """File < environment < flag in the run mode, checked on the serving daemon."""
    path = tmp_path / "coordinator.yaml"
    # Nothing listens on port 1: the daemon serves only if the environment's etcd won.
    path.write_text(
        f"cluster: {cluster_name}\nworld_size: 2\netcd: '127.0.0.1:1'\nlisten: '127.0.0.1:0'\n"
    )
    ready = tmp_path / "ready.json"
    env = coordinator_env(EP_COORDINATOR_ETCD=etcd, EP_COORDINATOR_WORLD_SIZE="0")
    args = ["--config", str(path), "--world-size", "3", "--ready-file", str(ready)]
    with running(args, env, ready):
        port = json.loads(ready.read_text())["listen_port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            status = admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        assert status.cluster == cluster_name
        assert status.world_size == 3
