"""Command-line output into a pipe that its reader closed early.

`epctl status | head -1`: once `head` has its line it exits, and the next
write (or the flush at exit) fails with EPIPE. Python ignores SIGPIPE, so
that is a BrokenPipeError traceback, or an "Exception ignored" at exit,
instead of the quiet end a Unix tool has there. `quiet_in_pipes` gives the
quiet end to the commands of `epctl` and `ep-coordinator check-config`.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
from collections.abc import Callable
from typing import TextIO

# What a shell reports for a tool that SIGPIPE ended (128 + 13): the status
# `set -o pipefail` sees from `yes | head -1`, too.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def quiet_in_pipes(run: Callable[[], int]) -> int:
    """`run()`'s exit code; EXIT_BROKEN_PIPE, with nothing more written, when
    its output went to a pipe nobody reads any more."""
    try:
        try:
            return run()
        finally:
            # Here, not at exit, where a closed pipe can no longer be handled.
            sys.stdout.flush()
    except BrokenPipeError:
        _drop_closed_output()
        return EXIT_BROKEN_PIPE


def _drop_closed_output() -> None:
    """Point stdout, and stderr if it is the closed one, at /dev/null, so
    the flush at exit has nowhere to fail (its error would be printed)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        _to_devnull(sys.stdout, devnull, always=True)
        _to_devnull(sys.stderr, devnull, always=False)
    finally:
        os.close(devnull)


def _to_devnull(stream: TextIO, devnull: int, *, always: bool) -> None:
    try:
        stream.flush()
        if not always:
            return
    except OSError:
        pass  # this one is closed; what it still buffers goes nowhere now
    # A stream that is no file (replaced by a test's capture) stays as it is.
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        os.dup2(devnull, stream.fileno())
