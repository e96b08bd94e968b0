"""A coordinator process plus real WorkerAgents driving a minimal engine.

The engine here is not the MoE model: each iteration is one all-reduce over the
epoch's group (so a departed rank breaks the step, as in a real EP engine), and
its "experts" are small tensors whose values say which logical expert they
hold. The adapter records every call, so tests can assert what each rank did.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
import torch.distributed as dist

from coordinator import etcd_keys
from coordinator.security import ClientTls
from epctl.admin import Target
from protos.ep_recovery.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from protos.types import Placement
from worker_agent.adapter import GroupSpec, StepAborted
from worker_agent.agent import AgentConfig, AgentStopped, WorkerAgent
from worker_agent.groups import (
    CollectiveFailed,
    build_gloo_group,
    release_in_background,
    wait_work,
)
from worker_agent.lease import RankLease

SLOTS_PER_RANK = 2
LAYERS = 2


def ring_placement(world_size: int) -> Placement:
    """Expert e on slots e and (e + slots_per_rank) mod n: two ranks apart."""
    n = world_size * SLOTS_PER_RANK
    experts = n // 2
    layer = tuple(slot % experts for slot in range(n))
    return Placement(1, SLOTS_PER_RANK, (layer,) * LAYERS)


def expert_value(layer: int, expert: int) -> float:
    return 1000.0 * layer + expert + 0.5


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


@dataclass
class RecordingAdapter:
    rank: int
    world_size: int
    fingerprint_value: str = "test-engine-v1"
    stale_placement: bool = False
    load_experts: bool = True
    calls: list[tuple[object, ...]] = field(default_factory=list)
    group: dist.ProcessGroup | None = None
    aborted_through: int = 0
    epoch: int = 0
    members: tuple[int, ...] = ()
    iteration: int = 0
    metadata: bytes = b""
    # Set `hang` and the next step blocks (a stuck kernel, a deadlocked engine
    # thread) until `unhang` is set; the agent's thread is unaffected.
    hang: threading.Event = field(default_factory=threading.Event)
    unhang: threading.Event = field(default_factory=threading.Event)
    # A rebuild that takes this long (a slow group build); and, per rebuild,
    # the iterations the engine had completed when it started and ended.
    slow_rebuild_s: float = 0.0
    rebuild_spans: list[tuple[int, int]] = field(default_factory=list)
    staged: list[tuple[int, dist.ProcessGroup]] = field(default_factory=list)
    group_epoch: int = 0

    def __post_init__(self) -> None:
        self._placement = ring_placement(self.world_size)
        self.tensors: dict[tuple[int, int], torch.Tensor] = {}
        for layer, slot_expert in enumerate(self._placement.layers):
            for slot in self._placement.slots_of_rank(self.rank):
                value = (
                    expert_value(layer, slot_expert[slot]) if self.load_experts else float("nan")
                )
                self.tensors[(layer, slot)] = torch.full((4, 3), value, dtype=torch.float64)
        self.metadata = json.dumps({"owner": self.rank, "stale": self.stale_placement}).encode()

    def fingerprint(self) -> str:
        return self.fingerprint_value

    def placement(self) -> Placement:
        if self.stale_placement:
            # A relaunched rank's own view: a reversed, wrong placement.
            return Placement(0, SLOTS_PER_RANK, tuple(t[::-1] for t in self._placement.layers))
        return self._placement

    def abort_collectives(self, epoch: int) -> None:
        self.aborted_through = max(self.aborted_through, epoch)

    def rebuild_groups(self, spec: GroupSpec) -> None:
        # A helper thread, maybe while `step` runs on the current group.
        self.calls.append(("rebuild", spec.epoch, spec.store_prefix, spec.members))
        self.rebuild_spans.append((self.iteration, -1))
        if self.slow_rebuild_s:
            time.sleep(self.slow_rebuild_s)  # a slow build, so the test can see it overlap
        group = build_gloo_group(
            spec, self.rank, "ring", lambda: self.aborted_through >= spec.epoch
        )
        self.staged.append((spec.epoch, group))
        self.rebuild_spans[-1] = (self.rebuild_spans[-1][0], self.iteration)

    def expert_tensors(self, layer: int, slot: int) -> Sequence[torch.Tensor]:
        self.calls.append(("expert", layer, slot))
        return [self.tensors[(layer, slot)]]

    def export_metadata(self) -> bytes:
        self.calls.append(("export",))
        return self.metadata

    def apply_metadata(self, blob: bytes, placement: Placement) -> None:
        self.calls.append(("apply", blob, placement.version))
        self.metadata = blob

    def reload_experts(self, placement: Placement) -> int:
        """Slots whose expert changes take its checkpoint value (expert_value)."""
        self.calls.append(("reload", placement.version))
        loaded = 0
        for layer, slot_expert in enumerate(placement.layers):
            for slot in placement.slots_of_rank(self.rank):
                if self._placement.layers[layer][slot] != slot_expert[slot]:
                    self.tensors[(layer, slot)].fill_(expert_value(layer, slot_expert[slot]))
                    loaded += 1
        self._placement = placement
        return loaded

    def reset_state(self, epoch: int, iteration: int, members: Sequence[int]) -> None:
        self.calls.append(("reset", epoch, iteration, tuple(members)))
        built, group = self.staged[-1]
        assert built == epoch, f"resumed in epoch {epoch} with groups of epoch {built}"
        self.staged.clear()
        release_in_background(self, "group")
        self.group, self.group_epoch = group, epoch
        self.epoch, self.iteration, self.members = epoch, iteration, tuple(members)

    def step(self) -> None:
        """One iteration: an all-reduce every member must join."""
        assert self.group is not None
        if self.hang.is_set():
            self.unhang.wait(60)
        work = self.group.allreduce([torch.ones(1)])
        wait_work(work, lambda: self.aborted_through >= self.group_epoch)
        self.iteration += 1

    def experts_ok(self) -> bool:
        return all(
            bool(torch.all(t == expert_value(layer, self._placement.layers[layer][slot])))
            for (layer, slot), t in self.tensors.items()
        )


class ThreadRank:
    """A rank whose engine loop runs in a thread of the test process."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        coordinator: str,
        etcd: str,
        cluster: str,
        rejoin: bool = False,
        agent_options: Mapping[str, Any] | None = None,
        **adapter_kwargs: object,
    ) -> None:
        """`agent_options`: more AgentConfig fields (tls, etcd_access, ...)."""
        self.adapter = RecordingAdapter(
            rank,
            world_size,
            load_experts=not rejoin,
            **adapter_kwargs,  # type: ignore[arg-type]
        )
        self.agent = WorkerAgent(
            AgentConfig(
                cluster=cluster,
                rank=rank,
                coordinator=coordinator,
                etcd=etcd,
                rejoin=rejoin,
                **(agent_options or {}),
            ),
            self.adapter,
        )
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.hook_calls = 0
        self._thread = threading.Thread(target=self._loop, name=f"rank{rank}", daemon=True)

    def start(self) -> ThreadRank:
        self.agent.start()
        self._thread.start()
        return self

    def _loop(self) -> None:
        adapter = self.adapter
        try:
            while not self.stop_event.is_set():
                self.agent.at_boundary(adapter.iteration)
                self.hook_calls += 1
                try:
                    adapter.step()
                except (StepAborted, CollectiveFailed) as exc:
                    self.agent.on_step_failed(adapter.iteration, exc)
                time.sleep(0.002)
        except AgentStopped:
            pass
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        # The engine shuts down too: a step blocked on a departed peer gives up.
        self.adapter.aborted_through = sys.maxsize
        self.agent.stop()
        self._thread.join(timeout=20)
        if self._thread.is_alive():
            raise AssertionError(f"rank {self.adapter.rank}'s engine thread did not stop")
        if self.error is not None:
            raise self.error


