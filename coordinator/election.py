"""Leader election on etcd: one active coordinator per cluster, standbys wait.

The leader key `/ep-recovery/{cluster}/leader` lives on the leader's lease and
is claimed by a transaction that succeeds only while the key does not exist.
The key's create revision is the fence: every write of the cluster record also
compares it (`LeaderLease.fence`), so a deposed leader that has not noticed yet
cannot change anything. A leader whose lease is lost (a refresh answers TTL 0,
or none gets through for a whole TTL) steps down at once: its owner stops
serving and the process exits for its supervisor to restart it as a standby.

The key's value says where the leader serves (`endpoint`): agents read it to
find the coordinator, and standbys and `epctl` to name the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aetcd

from coordinator import etcd_keys
from coordinator.leased_key import LeasedKey
from coordinator.logs import fields

log = logging.getLogger(__name__)

# How long a standby waits on its watch of the leader key before claiming
# again anyway (a watch that lost an event must not leave it standing by).
STANDBY_RECHECK_S = 1
# A standby's etcd read that has no answer this long is tried again.
ETCD_CALL_TIMEOUT_S = 5.0


class LeadershipTaken(Exception):
    """Another coordinator holds the leader key."""

    def __init__(self, holder: Mapping[str, Any] | None, revision: int) -> None:
        self.holder = dict(holder or {})
        self.revision = revision  # the key's mod revision as seen
        super().__init__(f"the leader key is held by {self.holder or 'an unknown holder'}")


class Deposed(Exception):
    """This coordinator is no longer the leader: a fenced write failed or its
    lease was lost. It must stop at once."""


def decode_leader(raw: bytes | None) -> dict[str, Any] | None:
    return etcd_keys.decode_rank_value(raw) if raw else None


async def read_leader(client: aetcd.Client, cluster: str) -> dict[str, Any] | None:
    """The leader key's value (`endpoint`, `id`, ...); None when no leader."""
    got = await client.get(etcd_keys.leader_key(cluster))
    return decode_leader(bytes(got.value)) if got is not None else None


class LeaderLease(LeasedKey):
    """The leader key on a kept-alive lease; start() raises LeadershipTaken
    when another coordinator holds it (nothing of ours is left behind then)."""

    kind = "leader"

    def __init__(
        self,
        host: str,
        port: int,
        cluster: str,
        *,
        ttl: int,
        identity: Mapping[str, Any],
        on_lost: Callable[[], None] | None = None,
        start_timeout_s: float = 10.0,
        access: etcd_keys.EtcdAccess | None = None,
    ) -> None:
        super().__init__(
            host,
            port,
            etcd_keys.leader_key(cluster),
            ttl=ttl,
            value=identity,
            on_lost=on_lost,
            start_timeout_s=start_timeout_s,
            access=access,
            log_fields={"cluster": cluster, "id": identity.get("id", "")},
        )
        self.cluster = cluster
        # The create revision of our leader key; 0 until claimed.
        self.fence_revision = 0

    async def _claim(self, client: aetcd.Client, lease_id: int, value: bytes) -> None:
        txn = client.transactions
        claimed, responses = await client.transaction(
            compare=[txn.create(self.key) == 0],
            success=[txn.put(self.key, value, lease=lease_id)],
            failure=[txn.get(self.key)],
        )
        if not claimed:
            found = responses[0] if responses else []
            holder = decode_leader(bytes(found[0][0])) if found else None
            revision = int(found[0][1].mod_revision) if found else 0
            raise LeadershipTaken(holder, revision)
        self.fence_revision = int(responses[0].response_put.header.revision)

    def fence(self) -> list[Any]:
        """The compare every state write adds: our leader key still exists,
        created by our claim."""
        if not self.fence_revision:
            raise RuntimeError("not the leader: the leader key was never claimed")
        return [self.client.transactions.create(self.key) == self.fence_revision]

    async def announce(self, **values: Any) -> None:
        """Add `values` (e.g. the endpoint once the server is bound) to the
        leader key, fenced; Deposed when the key is no longer ours."""
        self._value.update(values)
        txn = self.client.transactions
        written, _ = await self.client.transaction(
            compare=self.fence(),
            success=[
                txn.put(self.key, etcd_keys.encode_rank_value(self._value), lease=self.lease_id)
            ],
            failure=[],
        )
        if not written:
            raise Deposed("the leader key is no longer ours")


async def campaign(
    make_lease: Callable[[], LeaderLease],
    client: aetcd.Client,
    *,
    on_standby: Callable[[dict[str, Any]], None] | None = None,
) -> LeaderLease:
    """Claim leadership, waiting as a standby while another coordinator holds
    it; `client` is for the standby's reads and watches. Returns the started
    lease of the new leader. An etcd that is down or does not answer is
    waited for (a standby that exits during an etcd outage would leave the
    cluster without a coordinator once etcd is back)."""
    announced: str | None = None
    failures = 0
    while True:
        lease = make_lease()
        try:
            got = await asyncio.wait_for(client.get(lease.key), ETCD_CALL_TIMEOUT_S)
            if got is None:
                await lease.start()
                return lease
            holder, revision = decode_leader(bytes(got.value)) or {}, int(got.mod_revision)
        except LeadershipTaken as taken:  # another standby was quicker
            holder, revision = taken.holder, taken.revision
        except (aetcd.ClientError, TimeoutError) as exc:
            failures += 1
            log.log(
                logging.WARNING if failures == 1 else logging.DEBUG,
                "etcd unavailable; campaigning again",
                extra=fields(cluster=lease.cluster, failures=failures, error=repr(exc)),
            )
            await asyncio.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)))
            continue
        if failures:
            log.info("etcd answers again", extra=fields(cluster=lease.cluster, failures=failures))
            failures = 0
        holder_id = str(holder.get("id", ""))
        if holder_id != announced:
            announced = holder_id
            log.info(
                "standing by",
                extra=fields(
                    cluster=lease.cluster,
                    leader=holder_id,
                    leader_endpoint=holder.get("endpoint", ""),
                ),
            )
            if on_standby is not None:
                on_standby(holder)
        # Until the key changes after what we saw (its holder went), or a
        # while passes: a watch that lost its event must not keep us waiting.
        with contextlib.suppress(TimeoutError, aetcd.ClientError):
            await asyncio.wait_for(
                client.watch_once(
                    lease.key, timeout=STANDBY_RECHECK_S, start_revision=revision + 1
                ),
                STANDBY_RECHECK_S + ETCD_CALL_TIMEOUT_S,
            )
