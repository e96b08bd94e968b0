"""Running `epctl demo` and `epctl soak` as a user does, in a subprocess.

Each run gets TMPDIR pointed into the test's directory, so everything it
creates (its etcd data dir, checkpoint, ready files) is named under that path:
after it exits, no process may still mention it and the directory must be
empty again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def pids_mentioning(path: Path) -> list[int]:
    found = []
    needle = str(path).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue  # exited while we looked
    return found


def epctl_env(tmp: Path) -> dict[str, str]:
    tmp.mkdir()
    return {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}


def run_epctl(tmp_path: Path, *args: str, timeout: float = 240) -> tuple[int, str, str]:
    """`epctl ARGS` in a subprocess with TMPDIR under `tmp_path`; checks that it
    left no process and no file behind."""
    tmp = tmp_path / "tmp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "epctl.cli", *args],
        env=epctl_env(tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert pids_mentioning(tmp) == [], "epctl left processes behind"
    assert list(tmp.iterdir()) == [], "epctl left files in its temporary dir"
    return proc.returncode, out, err


def last_json(out: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    assert lines, "no output"
    report = json.loads(lines[-1])
    assert isinstance(report, dict)
    return report
