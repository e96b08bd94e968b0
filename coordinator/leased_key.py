"""A key that lives exactly as long as this process keeps its etcd lease alive:
a rank's key (worker_agent.lease) and the leader key (coordinator.election).

Whoever watches the key sees a DELETE when the lease expired (the process
died, hung or lost etcd) or was revoked (clean shutdown). What the holder does
then depends on what the key stands for:

- The leader key (`renews = False`): once a refresh says the lease is gone
  (TTL 0), or no refresh has succeeded for a whole TTL, a standby may already
  lead, so the lease is reported LOST (once) and the holder must stop acting
  on it (fencing). It is never re-granted.
- A rank key (`renews = True`): a lost lease is not evidence that the rank is
  dead (an etcd outage takes every lease with it), and the rank keeps serving.
  The keepalive goes on trying for as long as it takes; once etcd answers
  again, a lease it still knows is refreshed as if nothing happened (etcd
  extends every lease when it elects a leader), and a lease it dropped is
  replaced: a new lease is granted, the key put on it, and `on_renewed` hears
  the new lease id, for the holder to bind its session to it. Whether the rank
  stays a member is the coordinator's decision, not the lease's. The key is
  put back only if it is gone or still on the lost lease: one that another
  lease holds belongs to a relaunch of the rank (this process was cut off
  meanwhile), and taking it would leave the live process without its key
  once this one stops. The lease is then reported lost, for good.

Short of a loss, the keepalive reports whether etcd answers it: a refresh that
failed, or went unanswered for UNANSWERED_S, makes `refresh_problem` non-empty
until one gets through, and `refresh_listeners` hear each change (the
leader's gRPC health turns NOT_SERVING meanwhile).

A refresh still unanswered after a third of the TTL (at most UNANSWERED_S)
is sent again on a new connection, the first one staying outstanding:
whichever answers first counts. A TCP connection can die without a reset (a
NAT or firewall that dropped its state, a peer that vanished) while a new one
to the same etcd works, and gRPC notices a dead connection only after its
keepalive ping goes unanswered, seconds after a rank's lease has expired:
without this, a healthy rank whose one connection to etcd went silent was
evicted (tests/test_network_faults.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import aetcd

from coordinator import etcd_keys
from coordinator.logs import fields

log = logging.getLogger(__name__)

# A failed refresh is retried this often (capped by ttl/3), so one dropped
# packet does not eat a third of the TTL.
RETRY_INTERVAL_S = 0.05
REVOKE_TIMEOUT_S = 2.0
# A refresh is one small round trip; one that has had no answer this long
# means etcd is not answering in time. It is reported, not given up on: it
# may still save the lease until the TTL runs out.
UNANSWERED_S = 1.0


class KeyTaken(Exception):
    """Another lease holds the key: a renewal does not take it."""


class LeasedKey:
    """Grant a lease, claim the key on it (`_claim`), keep it alive at ttl/3.

    `on_lost` runs at most once, in the event loop, when the lease is lost; it
    never runs after stop() began. `lost` is set at the same moment.
    """

    kind = "key"  # names the lease in log messages
    # Whether a lost lease is replaced by a new one (rank keys) rather than
    # reported lost for good (the leader key): see the module docstring.
    renews = False

    def __init__(
        self,
        host: str,
        port: int,
        key: bytes,
        *,
        ttl: int = 1,
        value: Mapping[str, Any] | None = None,
        on_lost: Callable[[], None] | None = None,
        on_renewed: Callable[[int], None] | None = None,
        start_timeout_s: float = 10.0,
        log_fields: Mapping[str, Any] | None = None,
        access: etcd_keys.EtcdAccess | None = None,
    ) -> None:
        if ttl < 1:
            raise ValueError(f"lease ttl must be at least 1 s, got {ttl}")
        self.host = host
        self.port = port
        self.requested_ttl = ttl
        self.key = key
        self._fields: dict[str, Any] = dict(log_fields or {})
        self._value: dict[str, Any] = dict(value or {})
        self._on_lost = on_lost
        self._on_renewed = on_renewed
        self.renewals = 0  # leases granted in place of a lost one
        self.start_timeout_s = start_timeout_s
        self.access = access
        # Empty while etcd answers the refreshes; else why the last did not
        # get through. Each listener is called (in the loop) on every change.
        self.refresh_problem = ""
        self.refresh_outages = 0  # times the refreshes stopped getting through
        self.refresh_listeners: list[Callable[[str], None]] = []
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self._client: aetcd.Client | None = None
        self._lease_id: int | None = None
        self._granted_ttl = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Clients replaced by a fresh connection, closed once their last call ended.
        self._retired: list[aetcd.Client] = []
        self._closing: set[asyncio.Task[None]] = set()
        self.reconnects = 0  # fresh connections opened for an unanswered refresh

    # --- properties -----------------------------------------------------------

    @property
    def lease_id(self) -> int:
        if self._lease_id is None:
            raise RuntimeError(f"{type(self).__name__}.start() has not completed")
        return self._lease_id

    @property
    def ttl(self) -> int:
        """The TTL etcd granted (it may round a short request up)."""
        return self._granted_ttl

    @property
    def value(self) -> dict[str, Any]:
        """What the key holds."""
        return dict(self._value)

    @property
    def client(self) -> aetcd.Client:
        """The etcd client the lease lives on, for the holder's other reads."""
        if self._client is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._client

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Connect, grant, put the key on the lease and start the keepalive.
        Raises aetcd's ClientError subclasses when etcd refuses or is down, and
        TimeoutError when it does not answer within start_timeout_s."""
        if self._client is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        client = etcd_keys.new_client(self.host, self.port, access=self.access)
        self._client = client
        granted_at = time.monotonic()
        try:
            # aetcd calls have no deadline of their own; an etcd host that
            # drops packets would hang the rank's startup.
            await asyncio.wait_for(self._grant_and_put(client), self.start_timeout_s)
        except BaseException:
            await self._release()
            raise
        self._task = asyncio.create_task(
            self._keepalive(granted_at + self._granted_ttl), name=f"{self.kind}-lease-keepalive"
        )
        log.info(
            f"{self.kind} lease granted",
            extra=fields(**self._fields, lease_id=self._lease_id, ttl=self.ttl),
        )

    async def _grant_and_put(self, client: aetcd.Client, replacing: int | None = None) -> None:
        """Grant a lease and put the key on it; `replacing`: the lost lease a
        renewal replaces (KeyTaken, and the new lease revoked, when another
        lease holds the key)."""
        lease = await client.lease(self.requested_ttl)
        self._lease_id = int(lease.id)
        self._granted_ttl = int(lease.ttl)
        self._value.update(lease_id=self._lease_id)
        self._value.setdefault("pid", os.getpid())
        self._value.setdefault("host", socket.gethostname())
        value = etcd_keys.encode_rank_value(self._value)
        if replacing is None:
            await self._claim(client, int(lease.id), value)
            return
        try:
            await self._reclaim(client, int(lease.id), value, replacing)
        except KeyTaken:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.revoke_lease(int(lease.id)), REVOKE_TIMEOUT_S)
            self._lease_id = replacing
            self._value.update(lease_id=replacing)
            raise

    async def _reclaim(self, client: aetcd.Client, lease_id: int, value: bytes, lost: int) -> None:
        """Put the key on a new lease in place of the `lost` one, only while
        the key is gone or still on the lost lease (etcd compares cannot name
        a key's lease: the key's revision as read is compared instead)."""
        txn = client.transactions
        for _ in range(5):  # each try loses only to a concurrent change of the key
            got = await client.get(self.key)
            if got is None:
                compare = [txn.create(self.key) == 0]
            elif int(got.lease) == lost:
                compare = [txn.mod(self.key) == int(got.mod_revision)]
            else:
                raise KeyTaken(f"the key is held by another lease ({int(got.lease):x})")
            written, _ = await client.transaction(
                compare=compare, success=[txn.put(self.key, value, lease=lease_id)], failure=[]
            )
            if written:
                return
        raise aetcd.ClientError("the key kept changing while the lease was renewed")

    async def _claim(self, client: aetcd.Client, lease_id: int, value: bytes) -> None:
        """Put the key on the lease; a subclass may refuse (raise) instead."""
        await client.put(self.key, value, lease=lease_id)

    async def stop(self) -> None:
        """Stop refreshing and revoke the lease, so the coordinator sees the DELETE
        at once instead of a TTL later. Idempotent; never raises for etcd errors."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._release()

    async def wait_lost(self) -> str:
        await self.lost.wait()
        return self.lost_reason

    # --- internals --------------------------------------------------------------

    async def _release(self) -> None:
        client, self._client = self._client, None
        self._close_retired()
        if client is None:
            return
        # Revoked even after a loss: when the loss was "no refresh got through",
        # etcd may still hold the lease, and the sooner the key goes the better.
        if self._lease_id is not None:
            try:
                await asyncio.wait_for(client.revoke_lease(self._lease_id), REVOKE_TIMEOUT_S)
                log.info(
                    f"{self.kind} lease revoked",
                    extra=fields(**self._fields, lease_id=self._lease_id),
                )
            except Exception as exc:
                # Expired already ("lease not found"), or etcd is away: either
                # way etcd drops the key within a TTL without us.
                log.warning(
                    f"{self.kind} lease revoke failed",
                    extra=fields(**self._fields, lease_id=self._lease_id, error=repr(exc)),
                )
        with contextlib.suppress(Exception):
            await client.close()

    async def _keepalive(self, expires_at: float) -> None:
        try:
            await self._refresh_until_lost(expires_at)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug here must not leave the rank serving on a lease nobody
            # refreshes: report it lost, loudly.
            log.exception(f"{self.kind} lease keepalive crashed", extra=fields(**self._fields))
            self._declare_lost(f"keepalive crashed: {exc!r}")

    async def _refresh_until_lost(self, expires_at: float) -> None:
        assert self._client is not None and self._lease_id is not None
        interval = self._granted_ttl / 3
        next_at = time.monotonic() + interval
        failures = 0
        overdue_logged = False
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            lease_id = self.lease_id
            sent_at = time.monotonic()
            left = expires_at - sent_at
            if left <= 0:
                if not self.renews:
                    self._declare_lost(
                        f"no successful refresh for {self._granted_ttl}s ({failures} failed)"
                    )
                    return
                if not overdue_logged:
                    overdue_logged = True
                    log.warning(
                        f"{self.kind} lease may have expired; still trying to refresh it",
                        extra=fields(**self._fields, lease_id=lease_id, failures=failures),
                    )
                # Past its TTL by our clock: etcd may still hold it (a restarted
                # etcd extends every lease), or say TTL 0 once it answers.
                left = max(float(self._granted_ttl), UNANSWERED_S)
            try:
                # Bounded by the TTL left: a refresh answered later than that
                # cannot save the lease anyway.
                reply = await self._refresh(self.client, lease_id, left)
                if reply is None:
                    raise aetcd.ClientError("keepalive stream closed without a reply")
            except Exception as exc:
                # aetcd maps gRPC errors to ClientError, but a closing channel
                # can raise others; all mean "this refresh did not get through".
                failures += 1
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    f"{self.kind} lease refresh failed",
                    extra=fields(
                        **self._fields,
                        lease_id=lease_id,
                        left_s=round(left, 3),
                        failures=failures,
                        error=repr(exc),
                    ),
                )
                self._report_refresh(f"lease refresh failed: {exc!r}")
                next_at = time.monotonic() + min(interval, RETRY_INTERVAL_S * 2 ** min(failures, 4))
                if not self.renews:
                    # The lease is lost when it expires, not a retry later:
                    # etcd may drop it then, and a standby lead, while this
                    # holder, asleep in its backoff, still believed it led.
                    next_at = min(next_at, expires_at)
                continue
            if reply.TTL <= 0:
                if not self.renews:
                    self._declare_lost("etcd says the lease expired (refresh returned TTL 0)")
                    return
                renewed_until = await self._renew(lease_id)
                if renewed_until is None:
                    return
                expires_at = renewed_until
                sent_at = expires_at - self._granted_ttl
            else:
                # The lease runs from when etcd handled the refresh, which is
                # no earlier than when we sent it.
                expires_at = sent_at + int(reply.TTL)
            if failures or self.refresh_problem:
                log.info(
                    f"{self.kind} lease refresh recovered",
                    extra=fields(**self._fields, lease_id=self.lease_id, failures=failures),
                )
                failures = 0
            overdue_logged = False
            self._report_refresh("")
            next_at = sent_at + interval

    async def _renew(self, lost_id: int) -> float | None:
        """Replace a lease etcd no longer has: grant a new one and put the key
        on it, retrying until etcd takes both. Returns when the new lease
        expires unless refreshed; None (the lease reported lost) when another
        lease holds the key."""
        log.warning(
            f"{self.kind} lease expired in etcd; granting a new one",
            extra=fields(**self._fields, lease_id=lost_id),
        )
        backoff = RETRY_INTERVAL_S
        while True:
            granted_at = time.monotonic()
            try:
                await asyncio.wait_for(
                    self._grant_and_put(self.client, replacing=lost_id), self.start_timeout_s
                )
                break
            except KeyTaken as exc:
                self._declare_lost(f"not renewed: {exc}; the rank was relaunched elsewhere")
                return None
            except Exception as exc:
                if isinstance(exc, TimeoutError):
                    self._fresh_client()  # its connection may be the one that is dead
                log.warning(
                    f"{self.kind} lease renewal failed, retrying",
                    extra=fields(**self._fields, error=repr(exc), retry_in_s=backoff),
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        self.renewals += 1
        log.warning(
            f"{self.kind} lease renewed",
            extra=fields(**self._fields, lost_lease_id=lost_id, lease_id=self._lease_id),
        )
        if self._on_renewed is not None:
            try:
                self._on_renewed(self.lease_id)
            except Exception:
                log.exception("on_renewed callback failed", extra=fields(**self._fields))
        return granted_at + self._granted_ttl

    async def _refresh(self, client: aetcd.Client, lease_id: int, left: float) -> Any:
        """One refresh, waited for up to `left` seconds. Still unanswered
        after a third of the TTL (at most UNANSWERED_S), it is sent again on a
        fresh connection while the first stays outstanding, and whichever
        answers first counts; unanswered after UNANSWERED_S, it is reported
        meanwhile."""
        started = time.monotonic()
        deadline = started + left
        retry_at = started + min(UNANSWERED_S, self._granted_ttl / 3)
        report_at = started + UNANSWERED_S
        retried = reported = False
        attempts = {asyncio.ensure_future(client.refresh_lease(lease_id))}
        error: BaseException | None = None
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise TimeoutError(f"no answer within the {left:.3f} s the lease had left")
                wake = min(
                    deadline,
                    retry_at if not retried else deadline,
                    report_at if not reported else deadline,
                )
                done, attempts = await asyncio.wait(
                    attempts, timeout=max(0.0, wake - now), return_when=asyncio.FIRST_COMPLETED
                )
                for attempt in done:
                    if attempt.exception() is None:
                        return attempt.result()
                    error = attempt.exception()
                if not attempts:
                    assert error is not None
                    raise error  # every connection refused it: not a silence
                now = time.monotonic()
                if not reported and now >= report_at:
                    reported = True
                    log.warning(
                        f"{self.kind} lease refresh unanswered",
                        extra=fields(**self._fields, lease_id=lease_id, waited_s=UNANSWERED_S),
                    )
                    self._report_refresh(
                        f"etcd has not answered a lease refresh for {UNANSWERED_S} s"
                    )
                if not retried and now >= retry_at:
                    retried = True
                    fresh = self._fresh_client()
                    attempts.add(asyncio.ensure_future(fresh.refresh_lease(lease_id)))
        finally:
            for attempt in attempts:
                attempt.cancel()
            self._close_retired()

    def _fresh_client(self) -> aetcd.Client:
        """Move to a new connection to etcd (the old client is closed once its
        calls are done): the one in use may have died without a reset."""
        old = self._client
        self._client = etcd_keys.new_client(self.host, self.port, access=self.access)
        self.reconnects += 1
        if old is not None:
            self._retired.append(old)
        log.warning(
            f"{self.kind} lease: etcd does not answer on this connection; trying a new one",
            extra=fields(**self._fields, lease_id=self._lease_id, reconnects=self.reconnects),
        )
        return self._client

    def _close_retired(self) -> None:
        retired, self._retired = self._retired, []
        for client in retired:
            task = asyncio.ensure_future(_close_quietly(client))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _report_refresh(self, problem: str) -> None:
        """Record whether etcd answers the refreshes ("" when it does); tell
        the listeners when that changes."""
        if bool(problem) == bool(self.refresh_problem):
            if problem:
                self.refresh_problem = problem
            return
        if problem:
            # Logged where it happened (refresh failed / unanswered).
            self.refresh_outages += 1
        self.refresh_problem = problem
        for listener in list(self.refresh_listeners):
            try:
                listener(problem)
            except Exception:
                log.exception("refresh listener failed", extra=fields(**self._fields))

    def _declare_lost(self, reason: str) -> None:
        if self.lost.is_set() or self._stopping:
            return
        self.lost_reason = reason
        self.lost.set()
        log.error(
            f"{self.kind} lease lost",
            extra=fields(**self._fields, lease_id=self._lease_id, reason=reason),
        )
        if self._on_lost is not None:
            try:
                self._on_lost()
            except Exception:
                log.exception("on_lost callback failed", extra=fields(**self._fields))


async def _close_quietly(client: aetcd.Client) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), REVOKE_TIMEOUT_S)
