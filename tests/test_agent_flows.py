"""Recovery flows through the real coordinator process, real etcd, real gRPC and
real gloo groups, with WorkerAgents driving the minimal engine of agent_harness.

Each test reproduces one pitfall from the seed PR's review and shows it fixed.
"""

from __future__ import annotations

import json
import queue
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.ep_recovery.v1 import admin_pb2, worker_pb2, worker_pb2_grpc
from tests.agent_harness import (
    HELD_PROOF,
    LAYERS,
    SLOTS_PER_RANK,
    CoordinatorProcess,
    ThreadRank,
    held_lease,
    ring_placement,
    thread_cluster,
    wait_until,
)
from worker_agent.agent import NEVER

WORLD = 4


def _status_key(coord: object) -> tuple[object, ...]:
    s = coord.status()  # type: ignore[attr-defined]
    return (s.epoch, s.phase, tuple(s.members), tuple(s.pending_members), len(s.operations))


def _rejoin(coord, ranks, rank: int, etcd: str, cluster: str) -> ThreadRank:  # type: ignore[no-untyped-def]
    ranks.pop(rank).stop()  # the agent revokes its lease: the coordinator sees it leave
    wait_until(lambda: coord.phase() == "degraded", 30, f"the cluster to shrink without {rank}")
    assert rank not in coord.status().members
    joiner = ThreadRank(
        rank, WORLD, coord.endpoint, etcd, cluster, rejoin=True, stale_placement=True
    ).start()
    ranks[rank] = joiner
    wait_until(
        lambda: coord.phase() == "steady" and len(coord.status().members) == WORLD,
        30,
        f"rank {rank} to be admitted",
    )
    return joiner


@pytest.mark.parametrize("victim", [2, 0])
def test_rejoin_uses_one_plan_from_healthy_ranks(
    tmp_path: Path, etcd: str, cluster_name: str, victim: int
) -> None:
    with thread_cluster(tmp_path, etcd, cluster_name, WORLD) as (coord, ranks):
        joiner = _rejoin(coord, ranks, victim, etcd, cluster_name)
        wait_until(lambda: any(c[0] == "reset" for c in joiner.adapter.calls), 10, "reset")
        # The joiner's slots hold the right experts although its own view of the
        # placement was stale: the plan came from the coordinator's placement.
        assert joiner.adapter.experts_ok()
        # The experts moved before the pause: every slot of the joiner was
        # written before it built the new epoch's groups (the prefetch), and
        # the pause's resync moved none again.
        calls = joiner.adapter.calls
        rebuilt = next(i for i, c in enumerate(calls) if c[0] == "rebuild")
        written = [i for i, c in enumerate(calls) if c[0] == "expert"]
        assert written and max(written) < rebuilt
        assert len(written) == LAYERS * SLOTS_PER_RANK
        # Metadata came from a healthy rank, never from the rejoined one.
        applied = [c for c in joiner.adapter.calls if c[0] == "apply"]
        assert applied and json.loads(applied[-1][1])["owner"] != victim
        # Every expert read on a survivor was one of its own slots (sources are healthy).
        placement = ring_placement(WORLD)
        for rank, r in ranks.items():
            for call in r.adapter.calls:
                if call[0] == "expert":
                    assert placement.rank_of_slot(call[2]) == rank
        # Groups: every rank present built the same epochs with the same members, in order.
        epochs = {
            rank: [(c[1], c[3]) for c in r.adapter.calls if c[0] == "rebuild"]
            for rank, r in ranks.items()
        }
        last = epochs[victim][-1]
        assert all(e[-1] == last for e in epochs.values())
        assert last[1] == tuple(range(WORLD))
        assert all("epoch-" + str(e) in c[2] for r in ranks.values() for c in r.adapter.calls
                   if c[0] == "rebuild" for e in [c[1]])  # fmt: skip


