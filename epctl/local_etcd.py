"""A throwaway single-member etcd on loopback ports, for tests and the demo.

    with LocalEtcd() as etcd:
        client = aetcd.Client(*etcd.host_port)

The server runs with `--heartbeat-interval 50 --election-timeout 500`, which
lets it grant 1 s leases (the default timings grant 2 s at least). Everything
it writes (data and its log) lives in one temporary directory that stop()
removes. restart() and kill() keep that directory, for fault injection.

The API is synchronous. start() and restart() block until /health answers
(about 0.1 to 1 s); async callers that must keep their loop running meanwhile
(lease keepalives) call them through asyncio.to_thread.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from coordinator.logs import fields

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
SETUP_HINT = "run `make setup` (it installs etcd-server 3.4 with apt) or pass binary=<path>"

# Instances with a live server, so an interpreter that exits without stop()
# (an exception escaping a test session, a sys.exit in the demo) still
# takes its etcd with it.
_LIVE: weakref.WeakSet[LocalEtcd] = weakref.WeakSet()


class LocalEtcdError(RuntimeError):
    """etcd could not be found, started or made healthy."""


def free_port(host: str = HOST) -> int:
    """A port that was free a moment ago on `host`.

    Racy by nature (someone may take it before we bind it again); start()
    retries with new ports when etcd reports the address in use.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _resolve_binary(binary: str) -> str:
    if os.sep in binary:
        if os.path.isfile(binary) and os.access(binary, os.X_OK):
            return binary
        raise LocalEtcdError(
            f"etcd binary {binary!r} does not exist or is not executable; {SETUP_HINT}"
        )
    found = shutil.which(binary)
    if found is None:
        raise LocalEtcdError(f"etcd binary {binary!r} is not on PATH; {SETUP_HINT}")
    return found