def coordinator_env(**overrides: str) -> dict[str, str]:
    """This process's environment without EP_COORDINATOR_* or systemd variables,
    plus `overrides`: what a coordinator started by a test sees."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("EP_COORDINATOR_")
        and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    env.update(overrides)
    return env


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """Every TCP (host, port) that process `pid` listens on, read from
    /proc (Linux): its socket inodes, then the kernel's table of listeners.
    A socket bound to every interface shows as 0.0.0.0 or ::."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host byte order.
            if sys.byteorder == "little":
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            # gRPC binds 127.0.0.1 on an IPv6 socket, as ::ffff:127.0.0.1.
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            found.add((str(ip), int(port, 16)))
    return found


class CoordinatorProcess:
    """An `ep-coordinator` process. It must lead within 30 s, or with
    `standby=True` stand by (then `wait_leader()` once it should lead).
    `tls` and `token`: how `admin` connects (a coordinator started with TLS
    flags in `extra`)."""

    def __init__(
        self,
        workdir: Path,
        cluster: str,
        world_size: int,
        etcd: str,
        *extra: str,
        standby: bool = False,
        tls: ClientTls | None = None,
        token: str = "",
    ):
        self.tls = tls or ClientTls()
        self.token = token
        # Per rank: its proxy to this coordinator, and to etcd (thread_cluster).
        self.proxies: dict[int, TcpProxy] = {}
        self.etcd_proxies: dict[int, TcpProxy] = {}
        self.ready_file = workdir / f"{cluster}-coordinator.json"
        self.log = (workdir / f"{cluster}-coordinator.log").open("w")
        argv = [
            sys.executable, "-m", "coordinator",
            "--cluster", cluster, "--world-size", str(world_size),
            "--listen", "127.0.0.1:0", "--etcd", etcd,
            "--ready-file", str(self.ready_file), *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self._channel: grpc.Channel | None = None
        try:
            if standby:
                self._wait_role("standby", 30)
            else:
                self.wait_leader(30)
        except BaseException:
            # The test never gets this object to stop: stop it here rather
            # than leave it running (it would outlive the test).
            self.stop()
            raise

    def role(self) -> str:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return str(json.loads(self.ready_file.read_text()).get("role", ""))
        return ""

    def _wait_role(self, role: str, timeout_s: float) -> dict[str, object]:
        try:
            wait_until(
                lambda: self.proc.poll() is not None or self.role() == role,
                timeout_s,
                f"the coordinator to be {role}",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log:\n{self.log_tail()}") from None
        if self.proc.poll() is not None:
            raise AssertionError(f"coordinator exited: {Path(self.log.name).read_text()}")
        return dict(json.loads(self.ready_file.read_text()))

    def wait_leader(self, timeout_s: float = 30) -> None:
        info = self._wait_role("leader", timeout_s)
        self.endpoint = f"127.0.0.1:{info['listen_port']}"
        self._channel = Target(self.endpoint, self.tls, self.token).channel()
        self.admin = admin_pb2_grpc.AdminServiceStub(self._channel)

    def status(self) -> admin_pb2.ClusterStatus:
        return self.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)

    def log_tail(self) -> str:
        self.log.flush()
        text = Path(self.log.name).read_text(errors="replace").splitlines()
        return "\n".join(line for line in text if "progress" not in line)[-8000:]

    def phase(self) -> str:
        return common_pb2.Phase.Name(self.status().phase).removeprefix("PHASE_").lower()

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


TO_SERVER = "to_server"
TO_CLIENT = "to_client"


class _Link:
    """One proxied connection: the client's socket, the upstream one (made
    once traffic towards the server may flow), and a gate per direction."""

    def __init__(self, client: socket.socket, to_server: bool, to_client: bool) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.gates = {TO_SERVER: threading.Event(), TO_CLIENT: threading.Event()}
        if to_server:
            self.gates[TO_SERVER].set()
        if to_client:
            self.gates[TO_CLIENT].set()

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.upstream) if s is not None]


