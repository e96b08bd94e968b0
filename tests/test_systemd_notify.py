"""systemd notify: the real daemon talks to a NOTIFY_SOCKET this test creates.

The test plays systemd's part: it binds an AF_UNIX datagram socket, starts
`python -m coordinator` with NOTIFY_SOCKET and WATCHDOG_USEC in its
environment, and reads what arrives.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.systemd_notify import SystemdNotifier, socket_address, watchdog_interval_s
from tests.agent_harness import ThreadRank, coordinator_env

ROOT = Path(__file__).resolve().parent.parent
STEADY = re.compile(r"STATUS=role=leader phase=steady epoch=[1-9][0-9]*")


class NotifyListener:
    """The receiving end of sd_notify: collects datagrams as lists of lines."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[list[str]] = []

    def lines(self) -> list[str]:
        return [line for message in self.messages for line in message]

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append(data.decode().split("\n"))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[NotifyListener, str]]:
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:  # sun_path holds 108 bytes
        path = Path(tempfile.mkdtemp(prefix="ep-notify-")) / "n.sock"
    server = NotifyListener(str(path))
    try:
        yield server, str(path)
    finally:
        server.close()
        path.unlink(missing_ok=True)


def test_daemon_notifies_ready_status_watchdog_and_stopping(
    listener: tuple[NotifyListener, str], tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    server, path = listener
    ready_file = tmp_path / "ready.json"
    log = (tmp_path / "coordinator.log").open("w")
    argv = [
        sys.executable, "-m", "coordinator",
        "--cluster", cluster_name, "--world-size", "1",
        "--listen", "127.0.0.1:0", "--etcd", etcd,
        "--ready-file", str(ready_file),
    ]  # fmt: skip
    # 200 ms watchdog: pings every 100 ms.
    env = coordinator_env(NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        server.wait_for(lambda: "READY=1" in server.lines(), 30, "READY=1")
        # READY=1 comes once the daemon serves: the ready file is already there.
        assert ready_file.exists()
        ready_message = next(m for m in server.messages if "READY=1" in m)
        status = [line for line in ready_message if line.startswith("STATUS=")]
        assert status == ["STATUS=role=leader phase=forming epoch=0"]

        def watchdogs() -> int:
            return server.lines().count("WATCHDOG=1")

        server.wait_for(lambda: watchdogs() >= 2, 10, "two WATCHDOG=1")
        seen = watchdogs()
        server.wait_for(lambda: watchdogs() >= seen + 2, 10, "the watchdog to go on")

        # A phase change updates STATUS=: the one rank forms the cluster.
        port = json.loads(ready_file.read_text())["listen_port"]
        rank = ThreadRank(0, 1, f"127.0.0.1:{port}", etcd, cluster_name).start()
        try:
            server.wait_for(
                lambda: any(STEADY.fullmatch(line) for line in server.lines()), 30, "steady"
            )
        finally:
            rank.stop()

        os.kill(proc.pid, signal.SIGTERM)
        server.wait_for(lambda: "STOPPING=1" in server.lines(), 15, "STOPPING=1")
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_daemon_skips_a_watchdog_meant_for_another_pid(
    listener: tuple[NotifyListener, str], tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    server, path = listener
    argv = [
        sys.executable, "-m", "coordinator",
        "--cluster", cluster_name, "--world-size", "2",
        "--listen", "127.0.0.1:0", "--etcd", etcd,
    ]  # fmt: skip
    env = coordinator_env(NOTIFY_SOCKET=path, WATCHDOG_USEC="100000", WATCHDOG_PID="1")
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT
    )
    try:
        server.wait_for(lambda: "READY=1" in server.lines(), 30, "READY=1")
        os.kill(proc.pid, signal.SIGTERM)
        server.wait_for(lambda: "STOPPING=1" in server.lines(), 15, "STOPPING=1")
        assert proc.wait(timeout=15) == 0
        # 50 ms pings would have come by now had the daemon taken pid 1's watchdog.
        assert "WATCHDOG=1" not in server.lines()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_abstract_namespace_socket() -> None:
    name = f"ep-notify-test-{uuid.uuid4().hex}"
    server = NotifyListener("\0" + name)
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@" + name})
    try:
        assert notifier.ready("role=leader phase=steady epoch=3")
        assert notifier.stopping()
        server.wait_for(lambda: len(server.messages) >= 2, 5, "two datagrams")
        assert server.messages == [
            ["READY=1", "STATUS=role=leader phase=steady epoch=3"],
            ["STOPPING=1"],
        ]
    finally:
        notifier.close()
        server.close()


def test_no_notify_socket_is_a_no_op() -> None:
    notifier = SystemdNotifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert notifier.watchdog_interval_s is None


def test_unreachable_socket_does_not_raise(tmp_path: Path) -> None:
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    notifier.close()


def test_environment_parsing() -> None:
    assert socket_address("@name") == "\0name"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("relative/path") is None
    assert socket_address("vsock:2:1234") is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "10000000"}, pid=42) == 5.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "42"}, pid=42) == 5.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "7"}, pid=42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "junk"}, pid=42) is None
    assert watchdog_interval_s({}, pid=42) is None