class LocalEtcd:
    """One etcd process on 127.0.0.1 with a temporary data dir."""

    def __init__(
        self,
        *,
        binary: str = "etcd",
        name: str = "ep-recovery",
        startup_timeout_s: float = 15.0,
        stop_timeout_s: float = 5.0,
        heartbeat_interval_ms: int = 50,
        election_timeout_ms: int = 500,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = binary
        self.name = name
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.election_timeout_ms = election_timeout_ms
        self.extra_args = tuple(extra_args)
        self._workdir: Path | None = None
        self._client_port = 0
        self._peer_port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # --- properties -----------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """`127.0.0.1:PORT`, the form the coordinator's and agents' --etcd take."""
        self._require_ports()
        return f"{HOST}:{self._client_port}"

    @property
    def host_port(self) -> tuple[str, int]:
        self._require_ports()
        return HOST, self._client_port

    @property
    def client_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def peer_port(self) -> int:
        self._require_ports()
        return self._peer_port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def data_dir(self) -> Path:
        return self._require_workdir() / "data"

    @property
    def log_path(self) -> Path:
        return self._require_workdir() / "etcd.log"

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> LocalEtcd:
        """Start etcd and wait for /health. After kill() it starts again on the
        same ports and data; otherwise it takes fresh ports and a fresh dir."""
        if self.running:
            raise LocalEtcdError(f"etcd is already running (pid {self.pid})")
        binary = _resolve_binary(self.binary)
        if self._workdir is not None:
            self._launch(binary)
            return self
        self._workdir = Path(tempfile.mkdtemp(prefix="ep-recovery-etcd-"))
        attempts = 3
        for attempt in range(1, attempts + 1):
            self._client_port, self._peer_port = self._two_free_ports()
            try:
                self._launch(binary)
                return self
            except LocalEtcdError:
                # Only a lost race for a port is worth a second try.
                if attempt == attempts or "address already in use" not in self.log_tail():
                    self._discard_workdir()
                    raise
                log.warning(
                    "etcd port taken between pick and bind, retrying",
                    extra=fields(attempt=attempt, client_port=self._client_port),
                )
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Terminate (SIGTERM, then SIGKILL after stop_timeout_s) and remove the
        data dir. Safe to call twice and after kill()."""
        self._terminate(signal.SIGTERM)
        self._discard_workdir()

    def restart(self) -> None:
        """Stop gracefully and start again on the same ports and data: clients
        see their connections drop, and the keys and leases come back."""
        self._require_workdir()
        self._terminate(signal.SIGTERM)
        self._launch(_resolve_binary(self.binary))

    def kill(self) -> None:
        """SIGKILL, keeping the data dir (start() or restart() brings it back)."""
        self._require_workdir()
        self._terminate(signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        if self._workdir is None:
            return ""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> LocalEtcd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"{HOST}:{self._client_port}" if self._client_port else "no ports"
        return f"LocalEtcd({where}, pid={self.pid}, running={self.running})"

    # --- internals --------------------------------------------------------------

    def _require_ports(self) -> None:
        if not self._client_port:
            raise LocalEtcdError("LocalEtcd has not been started")

    def _require_workdir(self) -> Path:
        if self._workdir is None:
            raise LocalEtcdError("LocalEtcd has not been started")
        return self._workdir

    @staticmethod
    def _two_free_ports() -> tuple[int, int]:
        # Both sockets are open together, so the kernel cannot hand out one port twice.
        with (
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as a,
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as b,
        ):
            a.bind((HOST, 0))
            b.bind((HOST, 0))
            return a.getsockname()[1], b.getsockname()[1]

    def _argv(self, binary: str) -> list[str]:
        client = f"http://{HOST}:{self._client_port}"
        peer = f"http://{HOST}:{self._peer_port}"
        return [
            binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--heartbeat-interval", str(self.heartbeat_interval_ms),
            "--election-timeout", str(self.election_timeout_ms),
            "--logger", "zap",
            *self.extra_args,
        ]  # fmt: skip

    def _launch(self, binary: str) -> None:
        argv = self._argv(binary)
        # etcd reads ETCD_* variables as flags and refuses to start when one
        # shadows a flag we pass; a developer's shell may export some.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        with self.log_path.open("ab") as logfile:
            # Own session: a Ctrl-C in the terminal reaches only our process,
            # whose cleanup then stops etcd, instead of killing it underneath us.
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        _LIVE.add(self)
        try:
            self._wait_healthy()
        except BaseException:
            self._terminate(signal.SIGKILL)
            raise
        log.info(
            "local etcd healthy",
            extra=fields(endpoint=self.endpoint, pid=self.pid, data_dir=str(self.data_dir)),
        )

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        url = f"{self.client_url}/health"
        # An http_proxy in the environment must not swallow loopback requests.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + self.startup_timeout_s
        last_answer = "no answer"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise LocalEtcdError(
                    f"etcd exited with code {code} during startup "
                    f"(ports {self._client_port}/{self._peer_port}); log tail:\n{self.log_tail()}"
                )
            try:
                with opener.open(url, timeout=0.5) as resp:
                    body = resp.read()
                if json.loads(body).get("health") == "true":
                    return
                last_answer = body.decode(errors="replace")
            except (OSError, ValueError) as exc:
                # OSError covers URLError, refused connections and timeouts;
                # a 503 (no leader yet) is an HTTPError, also an OSError.
                last_answer = repr(exc)
            if time.monotonic() >= deadline:
                raise LocalEtcdError(
                    f"etcd at {url} not healthy after {self.startup_timeout_s:.1f}s "
                    f"(last answer: {last_answer}); log tail:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def _terminate(self, first_signal: signal.Signals) -> None:
        proc = self._proc
        if proc is None:
            return
        # Popen.send_signal signals this pid only, and not once it was reaped,
        # so a recycled pid is never hit.
        if proc.poll() is None:
            proc.send_signal(first_signal)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("etcd ignored SIGTERM, killing", extra=fields(pid=proc.pid))
                proc.kill()
                proc.wait()
        self._proc = None
        _LIVE.discard(self)

    def _discard_workdir(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None
        self._client_port = self._peer_port = 0


@atexit.register
def _kill_leftovers() -> None:
    for etcd in list(_LIVE):
        with contextlib.suppress(Exception):
            etcd.stop()