class TcpProxy:
    """A loopback TCP forwarder in front of one server (the coordinator's
    gRPC port, etcd), whose traffic a test controls:

    - `cut()`: the open connections are shut down, as a network blip or a
      rebooted peer does: both ends see the connection end at once (FIN/RST);
      new connections go through.
    - `blackhole()`: nothing is forwarded any more, either way, on the open
      connections and on new ones, and no connection is ended: no RST, no FIN.
      This is a host that vanished or a firewall that drops packets. Both
      ends keep their sockets open and their writes are accepted until the
      socket buffers fill. A new connection completes its TCP handshake with
      this proxy (the kernel accepts it) but reaches nothing: the server
      never hears of it. `existing_only=True` blackholes only the
      connections open now (a NAT or conntrack entry that was dropped): new
      connections go through.
    - `stall(direction)`: the same, one way only (TO_SERVER or TO_CLIENT):
      e.g. the server's pings reach the client but its answers never return.
    - `heal()`: everything held is delivered, in order, and forwarding goes
      on, as TCP's retransmissions deliver it after a partition heals. A
      connection the client gave up on meanwhile reaches the server then
      (and its FIN after it), as its late packets would.

    Bytes are held, never dropped: a healed connection is intact, so what the
    peers see is exactly a silent pause of the given length. Unlike a real
    partition, the client's kernel sees its bytes acknowledged (by the
    proxy's), so TCP-level timeouts (keepalive probes, TCP_USER_TIMEOUT)
    never fire: only what the application does (gRPC keepalive pings, call
    deadlines) can notice the silence.
    """

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        # What new connections get.
        self._flowing = {TO_SERVER: True, TO_CLIENT: True}
        self._closed = False
        self.accepted = 0
        threading.Thread(target=self._accept, name="proxy", daemon=True).start()

    @property
    def links(self) -> int:
        """Connections open through the proxy (held ones included)."""
        with self._lock:
            return len(self._links)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    client.close()
                    return
                link = _Link(client, self._flowing[TO_SERVER], self._flowing[TO_CLIENT])
                self._links.append(link)
                self.accepted += 1
            threading.Thread(target=self._connect, args=(link,), daemon=True).start()

    def _connect(self, link: _Link) -> None:
        # Held while nothing may reach the server: it never hears of this
        # connection (a SYN dropped on the way), until the proxy heals.
        if not self._wait(link.gates[TO_SERVER]):
            return
        try:
            upstream = socket.create_connection(self._target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            self._drop(link)  # the server is down: the client sees its end
            return
        with self._lock:
            if self._closed or link not in self._links:
                upstream.close()
                return
            link.upstream = upstream
        for src, dst, direction in (
            (link.client, upstream, TO_SERVER),
            (upstream, link.client, TO_CLIENT),
        ):
            threading.Thread(
                target=self._pump, args=(link, src, dst, link.gates[direction]), daemon=True
            ).start()

    def _wait(self, gate: threading.Event) -> bool:
        """Until `gate` opens; False once the proxy is closed."""
        while not gate.wait(0.05):
            if self._closed:
                return False
        return not self._closed

    def _pump(
        self, link: _Link, src: socket.socket, dst: socket.socket, gate: threading.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while self._wait(gate):
                data = src.recv(65536)
                # Read just before the gate closed: held here, not dropped;
                # an end of stream is held the same way.
                if not self._wait(gate):
                    return
                if not data:
                    break
                dst.sendall(data)
        self._drop(link)

    def _drop(self, link: _Link) -> None:
        with self._lock:
            if link in self._links:
                self._links.remove(link)
        for s in link.sockets():
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _set(self, to_server: bool, to_client: bool, existing_only: bool = False) -> None:
        with self._lock:
            if not existing_only:
                self._flowing = {TO_SERVER: to_server, TO_CLIENT: to_client}
            links = list(self._links)
        for link in links:
            for direction, flowing in ((TO_SERVER, to_server), (TO_CLIENT, to_client)):
                if flowing:
                    link.gates[direction].set()
                else:
                    link.gates[direction].clear()

    def blackhole(self, existing_only: bool = False) -> None:
        self._set(False, False, existing_only)

    def stall(self, direction: str) -> None:
        if direction not in (TO_SERVER, TO_CLIENT):
            raise ValueError(f"direction must be {TO_SERVER!r} or {TO_CLIENT!r}: {direction!r}")
        self._set(direction != TO_SERVER, direction != TO_CLIENT)

    def heal(self) -> None:
        self._set(True, True)

    def cut(self) -> None:
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            for s in link.sockets():
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            for gate in link.gates.values():
                gate.set()  # a pump holding bytes finds its sockets closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._listener.close()
        self.cut()


@contextlib.contextmanager
def thread_cluster(
    tmp_path: Path,
    etcd: str,
    cluster: str,
    world_size: int,
    *coordinator_args: str,
    proxied: tuple[int, ...] = (),
    etcd_proxied: tuple[int, ...] = (),
    agent_options: Callable[[int], Mapping[str, Any]] | None = None,
    tls: ClientTls | None = None,
    token: str = "",
) -> Iterator[tuple[CoordinatorProcess, dict[int, ThreadRank]]]:
    """A coordinator process and `world_size` thread ranks; the `proxied` ranks
    reach the coordinator through a TcpProxy, found in `coord.proxies`, the
    `etcd_proxied` ranks reach etcd through one, in `coord.etcd_proxies`.
    `agent_options(rank)`: more AgentConfig fields of each rank; `tls` and
    `token`: how the test's admin stub connects."""
    # A work pending on a departed peer keeps its group's destructor waiting for
    # the group timeout; a short one keeps such waits (and the tests) short.
    coord = CoordinatorProcess(
        tmp_path, cluster, world_size, etcd, "--group-timeout-s", "5", *coordinator_args,
        tls=tls, token=token,
    )  # fmt: skip
    ranks: dict[int, ThreadRank] = {}
    try:
        for rank in range(world_size):
            endpoint = coord.endpoint
            if rank in proxied:
                coord.proxies[rank] = TcpProxy(coord.endpoint)
                endpoint = coord.proxies[rank].endpoint
            rank_etcd = etcd
            if rank in etcd_proxied:
                coord.etcd_proxies[rank] = TcpProxy(etcd)
                rank_etcd = coord.etcd_proxies[rank].endpoint
            options = agent_options(rank) if agent_options is not None else None
            ranks[rank] = ThreadRank(
                rank, world_size, endpoint, rank_etcd, cluster, agent_options=options
            ).start()
        wait_until(lambda: coord.phase() == "steady", 30, "the cluster to form")
        yield coord, ranks
    finally:
        stop_together(ranks)
        for proxy in (*coord.proxies.values(), *coord.etcd_proxies.values()):
            proxy.close()
        coord.stop()


# The proof of the sessions tests open by hand on a held_lease.
HELD_PROOF = "proof-of-a-test-session"


@contextlib.contextmanager
def held_lease(etcd: str, cluster: str, rank: int) -> Iterator[int]:
    """A rank's key on a kept-alive lease, as an agent holds it, for sessions a
    test drives by hand (the coordinator accepts a hello only from the holder
    of its rank's lease, with the proof its key names: HELD_PROOF); yields the
    lease id."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=f"lease{rank}", daemon=True)
    thread.start()
    lease = RankLease(
        *etcd_keys.split_endpoint(etcd),
        cluster,
        rank,
        value={"proof_sha256": etcd_keys.proof_digest(HELD_PROOF)},
    )
    try:
        asyncio.run_coroutine_threadsafe(lease.start(), loop).result(15)
        yield lease.lease_id
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(lease.stop(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def key_lease(etcd: str, cluster: str, rank: int) -> int:
    """The lease that holds `rank`'s key in etcd now (0: no key)."""

    async def read() -> int:
        client = etcd_keys.new_client(*etcd_keys.split_endpoint(etcd))
        try:
            got = await client.get(etcd_keys.rank_key(cluster, rank))
            return int(got.lease) if got is not None else 0
        finally:
            await client.close()

    return asyncio.run(read())


def iterating(ranks: dict[int, ThreadRank], steps: int, timeout_s: float, what: str) -> None:
    """Every rank's engine completes `steps` more iterations within the time."""
    start = {rank: r.adapter.iteration for rank, r in ranks.items()}
    wait_until(
        lambda: all(r.adapter.iteration >= start[k] + steps for k, r in ranks.items()),
        timeout_s,
        what,
    )


def assert_alive(ranks: dict[int, ThreadRank]) -> None:
    """No rank's agent stopped, no engine failed or ended."""
    for rank, r in ranks.items():
        assert r.agent._fatal is None, f"rank {rank} stopped: {r.agent._fatal}"
        assert r.error is None, f"rank {rank}'s engine failed: {r.error!r}"
        assert r._thread.is_alive(), f"rank {rank}'s engine thread ended"


def stop_together(ranks: dict[int, ThreadRank]) -> None:
    """Stop every rank at once, as a cluster is shut down: one at a time, each
    stop would start a shrink among the rest."""
    stoppers = [threading.Thread(target=_stop_quietly, args=(r,)) for r in ranks.values()]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join()


def _stop_quietly(rank: ThreadRank) -> None:
    with contextlib.suppress(BaseException):
        rank.stop()
