"""`ep-coordinator` refuses bad configuration with exit 2 and names the field."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--cluster", "c", "--world-size", "0"], "world_size"),
        (["--cluster", "bad name!", "--world-size", "4"], "cluster"),
        (["--cluster", "c", "--world-size", "4", "--etcd", "nohostport"], "etcd"),
        (["--cluster", "c", "--world-size", "4", "--listen", "h:99999"], "listen"),
        (["--cluster", "c", "--world-size", "4", "--log-level", "loud"], "log_level"),
        ([], "cluster"),
    ],
)
def test_bad_config_exits_2_naming_the_field(args: list[str], field: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "coordinator", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"invalid {field}" in result.stderr
