"""Group builds against a real TCPStore: a member that dies part-way through
must not hold the others past the next command."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from worker_agent.adapter import GroupSpec, StepAborted
from worker_agent.groups import build_gloo_group

GROUP_TIMEOUT_S = 30.0


def test_a_member_that_died_after_the_barrier_does_not_hold_the_build() -> None:
    # Rank 1 reached the arrival barrier and died before gloo's own rendezvous
    # (seen in the soak: a survivor killed as the admission's groups were
    # built). Rank 0 must leave the build when its operation is abandoned, not
    # wait out the group timeout deaf to the rollback's abort.
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    spec = GroupSpec(3, "127.0.0.1", master.port, "/t/epoch-3/", (0, 1), GROUP_TIMEOUT_S)
    dist.PrefixStore(f"{spec.store_prefix}agent/", master).set("arrived/1", "1")
    abort_at = time.monotonic() + 0.5
    started = time.monotonic()
    with pytest.raises(StepAborted, match="gloo connect of the epoch 3 group abandoned"):
        build_gloo_group(spec, 0, "agent", lambda: time.monotonic() > abort_at)
    assert time.monotonic() - started < GROUP_TIMEOUT_S / 3


def test_a_build_with_every_member_alive_returns_the_group() -> None:
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    spec = GroupSpec(1, "127.0.0.1", master.port, "/t/epoch-1/", (5,), GROUP_TIMEOUT_S)
    group = build_gloo_group(spec, 5, "agent", lambda: False)
    assert (group.rank(), group.size()) == (0, 1)
    assert dist.PrefixStore(f"{spec.store_prefix}agent/", master).check(["arrived/5"])
