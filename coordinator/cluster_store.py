"""The coordinator's cluster record in etcd (`/ep-recovery/{cluster}/state`).

Every write is one transaction: optional compares, then the put. Today the
compares are the record's own mod revision (compare-and-swap against what this
coordinator last read or wrote); the leadership fence (the leader key's
revision, invariant 1) goes into the same transaction through
`extra_compares`, so a deposed leader's write fails as a whole.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import aetcd

from coordinator import etcd_keys
from coordinator.logs import fields

log = logging.getLogger(__name__)


class StaleWrite(Exception):
    """A save's compares failed: the record moved on, or a fence did not hold."""

    def __init__(self, key: bytes, expected_revision: int | None, current_revision: int) -> None:
        self.key = key
        self.expected_revision = expected_revision
        self.current_revision = current_revision
        if expected_revision is not None and expected_revision != current_revision:
            why = f"expected mod revision {expected_revision}, etcd has {current_revision}"
        else:
            why = "an extra compare (fence) failed"
        super().__init__(f"stale write to {key.decode(errors='replace')}: {why}")

    @property
    def revision_mismatch(self) -> bool:
        """True when the record itself moved; False when only a fence failed."""
        return self.expected_revision is not None and (
            self.expected_revision != self.current_revision
        )


class ClusterStore:
    def __init__(self, client: aetcd.Client, cluster: str) -> None:
        self.client = client
        self.cluster = cluster
        self.key = etcd_keys.state_key(cluster)
        # Mod revision of the record as of our last load() or save(); 0 = absent.
        self.revision = 0

    async def save(
        self,
        record: bytes,
        *,
        expected_revision: int | None = None,
        extra_compares: Sequence[Any] = (),
        extra_success: Sequence[Any] = (),
    ) -> int:
        """Write the record; return its new mod revision.

        expected_revision: the key's mod revision must equal it (0: the key must
        not exist). extra_compares: aetcd compares built from
        `client.transactions` (e.g. `mod(leader_key) == rev`), all ANDed.
        extra_success: more puts and deletes carried out with the record's
        put, in the same transaction (the operation history's summaries).
        Raises StaleWrite when any compare fails; nothing is written then.
        """
        txn = self.client.transactions
        compares: list[Any] = []
        if expected_revision is not None:
            # etcd compares a missing key's mod revision as 0.
            compares.append(txn.mod(self.key) == expected_revision)
        compares.extend(extra_compares)
        succeeded, responses = await self.client.transaction(
            compare=compares,
            success=[txn.put(self.key, record), *extra_success],
            failure=[txn.get(self.key)],
        )
        if not succeeded:
            found = responses[0] if responses else []
            current = int(found[0][1].mod_revision) if found else 0
            error = StaleWrite(self.key, expected_revision, current)
            log.warning(
                "cluster record write refused",
                extra=fields(
                    cluster=self.cluster,
                    expected_revision=expected_revision,
                    current_revision=current,
                    reason=str(error),
                ),
            )
            raise error
        revision = int(responses[0].response_put.header.revision)
        self.revision = revision
        log.debug(
            "cluster record saved",
            extra=fields(cluster=self.cluster, revision=revision, size=len(record)),
        )
        return revision

    async def load(self) -> tuple[bytes | None, int]:
        """The record and its mod revision; (None, 0) when there is none."""
        got = await self.client.get(self.key)
        if got is None:
            self.revision = 0
            return None, 0
        self.revision = int(got.mod_revision)
        return bytes(got.value), self.revision
