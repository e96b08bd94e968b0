"""systemd's notify protocol (sd_notify), spoken on the socket directly.

systemd passes a service of `Type=notify` the path of a datagram socket in
`NOTIFY_SOCKET` (an absolute path, or `@name` for Linux's abstract namespace).
Each datagram is newline-separated `KEY=value` assignments: `READY=1` once the
daemon serves, `STATUS=...` free text for `systemctl status`, `WATCHDOG=1` as
a keep-alive when `WatchdogSec=` is set (systemd then exports `WATCHDOG_USEC`,
and `WATCHDOG_PID` naming the process it expects the pings from), and
`STOPPING=1` when shutting down. Without `NOTIFY_SOCKET` every call is a no-op,
so the daemon behaves the same outside systemd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

from coordinator.logs import fields

log = logging.getLogger(__name__)


def socket_address(value: str) -> str | None:
    """The AF_UNIX address for a NOTIFY_SOCKET value; None when unsupported."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """Half of WATCHDOG_USEC, in seconds, when the watchdog is meant for `pid`."""
    raw = environ.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(pid):
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC", extra=fields(value=raw, reason="not an integer"))
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


class SystemdNotifier:
    """Sends sd_notify datagrams; does nothing when there is no NOTIFY_SOCKET."""

    def __init__(self, address: str | None, watchdog_interval: float | None = None) -> None:
        self.address = address
        self.watchdog_interval_s = watchdog_interval if address is not None else None
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, pid: int | None = None
    ) -> SystemdNotifier:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("unsupported NOTIFY_SOCKET, not notifying systemd", extra=fields(value=raw))
        interval = watchdog_interval_s(env, os.getpid() if pid is None else pid)
        return cls(address, interval)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send one datagram of `KEY=value` lines; True when it was sent."""
        if self.address is None or not assignments:
            return False
        data = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop on a full receiver queue.
                self._sock.setblocking(False)
            self._sock.sendto(data, socket.MSG_NOSIGNAL, self.address)
        except OSError as exc:
            # The first failure in a row is a warning; repeats (watchdog) stay quiet.
            level = logging.DEBUG if self._failing else logging.WARNING
            self._failing = True
            log.log(
                level,
                "systemd notify failed",
                extra=fields(socket=self._shown(), error=str(exc)),
            )
            return False
        if self._failing:
            log.info("systemd notify works again", extra=fields(socket=self._shown()))
            self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    async def run_watchdog(self) -> None:
        """Send WATCHDOG=1 every half WATCHDOG_USEC from the event loop, until cancelled.

        The pings come from the loop itself, so a blocked loop stops them and
        systemd restarts the daemon.
        """
        interval = self.watchdog_interval_s
        if interval is None:
            return
        log.info("systemd watchdog", extra=fields(interval_s=interval))
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def _shown(self) -> str:
        return (self.address or "").replace("\0", "@", 1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
