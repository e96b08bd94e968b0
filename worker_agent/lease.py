"""A rank's etcd lease: its key under the cluster's rank prefix lives exactly as
long as this process keeps the lease alive.

The coordinator watches the prefix: a DELETE of the key means the lease expired
(the process died, hung or lost etcd) or was revoked (clean shutdown). A lease
lost while the process lives (an etcd outage, a partition from etcd) is not a
reason to stop serving: the keepalive keeps trying, grants a new lease when etcd
dropped the old one, and tells the agent (`on_renewed`), which binds its session
to the new lease. Whether the rank is still a member is the coordinator's call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from coordinator import etcd_keys
from coordinator.leased_key import LeasedKey


class RankLease(LeasedKey):
    """The rank key `/ep-recovery/{cluster}/ranks/{rank}` on a kept-alive lease."""

    kind = "rank"
    renews = True

    def __init__(
        self,
        host: str,
        port: int,
        cluster: str,
        rank: int,
        *,
        ttl: int = 1,
        value: Mapping[str, Any] | None = None,
        on_lost: Callable[[], None] | None = None,
        on_renewed: Callable[[int], None] | None = None,
        start_timeout_s: float = 10.0,
        access: etcd_keys.EtcdAccess | None = None,
    ) -> None:
        super().__init__(
            host,
            port,
            etcd_keys.rank_key(cluster, rank),
            ttl=ttl,
            value={**(value or {}), "rank": rank},
            on_lost=on_lost,
            on_renewed=on_renewed,
            start_timeout_s=start_timeout_s,
            access=access,
            log_fields={"cluster": cluster, "rank": rank},
        )
        self.cluster = cluster
        self.rank = rank
