"""Commands whose reader goes away (`epctl status | head -1`) end quietly.

Each command runs as a real process whose stdout (or stderr) is a pipe with
its read end already closed: its first write there fails with EPIPE, as a
write after `head` exited does, only every time rather than when the race
goes that way. It must exit EXIT_BROKEN_PIPE (141, what a shell reports for
a tool that SIGPIPE ended) and print nothing, no BrokenPipeError traceback
and no "Exception ignored" at exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.pipes import EXIT_BROKEN_PIPE
from protos.ep_recovery.v1 import admin_pb2
from tests.agent_harness import coordinator_env, thread_cluster

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "examples" / "coordinator.yaml"


def into_closed_pipe(*argv: str, stream: str = "stdout") -> subprocess.CompletedProcess[str]:
    """Run `python argv...` with `stream` ("stdout" or "stderr") a pipe nobody
    reads; the other one is captured."""
    read, write = os.pipe()
    os.close(read)
    try:
        other = "stderr" if stream == "stdout" else "stdout"
        return subprocess.run(
            [sys.executable, *argv],
            text=True,
            timeout=60,
            cwd=ROOT,
            env=coordinator_env(),
            **{stream: write, other: subprocess.PIPE},  # type: ignore[call-overload]
        )
    finally:
        os.close(write)


def assert_quiet(result: subprocess.CompletedProcess[str], stream: str = "stdout") -> None:
    captured = result.stderr if stream == "stdout" else result.stdout
    assert (result.returncode, captured) == (EXIT_BROKEN_PIPE, ""), result


def test_check_config_ends_quietly() -> None:
    assert EXIT_BROKEN_PIPE == 141  # what a shell reports for `yes | head -1`'s yes
    assert_quiet(into_closed_pipe("-m", "coordinator", "check-config", str(EXAMPLE)))
    json_output = ("-m", "coordinator", "check-config", str(EXAMPLE), "--format", "json")
    assert_quiet(into_closed_pipe(*json_output))


def test_epctl_without_a_coordinator_ends_quietly() -> None:
    assert_quiet(into_closed_pipe("-m", "epctl.cli", "demo", "--list-phases"))


def test_epctl_commands_end_quietly(tmp_path: Path, etcd: str, cluster_name: str) -> None:
    with thread_cluster(tmp_path, etcd, cluster_name, 2) as (coord, _ranks):
        ops = coord.admin.ListOperations(admin_pb2.ListOperationsRequest(), timeout=5)
        form = ops.operations[-1].op_id  # the cluster's forming, its first operation
        at = ("--endpoint", coord.endpoint)
        for command in [
            ("status",),
            ("status", "-o", "json"),
            ("ops",),
            ("ops", "-o", "json"),
            ("timeline", form),
            ("timeline", form, "-o", "json"),
            ("watch", "--timeout", "10"),
            ("watch", "--timeout", "10", "-o", "json"),
            ("auto-rejoin", "off"),
            ("auto-rejoin", "on", "-o", "json"),
        ]:
            assert_quiet(into_closed_pipe("-m", "epctl.cli", *command, *at))
        # An error message into a closed stderr (`2>&1 | head -0`): quiet too.
        missing = into_closed_pipe("-m", "epctl.cli", "abort", "no-such-op", *at, stream="stderr")
        assert_quiet(missing, stream="stderr")


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_refusal_into_a_closed_pipe_ends_quietly(stream: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: c\nworld_size: true\n")
    result = into_closed_pipe("-m", "coordinator", "check-config", str(bad), stream=stream)
    if stream == "stdout":
        # Nothing goes to stdout: the refusal is exit 2 on stderr, as ever.
        assert result.returncode == 2 and "invalid world_size" in result.stderr
    else:
        assert_quiet(result, stream="stderr")
