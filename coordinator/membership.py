"""Rank membership as etcd sees it: a stream of PUTs and DELETEs of rank keys.

A rank key lives on its rank's lease, so a DELETE means the lease expired (the
rank died, hung, or lost etcd) or was revoked (clean shutdown). LeaseWatcher
turns the prefix into one ordered stream that loses nothing across etcd
restarts: it starts from a snapshot (reported as puts), watches from the
snapshot's revision + 1, and after any watch failure re-watches from the last
revision it reported + 1. When etcd has compacted that history away, it reads
a fresh snapshot and reports the difference (deletes for vanished keys, puts
for new or changed ones), so the consumer's view converges all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Literal

import aetcd

from coordinator import etcd_keys
from coordinator.logs import fields

log = logging.getLogger(__name__)

EventKindName = Literal["put", "delete"]


@dataclass(frozen=True)
class RankKeyEvent:
    kind: EventKindName
    rank: int
    # The key's JSON for a put; for a delete, what the key held before (so the
    # lease id of the incarnation that left), or None when etcd no longer has it.
    value: dict[str, Any] | None
    # The etcd revision of the change (for snapshot puts: the key's mod revision).
    revision: int


@dataclass
class _Known:
    value: dict[str, Any] | None
    create_revision: int
    mod_revision: int


class LeaseWatcher:
    """events() yields RankKeyEvents until close(). One consumer at a time."""

    def __init__(
        self,
        client: aetcd.Client,
        cluster: str,
        *,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 1.0,
    ) -> None:
        self.client = client
        self.cluster = cluster
        self.prefix = etcd_keys.ranks_prefix(cluster)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        # The last revision whose events are all reported; 0 before the snapshot.
        self.revision = 0
        self.reconnects = 0
        self._known: dict[int, _Known] = {}
        self._closed = asyncio.Event()
        self._watch: aetcd.Watch | None = None

    @property
    def ranks(self) -> dict[int, dict[str, Any] | None]:
        """The rank keys as of the last event reported."""
        return {rank: k.value for rank, k in self._known.items()}

    async def close(self) -> None:
        """End events() (it returns normally), also while it waits or backs off."""
        self._closed.set()
        watch, self._watch = self._watch, None
        if watch is not None:
            with contextlib.suppress(Exception):
                await watch.cancel()

    async def events(self) -> AsyncGenerator[RankKeyEvent, None]:
        backoff = self.backoff_initial_s
        failures = 0  # in a row, for the logs
        need_snapshot = True
        while not self._closed.is_set():
            try:
                if need_snapshot:
                    for event in await self._resync():
                        yield event
                    need_snapshot = False
                watch = await self.client.watch_prefix(
                    self.prefix, start_revision=self.revision + 1, prev_kv=True
                )
                self._watch = watch
                if self._closed.is_set():
                    # close() ran while the watch was being created.
                    await watch.cancel()
                    return
                if failures:
                    log.info(
                        "rank watch resumed",
                        extra=fields(
                            cluster=self.cluster,
                            from_revision=self.revision + 1,
                            failed_attempts=failures,
                        ),
                    )
                backoff, failures = self.backoff_initial_s, 0
                async for raw in watch:
                    translated = self._translate(raw)
                    if translated is not None:
                        yield translated
                # aetcd ends the iteration without an error only on cancel:
                # ours (close) or the client being closed under us.
                if not self._closed.is_set():
                    raise aetcd.ConnectionFailedError("watch ended: the client was closed")
            except aetcd.RevisionCompactedError as exc:
                log.warning(
                    "rank watch history compacted, re-reading the snapshot",
                    extra=fields(
                        cluster=self.cluster,
                        last_revision=self.revision,
                        compacted_revision=exc.compacted_revision,
                    ),
                )
                need_snapshot = True
            except Exception as exc:
                # ConnectionFailedError (etcd restarted or unreachable) is the
                # usual one; anything else is retried the same way, loudly.
                self.reconnects += 1
                failures += 1
                log.log(
                    # One warning per outage; the attempts after it are noise.
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "rank watch failed, retrying",
                    extra=fields(
                        cluster=self.cluster,
                        last_revision=self.revision,
                        retry_in_s=round(backoff, 3),
                        error=repr(exc),
                    ),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
            finally:
                watch, self._watch = self._watch, None
                if watch is not None:
                    # Also runs when the consumer abandons the generator.
                    with contextlib.suppress(Exception):
                        await watch.cancel()

    async def _resync(self) -> list[RankKeyEvent]:
        """Read the prefix; return what changed since the last known state."""
        snapshot = await self.client.get_prefix(self.prefix)
        revision = int(snapshot.header.revision)
        current: dict[int, _Known] = {}
        for kv in snapshot:
            rank = etcd_keys.parse_rank_key(self.cluster, kv.key)
            if rank is not None:
                current[rank] = _Known(
                    self._decode(rank, kv.value), int(kv.create_revision), int(kv.mod_revision)
                )
        events: list[RankKeyEvent] = []
        for rank in sorted(self._known.keys() | current.keys()):
            old, cur = self._known.get(rank), current.get(rank)
            # A key created again since we saw it (another create revision) was
            # deleted in between: that incarnation's DELETE must not go missing.
            if old is not None and (cur is None or cur.create_revision != old.create_revision):
                # The DELETE itself was compacted away; the snapshot revision is
                # the earliest one at which we know the key was gone.
                events.append(RankKeyEvent("delete", rank, old.value, revision))
                old = None
            if cur is not None and (old is None or old.mod_revision != cur.mod_revision):
                events.append(RankKeyEvent("put", rank, cur.value, cur.mod_revision))
        self._known = current
        self.revision = revision
        log.info(
            "rank snapshot read",
            extra=fields(cluster=self.cluster, revision=revision, ranks=sorted(current)),
        )
        return events

    def _translate(self, raw: aetcd.Event) -> RankKeyEvent | None:
        revision = int(raw.kv.mod_revision)
        self.revision = max(self.revision, revision)
        rank = etcd_keys.parse_rank_key(self.cluster, raw.kv.key)
        if rank is None:
            return None
        if raw.kind == aetcd.EventKind.PUT:
            value = self._decode(rank, raw.kv.value)
            self._known[rank] = _Known(value, int(raw.kv.create_revision), revision)
            return RankKeyEvent("put", rank, value, revision)
        known = self._known.pop(rank, None)
        if raw.prev_kv is not None:
            value = self._decode(rank, raw.prev_kv.value)
        else:
            value = known.value if known is not None else None
        return RankKeyEvent("delete", rank, value, revision)

    def _decode(self, rank: int, raw: bytes) -> dict[str, Any] | None:
        value = etcd_keys.decode_rank_value(raw)
        if value is None:
            log.warning(
                "rank key holds no JSON object",
                extra=fields(cluster=self.cluster, rank=rank, raw=raw[:80]),
            )
        return value