def test_survivors_serve_while_the_admissions_groups_are_built(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    # The next epoch's groups are built before the pause: a slow build costs
    # the survivors nothing, their stall is the hold, the resync and the resume.
    slow_s = 1.0
    with thread_cluster(tmp_path, etcd, cluster_name, WORLD) as (coord, ranks):
        ranks.pop(3).stop()
        wait_until(lambda: coord.phase() == "degraded", 30, "the cluster to shrink without 3")
        for r in ranks.values():
            r.adapter.slow_rebuild_s = slow_s
        builds_before = {rank: len(r.adapter.rebuild_spans) for rank, r in ranks.items()}
        ranks[3] = ThreadRank(
            3, WORLD, coord.endpoint, etcd, cluster_name, rejoin=True, stale_placement=True
        ).start()
        wait_until(
            lambda: coord.phase() == "steady" and len(coord.status().members) == WORLD,
            60,
            "rank 3 to be admitted",
        )
        for rank in (0, 1, 2):
            adapter = ranks[rank].adapter
            assert len(adapter.rebuild_spans) == builds_before[rank] + 1
            started, ended = adapter.rebuild_spans[-1]
            assert ended > started, f"rank {rank} did not serve during its build"
            stall_ms = ranks[rank].agent.stall_ms[-1]
            assert stall_ms < slow_s * 1000, f"rank {rank} was held {stall_ms:.0f} ms"


def test_no_recovery_starts_by_itself_after_a_rejoin(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    with thread_cluster(tmp_path, etcd, cluster_name, WORLD) as (coord, ranks):
        _rejoin(coord, ranks, 1, etcd, cluster_name)
        before = _status_key(coord)
        start = {rank: r.adapter.iteration for rank, r in ranks.items()}
        wait_until(
            lambda: all(r.adapter.iteration >= start[k] + 200 for k, r in ranks.items()),
            60,
            "200 more iterations on every rank",
        )
        assert _status_key(coord) == before
        assert coord.phase() == "steady"


def test_idle_hook_makes_no_call_out_of_python() -> None:
    # A syscall, a lock or a device sync all go through a C function call; the
    # profiler reports every one. The idle hook must produce none.
    from tests.agent_harness import RecordingAdapter
    from worker_agent.agent import AgentConfig, WorkerAgent

    agent = WorkerAgent(AgentConfig("c", 0, "127.0.0.1:1", "127.0.0.1:1"), RecordingAdapter(0, 4))
    agent._hold_at = NEVER  # admitted and idle, as after a Resume
    events: list[tuple[str, str]] = []

    def profile(frame, event, arg):  # type: ignore[no-untyped-def]
        events.append((event, getattr(arg, "__name__", frame.f_code.co_name)))

    sys.setprofile(profile)
    try:
        for i in range(1000):
            agent.at_boundary(i)
    finally:
        sys.setprofile(None)
    # The last event is sys.setprofile(None) switching the profiler off.
    calls = [e for e in events if e[0] != "return" and e != ("c_call", "setprofile")]
    assert calls and all(e == ("call", "at_boundary") for e in calls), set(calls)


# --- bad input: refused with a clear status, nothing in the cluster changes ---------


def _raw_session(endpoint: str, hello: worker_pb2.Hello) -> tuple[object, object]:
    """A hand-driven session: the test puts messages in the queue (None ends it)."""
    channel = grpc.insecure_channel(endpoint)
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    q: queue.Queue[worker_pb2.WorkerMessage | None] = queue.Queue()
    q.put(worker_pb2.WorkerMessage(hello=hello))

    def requests():  # type: ignore[no-untyped-def]
        while (item := q.get()) is not None:
            yield item

    responses = stub.Session(requests())
    return (channel, responses, q)  # type: ignore[return-value]


def _hello(cluster: str, rank: int, **kw: object) -> worker_pb2.Hello:
    return worker_pb2.Hello(
        cluster=cluster,
        rank=rank,
        fingerprint=str(kw.pop("fingerprint", "test-engine-v1")),
        incarnation=uuid.uuid4().hex,
        placement=ring_placement(WORLD).to_proto(),
        proof=HELD_PROOF,
        **kw,  # type: ignore[arg-type]
    )


def test_bad_registrations_are_refused_and_change_nothing(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    with thread_cluster(tmp_path, etcd, cluster_name, WORLD) as (coord, _ranks):
        before = _status_key(coord)
        cases = [
            (_hello(cluster_name, 7, rejoin=True), grpc.StatusCode.INVALID_ARGUMENT, "rank 7"),
            (_hello(cluster_name, 1, rejoin=True), grpc.StatusCode.ALREADY_EXISTS, "rank 1"),
            (_hello("other", 1, rejoin=True), grpc.StatusCode.INVALID_ARGUMENT, "'other'"),
            (_hello(cluster_name, 2), grpc.StatusCode.ALREADY_EXISTS, "rank 2"),
        ]
        for hello, code, needle in cases:
            channel, responses, q = _raw_session(coord.endpoint, hello)  # type: ignore[misc]
            with pytest.raises(grpc.RpcError) as info:
                next(responses)  # type: ignore[call-overload]
            assert info.value.code() == code, info.value.details()
            assert needle in info.value.details()
            q.put(None)
            channel.close()  # type: ignore[attr-defined]
        assert _status_key(coord) == before


def test_foreign_joiner_and_stale_ack_are_refused_and_change_nothing(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    with thread_cluster(tmp_path, etcd, cluster_name, WORLD, "--no-auto-rejoin") as (coord, ranks):
        ranks.pop(3).stop()
        wait_until(lambda: coord.phase() == "degraded", 30, "the cluster to shrink without 3")
        before = _status_key(coord)

        # A joiner built from another engine or model: refused at the door.
        channel, responses, q = _raw_session(  # type: ignore[misc]
            coord.endpoint, _hello(cluster_name, 3, rejoin=True, fingerprint="other-engine")
        )
        with pytest.raises(grpc.RpcError) as info:
            next(responses)  # type: ignore[call-overload]
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
        assert "other-engine" in info.value.details()
        q.put(None)
        channel.close()  # type: ignore[attr-defined]
        assert _status_key(coord) == before

        # A matching joiner whose ack names an old epoch and operation: refused in
        # band (the session stays), and the cluster does not move.
        # It holds rank 3's lease, as an agent does.
        with held_lease(etcd, cluster_name, 3) as lease:
            channel, responses, q = _raw_session(  # type: ignore[misc]
                coord.endpoint, _hello(cluster_name, 3, rejoin=True, lease_id=lease)
            )
            try:
                assert next(responses).HasField("welcome")  # type: ignore[call-overload]
                before = _status_key(coord)
                q.put(
                    worker_pb2.WorkerMessage(
                        ack=worker_pb2.Ack(
                            epoch=1, op_id="old-op", command_id=1, held=worker_pb2.Held(iteration=5)
                        )
                    )
                )
                refusal = next(responses)  # type: ignore[call-overload]
                assert refusal.HasField("refusal"), refusal
                assert refusal.refusal.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
                assert "old-op" in refusal.refusal.message and "epoch 1" in refusal.refusal.message
                assert _status_key(coord) == before
            finally:
                q.put(None)
                channel.close()  # type: ignore[attr-defined]


def test_survivors_past_the_target_are_retargeted_to_one_cut(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    # Rank 0's first hold order arrives 0.3 s late (a stalled agent thread, a
    # slow link): by then it has run past the target and sits in the next
    # step's collective, waiting for peers that hold at the target. The seed's
    # ranks deadlocked here; ours report PastTarget and are retargeted.
    with thread_cluster(tmp_path, etcd, cluster_name, WORLD) as (coord, ranks):
        late = ranks[0].agent
        on_hold = late._on_hold
        delayed: list[int] = []

        def late_on_hold(order: Any) -> None:
            if not delayed:
                delayed.append(order.command.hold.iteration)
                time.sleep(0.3)
            on_hold(order)

        late._on_hold = late_on_hold  # type: ignore[method-assign]
        _rejoin(coord, ranks, 2, etcd, cluster_name)
        assert delayed, "no hold order reached rank 0"
        grow = [op for op in coord.status().operations if op.kind == "grow"]
        assert [op.outcome for op in grow] == ["completed"]
        assert grow[0].retargets >= 1
        # One cut: every rank resumed the new epoch from the same iteration,
        # past the first target.
        resets = {
            rank: next(c for c in reversed(r.adapter.calls) if c[0] == "reset")
            for rank, r in ranks.items()
        }
        assert len({(c[1], c[2]) for c in resets.values()}) == 1, resets
        assert resets[0][2] > delayed[0]
        # And they serve again, in lockstep, on the new groups.
        start = {rank: r.adapter.iteration for rank, r in ranks.items()}
        wait_until(
            lambda: all(r.adapter.iteration >= start[k] + 20 for k, r in ranks.items()),
            30,
            "20 more iterations on every rank",
        )


def test_a_session_blip_reattaches_the_rank_without_a_recovery(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    # Rank 1's connection to the coordinator is cut (a network blip); its
    # process and lease live. It reconnects on its own and stays a member: the
    # broken session alone was only a suspicion.
    with thread_cluster(tmp_path, etcd, cluster_name, WORLD, proxied=(1,)) as (coord, ranks):
        proxy = coord.proxies[1]
        before = _status_key(coord)
        for _ in range(2):
            accepted = proxy.accepted
            proxy.cut()
            wait_until(lambda a=accepted: proxy.accepted > a, 10, "rank 1 to reconnect")
            start = {rank: r.adapter.iteration for rank, r in ranks.items()}
            wait_until(
                lambda s=start: all(r.adapter.iteration >= s[k] + 20 for k, r in ranks.items()),
                30,
                "20 more iterations on every rank",
            )
        assert _status_key(coord) == before
        assert coord.phase() == "steady"
        assert not coord.status().failures


def test_a_restarted_coordinator_takes_over_without_restarting_a_rank(
    tmp_path: Path, etcd: str, cluster_name: str, free_port: int
) -> None:
    # The daemon is SIGKILLed and started again on the same address (as systemd
    # does): it reads the persisted record, the agents reconnect with their
    # process and lease intact, and the cluster goes on in the same epoch.
    listen = ("--listen", f"127.0.0.1:{free_port}")
    ttl = ("--leader-ttl-s", "2")
    with thread_cluster(tmp_path, etcd, cluster_name, WORLD, *listen, *ttl) as (coord, ranks):
        epoch = coord.status().epoch
        coord.proc.kill()
        coord.proc.wait()
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        # The first one's leader key outlives it by its lease TTL (2 s here):
        # the second stands by until then.
        second = CoordinatorProcess(
            second_dir, cluster_name, WORLD, etcd, "--group-timeout-s", "5", *listen, *ttl
        )
        try:
            status = second.status()
            assert (status.epoch, list(status.members)) == (epoch, list(range(WORLD)))
            wait_until(
                lambda: all(r.state == admin_pb2.RANK_STATE_SERVING for r in second.status().ranks),
                30,
                "every rank to reconnect to the new coordinator",
            )
            start = {rank: r.adapter.iteration for rank, r in ranks.items()}
            wait_until(
                lambda: all(r.adapter.iteration >= start[k] + 20 for k, r in ranks.items()),
                30,
                "20 more iterations on every rank",
            )
            assert second.status().epoch == epoch and not second.status().failures
            # The new coordinator runs the next recovery end to end.
            _rejoin(second, ranks, 1, etcd, cluster_name)
            assert second.status().epoch == epoch + 2
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\n--- new coordinator log ---\n{second.log_tail()}"
            ) from exc
        finally:
            second.stop()


def test_a_rank_stuck_with_its_lease_alive_is_declared_hung_and_rejoins(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    # Rank 1's engine thread blocks inside a step; its agent thread and lease
    # live on, so neither a broken session nor the lease finds it. Its peers
    # block in the next all-reduce until the group timeout (5 s here) and
    # report failed steps; rank 1 has not moved for the hang timeout: hung.
    hang = ("--hang-timeout-s", "2")
    # Rank 1's lease must outlive the hang (the scenario's premise): with the
    # default 1 s TTL, a keepalive starved on a loaded CI host let the lease
    # find it first.
    options = {1: {"lease_ttl_s": 30}}
    with thread_cluster(
        tmp_path, etcd, cluster_name, WORLD, *hang, agent_options=lambda r: options.get(r, {})
    ) as (coord, ranks):
        stuck = ranks[1]
        try:
            stuck.adapter.hang.set()
            wait_until(lambda: coord.phase() == "degraded", 30, "the shrink without rank 1")
            failures = coord.status().failures
            assert len(failures) == 1, f"expected only rank 1 to fail: {failures}"
            [failure] = failures
            assert failure.rank == 1 and "no progress for 2 s" in failure.reason
            assert list(coord.status().members) == [0, 2, 3]
            # Its session was ended: the engine stops at its next boundary, as
            # its supervisor would see, and is relaunched to rejoin.
            wait_until(lambda: stuck.agent._fatal is not None, 10, "rank 1's agent to stop")
            assert "declared hung" in (stuck.agent._fatal or "")
        finally:
            stuck.adapter.unhang.set()
        ranks.pop(1).stop()  # the engine thread ends with AgentStopped
        ranks[1] = ThreadRank(1, WORLD, coord.endpoint, etcd, cluster_name, rejoin=True).start()
        wait_until(
            lambda: coord.phase() == "steady" and len(coord.status().members) == WORLD,
            30,
            "rank 1 to be admitted again",
        )
