"""Process groups of one epoch, built on the coordinator-hosted store.

Collectives are always issued async and polled together with an abort signal:
a gloo survivor blocked in a collective with a dead peer it is not connected
to would otherwise wait out the whole timeout (../shared/notes/groups.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import cast

import torch.distributed as dist

from worker_agent.adapter import GroupSpec, StepAborted

POLL_S = 0.0002
STORE_CONNECT_TIMEOUT_S = 2.0


class CollectiveFailed(RuntimeError):
    """A collective raised: usually a peer's connection reset because it died."""


def wait_work(work: dist.Work, aborted: Callable[[], bool]) -> None:
    while not work.is_completed():
        if aborted():
            raise StepAborted("collective aborted")
        time.sleep(POLL_S)
    try:
        work.wait()
    except RuntimeError as exc:
        raise CollectiveFailed(str(exc)) from exc


def epoch_store(spec: GroupSpec, namespace: str) -> dist.PrefixStore:
    # Connecting gives up after STORE_CONNECT_TIMEOUT_S, not the group timeout:
    # the store lives in the coordinator, and after a fail-over in the middle of
    # a rebuild the old one is gone; the rank must be free for the new leader's
    # first command (an abort) well within that phase's deadline.
    base = dist.TCPStore(
        spec.store_host,
        spec.store_port,
        is_master=False,
        wait_for_workers=False,
        timeout=timedelta(seconds=min(spec.timeout_s, STORE_CONNECT_TIMEOUT_S)),
    )
    base.set_timeout(timedelta(seconds=spec.timeout_s))
    return dist.PrefixStore(f"{spec.store_prefix}{namespace}/", base)


def build_gloo_group(
    spec: GroupSpec,
    rank: int,
    namespace: str,
    aborted: Callable[[], bool],
    hostname: str = "127.0.0.1",
) -> dist.ProcessGroup:
    """Build the gloo group of `spec` under `namespace`.

    An arrival barrier on the store comes first: it polls, so a build whose
    peer died (or whose operation was abandoned) is released by `aborted`
    instead of waiting in gloo's own rendezvous until the timeout.
    """
    store = epoch_store(spec, namespace)
    store.set(f"arrived/{rank}", "1")
    keys = [f"arrived/{member}" for member in spec.members]
    deadline = time.monotonic() + spec.timeout_s
    while not store.check(keys):
        if aborted():
            raise StepAborted(f"group build of epoch {spec.epoch} abandoned")
        if time.monotonic() > deadline:
            missing = [m for m in spec.members if not store.check([f"arrived/{m}"])]
            raise TimeoutError(f"epoch {spec.epoch} group: ranks {missing} never arrived")
        time.sleep(0.001)
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=hostname)]
    opts._timeout = timedelta(seconds=spec.timeout_s)
    group = dist.ProcessGroupGloo(store, spec.group_rank(rank), len(spec.members), opts)
    # A gloo backend serves the ProcessGroup calls we make (send, recv, broadcast,
    # alltoall_base) directly; the stubs only know them on ProcessGroup.
    return cast(dist.ProcessGroup, group)


def wait_p2p(works: list[dist.Work], aborted: Callable[[], bool]) -> None:
    """Wait for send/recv works, released by `aborted`.

    gloo's send/recv works report is_completed() False until wait() is called
    (torch 2.13), so polling them never ends. A helper thread makes the blocking
    waits while this one polls for it and the abort; an abandoned helper stays
    blocked until the group timeout, harmlessly.
    """
    done = threading.Event()
    failure: list[RuntimeError] = []

    def wait_all() -> None:
        try:
            for work in works:
                work.wait()
        except RuntimeError as exc:
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=wait_all, name="p2p-wait", daemon=True).start()
    while not done.wait(POLL_S):
        if aborted():
            raise StepAborted("point-to-point transfer aborted")
    if failure:
        raise CollectiveFailed(str(failure[0])) from failure[0]


def release_in_background(owner: object, attribute: str) -> None:
    """Set `owner.attribute` to None and drop the group it held on a helper thread.

    Destroying a gloo group with a work still pending on a dead peer blocks
    until the group timeout (measured: 30 s); the engine must not wait for it.
    The group moves straight from the attribute into the helper, so no frame
    here keeps it alive; the owner must hold no other reference.
    """
    holder = [getattr(owner, attribute)]
    setattr(owner, attribute, None)
    if holder[0] is not None:
        threading.Thread(target=holder.clear, name="group-release", daemon=True).start()
