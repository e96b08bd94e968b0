"""Process groups of one epoch, built on the coordinator-hosted store.

Collectives are always issued async and polled together with an abort signal:
a gloo survivor blocked in a collective with a dead peer it is not connected
to would otherwise wait out the whole timeout (../shared/notes/groups.md).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from worker_agent.adapter import GroupSpec, StepAborted

POLL_S = 0.0002
T = TypeVar("T")

GLOO = "gloo"
NCCL = "nccl"
BACKENDS = (GLOO, NCCL)

# Set in every process that builds NCCL groups, before the first one is built
# (setdefault: a value the operator exported wins). NVLink multicast stays off:
# on shared hosts a program using it can take the GPUs out of service. Async
# error handling 0: only the agent's abort ends a communicator, and it sets the
# engine's abort signal first, so a step whose communicator died under it is
# never committed (with 3, the default, the watchdog would kill the process).
NCCL_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0",
}


def configure_nccl_env() -> None:
    for key, value in NCCL_ENV.items():
        os.environ.setdefault(key, value)


def backend_for_device(device: str | torch.device) -> str:
    """gloo for CPU tensors, NCCL for CUDA tensors; ValueError for anything else."""
    kind = torch.device(device).type
    if kind == "cpu":
        return GLOO
    if kind == "cuda":
        return NCCL
    raise ValueError(f"no process-group backend for device {device!r} (cpu or cuda)")


class CollectiveFailed(RuntimeError):
    """A collective raised: usually a peer's connection reset because it died."""


def wait_work(work: dist.Work, aborted: Callable[[], bool]) -> None:
    while not work.is_completed():
        if aborted():
            raise StepAborted("collective aborted")
        time.sleep(POLL_S)
    transport_errors(work.wait)


def epoch_store(spec: GroupSpec, namespace: str, aborted: Callable[[], bool]) -> dist.PrefixStore:
    """A client of the epoch's rendezvous store, under `namespace`.

    It connects on a helper thread, and the caller polls `aborted` meanwhile:
    the store lives in the coordinator, and after a fail-over in the middle of
    a rebuild the old one is gone. The client would retry the dead address
    for the whole group timeout; the rank must instead be free for the new
    leader's first command (an abort, which makes `aborted` true) at once. A
    connect that is only slow (a loaded host) still gets the whole timeout.
    """
    base = call_abandonable(
        lambda: dist.TCPStore(
            spec.store_host,
            spec.store_port,
            is_master=False,
            wait_for_workers=False,
            timeout=timedelta(seconds=spec.timeout_s),
        ),
        aborted,
        f"store connect for the epoch {spec.epoch} group",
    )
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
    store = epoch_store(spec, namespace, aborted)
    arrival_barrier(store, spec, rank, aborted)
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=hostname)]
    opts._timeout = timedelta(seconds=spec.timeout_s)
    # gloo's own rendezvous waits for every member's address for the whole
    # timeout: a member that passed the barrier and then died would hold this
    # rank there, deaf to the rollback's abort (seen in the soak).
    group = call_abandonable(
        lambda: dist.ProcessGroupGloo(store, spec.group_rank(rank), len(spec.members), opts),
        aborted,
        f"gloo connect of the epoch {spec.epoch} group",
    )
    # A gloo backend serves the ProcessGroup calls we make (send, recv, broadcast,
    # alltoall_base) directly; the stubs only know them on ProcessGroup.
    return cast(dist.ProcessGroup, group)


def arrival_barrier(
    store: dist.Store, spec: GroupSpec, rank: int, aborted: Callable[[], bool]
) -> None:
    """Every member of `spec` has reached the build; released by `aborted`."""
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


def build_nccl_group(
    spec: GroupSpec,
    rank: int,
    namespace: str,
    aborted: Callable[[], bool],
    device: str | torch.device,
) -> dist.ProcessGroup:
    """Build the NCCL group of `spec` under `namespace`, connected eagerly on `device`.

    The same arrival barrier as gloo's comes first. The communicator is then
    created at once (`eager_connect_single_device`), so the first collective
    of the epoch pays no setup and a CUDA graph can capture it. The connect
    runs on a helper thread polled together with `aborted`: a peer that dies
    between the barrier and the connect releases this rank (the helper is left
    to NCCL's own bootstrap error). The survivors' way out of a communicator
    with a dead member is `abort_group`, never a destroy (groups.md).
    """
    configure_nccl_env()
    if not hasattr(dist, "ProcessGroupNCCL"):
        raise RuntimeError("this torch build has no NCCL (a CPU build?): use gloo")
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"NCCL groups need a CUDA device, not {device!r}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    store = epoch_store(spec, namespace, aborted)
    arrival_barrier(store, spec, rank, aborted)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timedelta(seconds=spec.timeout_s)
    backend = dist.ProcessGroupNCCL(store, spec.group_rank(rank), len(spec.members), opts)
    connect = getattr(backend, "eager_connect_single_device", None)
    if connect is not None:
        what = f"NCCL connect of epoch {spec.epoch}"
        transport_errors(lambda: call_abandonable(lambda: connect(dev), aborted, what), what)
    # Like gloo's: the backend serves the ProcessGroup calls made on it.
    return cast(dist.ProcessGroup, backend)


