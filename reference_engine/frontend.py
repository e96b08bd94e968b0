"""The serving frontend of the reference cluster: it owns the request ledger.

Requests are assigned to live ranks; when a rank's connection breaks (it died),
its unanswered requests go to the other ranks. Every answer is recorded, so a
request answered twice is counted, never hidden. Ranks speak to it over a
loopback socket (multiprocessing.connection, authenticated).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, Listener

from coordinator.logs import fields
from reference_engine.requests import Request

log = logging.getLogger(__name__)


@dataclass
class Ledger:
    submitted: int = 0
    answers: dict[int, tuple[int, ...]] = field(default_factory=dict)
    duplicated: int = 0
    reassigned: int = 0


class RequestRouter:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.authkey = secrets.token_bytes(16)
        self._listener = Listener((host, 0), authkey=self.authkey)
        self.address: tuple[str, int] = self._listener.address
        self._lock = threading.Lock()
        self._ranks: dict[int, Connection] = {}
        self._owner: dict[int, int] = {}  # request id -> rank it is assigned to
        self._requests: dict[int, Request] = {}
        self._pending: list[int] = []
        self._next = 0
        self.ledger = Ledger()
        self._closed = False
        self._all_answered = threading.Condition(self._lock)
        threading.Thread(target=self._accept_loop, name="router-accept", daemon=True).start()

    # --- submission ---------------------------------------------------------

    def submit(self, requests: Iterable[Request]) -> None:
        with self._lock:
            for request in requests:
                self._requests[request.id] = request
                self.ledger.submitted += 1
                self._assign(request.id)

    def wait_all_answered(self, timeout_s: float) -> bool:
        with self._lock:
            return self._all_answered.wait_for(
                lambda: len(self.ledger.answers) >= len(self._requests), timeout_s
            )

    def unanswered(self) -> list[int]:
        with self._lock:
            return sorted(set(self._requests) - set(self.ledger.answers))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._ranks.values())
        with contextlib.suppress(OSError):
            self._listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.close()

    # --- internals (hold the lock) --------------------------------------------

    def _assign(self, request_id: int) -> None:
        ranks = sorted(self._ranks)
        if not ranks:
            self._pending.append(request_id)
            return
        rank = ranks[self._next % len(ranks)]
        self._next += 1
        self._owner[request_id] = rank
        request = self._requests[request_id]
        try:
            self._ranks[rank].send(("assign", request.id, request.prompt, request.max_new_tokens))
        except OSError:
            self._drop_rank(rank)

    def _drop_rank(self, rank: int) -> None:
        if self._ranks.pop(rank, None) is None:
            return
        orphans = [
            rid
            for rid, owner in self._owner.items()
            if owner == rank and rid not in self.ledger.answers
        ]
        for rid in orphans:
            del self._owner[rid]
        self.ledger.reassigned += len(orphans)
        log.info("rank left the frontend", extra=fields(rank=rank, reassigned=len(orphans)))
        for rid in orphans:
            self._assign(rid)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except (OSError, EOFError):
                if self._closed:
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        rank: int | None = None
        try:
            while True:
                message = conn.recv()
                match message:
                    case ("hello", int(r)):
                        rank = r
                        with self._lock:
                            self._ranks[r] = conn
                            pending, self._pending = self._pending, []
                            for rid in pending:
                                self._assign(rid)
                    case ("done", int(rid), tokens):
                        with self._lock:
                            if rid in self.ledger.answers:
                                self.ledger.duplicated += 1
                            else:
                                self.ledger.answers[rid] = tuple(tokens)
                            self._all_answered.notify_all()
        except (EOFError, OSError):
            pass
        finally:
            if rank is not None:
                with self._lock:
                    if self._ranks.get(rank) is conn:
                        self._drop_rank(rank)


class FrontendClient:
    """A rank's side: receives assignments, sends answers."""

    def __init__(self, address: tuple[str, int], authkey: bytes, rank: int) -> None:
        self._conn = Client(address, authkey=authkey)
        self._send_lock = threading.Lock()
        self._rank = rank

    def serve(self, on_request: object) -> None:
        """Announce the rank and feed assignments to `on_request` from a thread."""
        assert callable(on_request)
        with self._send_lock:
            self._conn.send(("hello", self._rank))

        def loop() -> None:
            with contextlib.suppress(EOFError, OSError):
                while True:
                    kind, rid, prompt, max_new = self._conn.recv()
                    if kind == "assign":
                        on_request(Request(rid, tuple(prompt), max_new))

        threading.Thread(target=loop, name="frontend", daemon=True).start()

    def answer(self, request_id: int, tokens: Iterable[int]) -> None:
        with self._send_lock, contextlib.suppress(OSError):
            self._conn.send(("done", request_id, list(tokens)))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.close()