def build_group(
    spec: GroupSpec,
    rank: int,
    namespace: str,
    aborted: Callable[[], bool],
    hostname: str = "127.0.0.1",
    device: str | torch.device | None = None,
) -> dist.ProcessGroup:
    """The group of `spec.backend`: gloo (the default) or NCCL on `device`."""
    if spec.backend == GLOO:
        return build_gloo_group(spec, rank, namespace, aborted, hostname)
    if spec.backend == NCCL:
        if device is None:
            raise ValueError("an NCCL group needs the rank's CUDA device")
        return build_nccl_group(spec, rank, namespace, aborted, device)
    raise ValueError(f"unknown group backend {spec.backend!r} (one of {BACKENDS})")


def is_nccl(group: object) -> bool:
    cls = getattr(dist, "ProcessGroupNCCL", None)
    return cls is not None and isinstance(group, cls)


def abort_group(group: object) -> float:
    """Abort an NCCL group's communicator (never destroy it: a destroy with a
    dead peer can hang); returns the ms it took. Releases NCCL kernels spinning
    on a dead peer, including ones replayed from a CUDA graph. A gloo group is
    left alone (its abort releases nothing, groups.md): 0.0."""
    if not is_nccl(group):
        return 0.0
    started = time.perf_counter()
    for name in ("abort", "_abort"):
        fn = getattr(group, name, None)
        if fn is not None:
            fn()
            break
    else:
        raise RuntimeError("ProcessGroupNCCL has no abort method")
    return (time.perf_counter() - started) * 1000.0


def abort_in_background(
    group: object, done: Callable[[float], None] | None = None
) -> threading.Thread:
    """`abort_group` on a helper thread: it took ~1 s per call on an H200
    (BENCHMARKS.md), too long for the agent's or the engine's thread. `done`
    gets the ms (or -1.0 when the abort raised)."""

    def run() -> None:
        ms = -1.0
        try:
            ms = abort_group(group)
        finally:
            if done is not None:
                done(ms)

    thread = threading.Thread(target=run, name="nccl-abort", daemon=True)
    thread.start()
    return thread


def call_abandonable(
    fn: Callable[[], T], aborted: Callable[[], bool], what: str, poll_s: float = 0.001
) -> T:
    """`fn()` on a helper thread, polled together with `aborted`: a blocking
    connect or rendezvous whose peer died must not hold the rank past the
    next command (an abort makes `aborted` true). On an abort the helper is
    abandoned (it ends with its own timeout) and StepAborted is raised; else
    `fn`'s result is returned, or its exception raised."""
    done = threading.Event()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="abandonable", daemon=True).start()
    while not done.wait(poll_s):
        if aborted():
            raise StepAborted(f"{what} abandoned")
    if failure:
        raise failure[0]
    return outcome[0]


def wait_p2p(works: list[dist.Work], aborted: Callable[[], bool]) -> None:
    """Wait for send/recv works, released by `aborted`.

    gloo's send/recv works report is_completed() False until wait() is called
    (torch 2.13), so polling them never ends: the blocking waits run on an
    abandonable helper. An abandoned helper stays blocked until the group
    timeout, harmlessly.
    """

    def wait_all() -> None:
        for work in works:
            work.wait()

    transport_errors(lambda: call_abandonable(wait_all, aborted, "point-to-point transfer", POLL_S))


def transport_errors(fn: Callable[[], T], what: str = "") -> T:
    """`fn()`, with a transport error (gloo's and NCCL's RuntimeError, usually a
    peer that died) raised as CollectiveFailed; StepAborted passes through."""
    try:
        return fn()
    except StepAborted:
        raise
    except RuntimeError as exc:
        raise CollectiveFailed(f"{what} failed: {exc}" if what else str(exc)) from exc


def release_in_background(owner: object, attribute: str) -> None:
    """Set `owner.attribute` to None and drop the group it held on a helper thread.

    Destroying a gloo group with a work still pending on a dead peer blocks
    until the group timeout (measured: 30 s); the engine must not wait for it.
    The group moves straight from the attribute into the helper, so no frame
    here keeps it alive; the owner must hold no other reference.
    """
    holder = [getattr(owner, attribute)]
    setattr(owner, attribute, None)
    drop_in_background(holder)


def drop_in_background(holder: list[Any]) -> None:
    """Empty `holder` and drop the groups it held on a helper thread (see
    `release_in_background`); the caller must hold no other reference."""
    moved = [group for group in holder if group is not None]
    holder.clear()
    if moved:
        threading.Thread(target=moved.clear, name="group-release", daemon=True).start()
