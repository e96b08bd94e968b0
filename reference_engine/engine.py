"""One rank of the reference EP engine.

Attention is data-parallel (each rank decodes its own requests) and the MoE
layers are expert-parallel: every iteration, all member ranks exchange token
rows in all-to-alls, in lockstep, even ranks with nothing to decode.

A step computes into new objects and commits at its end, so a step that raises
leaves the committed state as it was. The state from before the last completed
step is kept: after a rank dies mid-iteration, some survivors may have completed
it and others not, and the recovery rolls everyone back to the lower count.

Two forward paths compute the same tokens. On CPU (the default) each token row
is computed alone and exchanged over gloo with per-rank row counts: the engine
and the single-process reference then agree bit for bit. With a `device` of
cuda (or `static=True` on CPU) the fixed-shape step of `reference_engine.static`
runs instead: expert weights on the device, NCCL all-to-alls of fixed capacity,
the step captured in a CUDA graph per process group (docs/gpu.md).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from coordinator.logs import fields
from reference_engine.config import ModelConfig
from reference_engine.ep import AbortSignal, EPGroup
from reference_engine.model import (
    DTYPE,
    LayerWeights,
    Weights,
    attention_step,
    combine,
    embed,
    empty_cache,
    expert_ffn,
    fingerprint,
    gate_topk,
    layer_norm,
    lm_head_argmax,
)
from reference_engine.placement import Placement, live_replicas
from reference_engine.requests import Request
from reference_engine.staging import CommitResult
from reference_engine.static import StaticForward
from worker_agent.groups import NCCL, backend_for_device

log = logging.getLogger(__name__)

CompleteFn = Callable[[int, tuple[int, ...]], None]
# (layer, logical expert) -> (w1, w2): where reloaded experts come from.
ExpertSource = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]

CAPTURE_WAIT_S = 3.0


@dataclass(frozen=True)
class _Sequence:
    """A request being decoded; tensors are never modified in place once built."""

    request: Request
    fed: int  # tokens fed so far, prompt included
    generated: tuple[int, ...]
    keys: tuple[torch.Tensor, ...]  # per layer, [fed, d] (row path; the static path: ())
    values: tuple[torch.Tensor, ...]
    row: int = -1  # the static path's batch and KV-cache row

    @property
    def next_token(self) -> int:
        prompt = self.request.prompt
        return prompt[self.fed] if self.fed < len(prompt) else self.generated[-1]

    def advanced(
        self, token: int, keys: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...]
    ) -> _Sequence:
        # Predictions made while feeding the prompt are dropped, except the last.
        in_output = self.fed >= len(self.request.prompt) - 1
        generated = (*self.generated, token) if in_output else self.generated
        return _Sequence(self.request, self.fed + 1, generated, keys, values, self.row)

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.request.max_new_tokens


@dataclass(frozen=True)
class _State:
    iteration: int  # completed iterations
    running: tuple[_Sequence, ...]
    # Completed in the last iteration and not yet answered: the next completed
    # iteration proves every rank completed this one, so no rollback can undo it.
    finished: tuple[tuple[int, tuple[int, ...]], ...]


@dataclass(frozen=True)
class _Route:
    local_slot: int | None  # a replica on this rank, taken whenever there is one
    slots: tuple[int, ...]  # all live replicas


class EPEngine:
    def __init__(
        self,
        cfg: ModelConfig,
        rank: int,
        world_size: int,
        placement: Placement,
        weights: Weights,
        load_experts: bool = True,
        on_complete: CompleteFn | None = None,
        max_batch: int = 8,
        device: str | torch.device = "cpu",
        static: bool | None = None,
        staging: bool | None = None,
        max_seq: int = 64,
        cuda_graph: bool = True,
    ) -> None:
        """`device`: where expert weights live and the step runs ("cpu", "cuda",
        "cuda:N"). `static`: the fixed-shape step (default: on any device but
        the CPU). `staging`: transfers through a pinned host mirror (default: on
        CUDA). `max_seq`: the static path's KV-cache positions per request.
        `cuda_graph`: capture the static step on CUDA."""
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.max_batch = max_batch
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.backend = backend_for_device(self.device)
        self.static = self.device.type != "cpu" if static is None else static
        if not self.static and self.device.type != "cpu":
            raise ValueError("the row-by-row path runs on the CPU only: use static=True")
        self.fingerprint = fingerprint(cfg, weights)
        self.abort_signal = AbortSignal()
        self.on_complete = on_complete
        self._weights = weights.without_experts()
        self._placement = placement
        self._slots: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._static: StaticForward | None = None
        self._warm_group: EPGroup | None = None  # warm_up's private NCCL group
        if self.static:
            self._static = StaticForward(
                cfg,
                self._weights,
                rank,
                world_size,
                placement,
                max_batch,
                max_seq,
                self.device,
                staging=self.device.type == "cuda" if staging is None else staging,
                cuda_graph=cuda_graph,
            )
        for layer in range(len(placement.layers)) if not self.static else ():
            for slot in placement.slots_of_rank(rank):
                self._slots[(layer, slot)] = self._empty_slot()
        if load_experts:
            self.load_experts(weights)
        # Routing statistics (tokens per logical expert per layer): best effort,
        # a rolled-back iteration's tokens stay counted.
        self.expert_tokens = [[0] * cfg.n_experts for _ in range(cfg.n_layers)]
        self.members: tuple[int, ...] = tuple(range(world_size))
        self._routes = self._build_routes(self.members)
        self.group: EPGroup | None = None
        # Abandoned groups stay referenced: destroying a gloo group with a work
        # still pending on a dead peer blocks until the group timeout (measured).
        self._retired: list[EPGroup] = []
        # The next epoch's group, built off the engine's thread while it may
        # still serve on `group`; installed by `install_staged` at the resume.
        self._staged: EPGroup | None = None
        self._abandoned: list[EPGroup] = []  # staged, never installed (same reason)
        self._staged_lock = threading.Lock()
        # deque append/popleft/extendleft are atomic: submit() needs no lock.
        self._queue: deque[Request] = deque()
        self._state = _State(0, (), ())
        self._undo: tuple[_State, tuple[Request, ...]] | None = None

    # --- public API ---------------------------------------------------------

    @property
    def iteration(self) -> int:
        return self._state.iteration

    @property
    def placement(self) -> Placement:
        return self._placement

    def submit(self, request: Request) -> None:
        """Queue a request (any thread). The static path refuses one that needs
        more KV-cache positions than `max_seq` (ValueError)."""
        if self._static is not None:
            positions = len(request.prompt) + request.max_new_tokens - 1
            if positions > self._static.T:
                raise ValueError(
                    f"request {request.id} needs {positions} positions; max_seq is {self._static.T}"
                )
        self._queue.append(request)

    def warm_up(self) -> float:
        """CUDA: pay this process's one-time costs before it reports ready (NCCL
        and CUDA initialisation, cuBLAS, the first graph capture), while the
        survivors still serve: a private NCCL group of size 1, one eager step
        and one captured and replayed step with no request. Returns the ms it
        took (0.0 off CUDA). The group stays referenced, idle, never aborted."""
        if self._static is None or self.device.type != "cuda":
            return 0.0
        import torch.distributed as dist

        from worker_agent.groups import configure_nccl_env

        configure_nccl_env()
        started = time.perf_counter()
        backend = dist.ProcessGroupNCCL(dist.HashStore(), 0, 1, dist.ProcessGroupNCCL.Options())
        connect = getattr(backend, "eager_connect_single_device", None)
        if connect is not None:
            connect(self.device)
        group = EPGroup(backend, 0, (self.rank,), self.rank, AbortSignal(), backend=NCCL)  # type: ignore[arg-type]
        self._static.set_routes(self._placement, (self.rank,), (self.rank,))
        for _ in range(2):  # eager, then captured and replayed
            self._static.run(group, [], lambda: False)
        self._static.drop_graph()
        self._warm_group = group
        ms = (time.perf_counter() - started) * 1000.0
        log.info(
            "warmed up", extra=fields(rank=self.rank, device=str(self.device), ms=round(ms, 1))
        )
        return ms

    def busy(self) -> bool:
        return bool(self._state.running or self._state.finished or self._queue)

    def stage_group(self, group: EPGroup) -> None:
        """Keep `group` for `install_staged`; any thread, while the engine serves.
        A group staged earlier and never installed (its operation was abandoned)
        is kept referenced, never destroyed."""
        with self._staged_lock:
            if self._staged is not None:
                self._abandoned.append(self._staged)
            self._staged = group

    def install_staged(self, epoch: int) -> None:
        """Switch to the group staged for `epoch` (engine thread, at the resume);
        nothing to do when it is installed already."""
        with self._staged_lock:
            staged, self._staged = self._staged, None
        if staged is None and self.group is not None and self.group.epoch == epoch:
            return
        if staged is None or staged.epoch != epoch:
            if staged is not None:
                self._abandoned.append(staged)
            raise RuntimeError(
                f"no group was built for epoch {epoch}"
                + (f" (the last one built is epoch {staged.epoch}'s)" if staged else "")
            )
        self.install_group(staged)

    def install_group(self, group: EPGroup) -> None:
        if self.group is not None:
            # NCCL: a retired communicator is aborted (never destroyed: a
            # destroy can hang on a dead peer) on a helper thread, once the
            # new group has completed a step: its 0.5-1 s of teardown then
            # runs neither beside the resync inside the pause nor beside the
            # new communicator's first (connecting) step, where it was seen
            # not to finish (docs/gpu.md). One with a dead member was aborted
            # already, on the agent's Abort.
            self._retired.append(self.group)
        self.group = group
        if self._static is not None:
            self._static.drop_graph()
            self._static.set_routes(self._placement, self.members, group.members)
        log.info(
            "ep group installed",
            extra=fields(
                rank=self.rank,
                epoch=group.epoch,
                members=group.members,
                backend=group.backend,
                build_ms=round(group.build_ms, 2),
            ),
        )

    def reset_active(self, members: Sequence[int]) -> None:
        """Route experts only to replicas on `members` (ValueError if one has none)."""
        members = tuple(members)
        if self.rank not in members:
            raise ValueError(f"rank {self.rank} is not among the members {members}")
        if self.group is not None and not set(members) <= set(self.group.members):
            raise ValueError(f"members {members} outside the group {self.group.members}")
        self._routes = self._build_routes(members)
        self.members = members
        if self._static is not None and self.group is not None:
            self._static.set_routes(self._placement, members, self.group.members)

    def rollback_to(self, iteration: int) -> None:
        """Undo the last completed iteration (if `iteration` is the one before it)."""
        if iteration == self.iteration:
            return
        if iteration != self.iteration - 1 or self._undo is None:
            raise ValueError(
                f"cannot roll back to iteration {iteration} from {self.iteration}: "
                "only the last completed iteration can be undone"
            )
        self._state, admitted = self._undo
        self._undo = None
        self._queue.extendleft(reversed(admitted))
        log.info("rolled back", extra=fields(rank=self.rank, iteration=iteration))

    def advance_to(self, iteration: int) -> None:
        """Renumber to `iteration` (a joiner adopting the cluster's count)."""
        if iteration < self.iteration:
            raise ValueError(f"iteration {iteration} is behind {self.iteration}")
        if iteration > self.iteration:
            self._state = replace(self._state, iteration=iteration)
            self._undo = None

    def slot_tensors(self, layer: int, slot: int) -> list[torch.Tensor]:
        """[W1, W2] of one of this rank's global slots (received into in place).

        With staging (CUDA), these are the slot's pinned host mirror: a filled
        slot is sent from it, and a slot that is not filled is received into
        it and reaches the device at `commit_received`."""
        if self._static is not None:
            spr = self._placement.slots_per_rank
            if slot not in self._placement.slots_of_rank(self.rank) or not 0 <= layer < len(
                self._placement.layers
            ):
                raise ValueError(f"slot {slot} of layer {layer} is not on rank {self.rank}")
            return self._static.experts.transfer_views((layer, slot - self.rank * spr))
        pair = self._slots.get((layer, slot))
        if pair is None:
            raise ValueError(f"slot {slot} of layer {layer} is not on rank {self.rank}")
        return list(pair)

    def load_experts(self, weights: Weights) -> None:
        """Fill this rank's slots from `weights` (the checkpoint), as placed
        now: at start, or when a relaunched rank founds a lost cluster's next
        formation instead of receiving its experts from peers."""
        placement, rank = self._placement, self.rank
        spr = placement.slots_per_rank
        for layer, slot_expert in enumerate(placement.layers):
            lw = weights.layers[layer]
            for slot in placement.slots_of_rank(rank):
                expert = slot_expert[slot]
                if self._static is not None:
                    self._static.experts.load(
                        (layer, slot - rank * spr), lw.w1[expert], lw.w2[expert]
                    )
                else:
                    # Copies: received expert weights land in these in place.
                    self._slots[(layer, slot)] = (lw.w1[expert].clone(), lw.w2[expert].clone())
        if self._static is not None:
            self._static.experts.sync()

    def commit_received(self) -> CommitResult | None:
        """Static path: copy the expert slots received since the last commit to
        the device (pinned host staging to device memory). None on the row path,
        where receives land in place."""
        if self._static is None:
            return None
        result = self._static.experts.commit()
        if result.slots:
            log.info(
                "experts committed",
                extra=fields(
                    rank=self.rank,
                    slots=result.slots,
                    bytes=result.bytes,
                    ms=round(result.ms, 3),
                    staged=self._static.experts.staging,
                ),
            )
        return result

    @property
    def expert_bytes(self) -> int:
        """Bytes of this rank's expert slots."""
        if self._static is not None:
            ex = self._static.experts
            return ex.slot_bytes * ex.n_layers * ex.local_slots
        return sum(t.numel() * t.element_size() for pair in self._slots.values() for t in pair)

    @property
    def graph_replays(self) -> int:
        return 0 if self._static is None else self._static.replays

    def apply_placement(self, placement: Placement) -> None:
        """Adopt `placement`; a slot whose expert changes is emptied (NaN) until
        its weights are received."""
        self._check_shape(placement)
        if self._static is not None:
            spr = self._placement.slots_per_rank
            routes = self._build_routes(self.members, placement)
            for layer, slot_expert in enumerate(placement.layers):
                for slot in placement.slots_of_rank(self.rank):
                    if self._placement.layers[layer][slot] != slot_expert[slot]:
                        self._static.experts.empty((layer, slot - self.rank * spr))
            self._placement, self._routes = placement, routes
            if self.group is not None:
                self._static.set_routes(placement, self.members, self.group.members)
            return
        slots: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, slot_expert in enumerate(placement.layers):
            for slot in placement.slots_of_rank(self.rank):
                kept = self._slots.get((layer, slot))
                same = kept is not None and self._placement.layers[layer][slot] == slot_expert[slot]
                slots[(layer, slot)] = kept if kept is not None and same else self._empty_slot()
        routes = self._build_routes(self.members, placement)
        self._placement, self._slots, self._routes = placement, slots, routes

    def reload_experts(self, placement: Placement, source: ExpertSource) -> int:
        """Adopt `placement`, filling each own slot whose expert it changes
        from `source` (the checkpoint); returns the slots loaded. The engine's
        placement describes what its slots hold at every moment, also when a
        load fails half-way: a retry loads exactly what is still missing."""
        self._check_shape(placement)
        spr = placement.slots_per_rank
        layers = [list(layer) for layer in self._placement.layers]
        loaded = 0
        try:
            for layer, slot_expert in enumerate(placement.layers):
                for slot in placement.slots_of_rank(self.rank):
                    expert = slot_expert[slot]
                    if layers[layer][slot] == expert:
                        continue
                    w1, w2 = source(layer, expert)
                    if self._static is not None:
                        self._static.experts.load((layer, slot - self.rank * spr), w1, w2)
                    else:
                        self._slots[(layer, slot)] = (w1.clone(), w2.clone())
                    layers[layer][slot] = expert
                    loaded += 1
        finally:
            if self._static is not None and loaded:
                self._static.experts.sync()
            self._placement = replace(
                self._placement, layers=tuple(tuple(layer) for layer in layers)
            )
        self._placement, self._routes = placement, self._build_routes(self.members, placement)
        if self._static is not None and self.group is not None:
            self._static.set_routes(placement, self.members, self.group.members)
        return loaded

    def _check_shape(self, placement: Placement) -> None:
        if len(placement.layers) != self.cfg.n_layers:
            raise ValueError(
                f"placement has {len(placement.layers)} layers, the model {self.cfg.n_layers}"
            )
        if placement.slots_per_rank != self._placement.slots_per_rank:
            raise ValueError(
                f"placement has {placement.slots_per_rank} slots per rank, the engine "
                f"{self._placement.slots_per_rank}"
            )

    def step(self) -> None:
        """Decode one token of every running request; raises StepAborted or
        CollectiveFailed with the committed state unchanged."""
        group = self.group
        if group is None:
            raise RuntimeError("no process group installed")
        before = self._state
        if self._static is not None:
            free = self._free_rows(before)
            admitted = self._admit(min(self.max_batch - len(before.running), len(free)))
        else:
            admitted = self._admit(self.max_batch - len(before.running))
        try:
            routed = [[0] * self.cfg.n_experts for _ in range(self.cfg.n_layers)]
            if self._static is not None:
                running = before.running + tuple(
                    _Sequence(r, 0, (), (), (), row) for r, row in zip(admitted, free, strict=False)
                )
                advanced = self._forward_static(group, running, routed)
            else:
                running = before.running + tuple(self._start(r) for r in admitted)
                advanced = self._forward(group, running, routed)
        except BaseException:
            self._queue.extendleft(reversed(admitted))
            raise
        finished = tuple((s.request.id, s.generated) for s in advanced if s.done)
        self._undo = (replace(before, finished=()), admitted)
        self._state = _State(
            before.iteration + 1, tuple(s for s in advanced if not s.done), finished
        )
        for layer, counts in enumerate(routed):
            for expert, n in enumerate(counts):
                self.expert_tokens[layer][expert] += n
        if self.on_complete is not None:
            for request_id, tokens in before.finished:
                self.on_complete(request_id, tokens)

    # --- internals ------------------------------------------------------------

    def _free_rows(self, before: _State) -> list[int]:
        """Static rows no sequence of the current or the undo state holds: a
        new request writes its row's cache from position 0, and a rollback may
        bring back the undo state's sequences with their caches."""
        held = {s.row for s in before.running}
        if self._undo is not None:
            held |= {s.row for s in self._undo[0].running}
        return [row for row in range(self.max_batch) if row not in held]

    def _forward_static(
        self, group: EPGroup, running: Sequence[_Sequence], routed: list[list[int]]
    ) -> list[_Sequence]:
        assert self._static is not None
        if self._static.stepped_on(group):
            for retired in self._retired:
                retired.abort_communicator()  # NCCL only; once per group
        # NCCL groups are dropped once their abort is over; gloo groups stay
        # referenced (see __init__).
        self._retired = [
            g
            for g in self._retired
            if g.backend != NCCL or g.abort_thread is None or g.abort_thread.is_alive()
        ]
        rows = [(s.row, s.next_token, s.fed, s.request.id + s.fed) for s in running]
        # No capture while a retired communicator is being torn down on its
        # helper thread (the step runs eagerly meanwhile), for at most
        # CAPTURE_WAIT_S: the capture is thread-local, so the teardown's CUDA
        # calls cannot invalidate it; the wait only keeps them apart.
        now = time.monotonic()
        quiet = not any(
            g.aborting and now - g.abort_started < CAPTURE_WAIT_S for g in self._retired
        )
        tokens, counts = self._static.run(
            group, rows, lambda: self.abort_signal.aborted(group.epoch), may_capture=quiet
        )
        for layer, row in enumerate(counts):
            for expert, n in enumerate(row):
                routed[layer][expert] += n
        return [s.advanced(tokens[s.row], (), ()) for s in running]

    def _empty_slot(self) -> tuple[torch.Tensor, torch.Tensor]:
        d, h = self.cfg.d_model, self.cfg.ffn_hidden
        return (
            torch.full((d, h), math.nan, dtype=DTYPE),
            torch.full((h, d), math.nan, dtype=DTYPE),
        )

    def _build_routes(
        self, members: Sequence[int], placement: Placement | None = None
    ) -> list[list[_Route]]:
        placement = self._placement if placement is None else placement
        routes = []
        for layer in range(self.cfg.n_layers):
            per_expert = []
            for expert in range(self.cfg.n_experts):
                slots = live_replicas(placement, layer, expert, members)
                if not slots:
                    raise ValueError(
                        f"expert {expert} of layer {layer} has no replica on members {members}"
                    )
                local = [s for s in slots if placement.rank_of_slot(s) == self.rank]
                per_expert.append(_Route(local[0] if local else None, tuple(slots)))
            routes.append(per_expert)
        return routes

    def _admit(self, room: int) -> tuple[Request, ...]:
        admitted: list[Request] = []
        while len(admitted) < room:
            try:
                admitted.append(self._queue.popleft())
            except IndexError:
                break
        return tuple(admitted)

    def _start(self, request: Request) -> _Sequence:
        empty = (empty_cache(self.cfg),) * self.cfg.n_layers
        return _Sequence(request, 0, (), empty, empty)

    def _forward(
        self, group: EPGroup, running: Sequence[_Sequence], routed: list[list[int]]
    ) -> list[_Sequence]:
        xs = [embed(self._weights, s.next_token) for s in running]
        keys = [list(s.keys) for s in running]
        values = [list(s.values) for s in running]
        for layer, lw in enumerate(self._weights.layers):
            for i, s in enumerate(running):
                xs[i], keys[i][layer], values[i][layer] = attention_step(
                    lw, xs[i], s.keys[layer], s.values[layer]
                )
            xs = self._moe(group, layer, lw, running, xs, routed[layer])
        return [
            s.advanced(lm_head_argmax(self._weights.lm_head, x), tuple(k), tuple(v))
            for s, x, k, v in zip(running, xs, keys, values, strict=True)
        ]

    def _moe(
        self,
        group: EPGroup,
        layer: int,
        lw: LayerWeights,
        running: Sequence[_Sequence],
        xs: list[torch.Tensor],
        routed: list[int],
    ) -> list[torch.Tensor]:
        d, spr = self.cfg.d_model, self._placement.slots_per_rank
        # Rows bound for each group rank: [h, local slot index at the owner].
        outbox: list[list[torch.Tensor]] = [[] for _ in range(group.size)]
        gates: list[tuple[torch.Tensor, list[tuple[int, int]]]] = []
        for s, x in zip(running, xs, strict=True):
            h = layer_norm(x)
            experts, weights = gate_topk(lw.gate, h, self.cfg.top_k)
            targets = []
            for expert in experts:
                routed[expert] += 1
                route = self._routes[layer][expert]
                slot = route.local_slot
                if slot is None:
                    # Replicas hold identical weights: any choice gives the same
                    # bits; spreading by request and position balances the load.
                    slot = route.slots[(s.request.id + s.fed) % len(route.slots)]
                owner = self._placement.rank_of_slot(slot)
                dst = group.members.index(owner)
                targets.append((dst, len(outbox[dst])))
                tag = torch.tensor([slot - owner * spr], dtype=DTYPE)
                outbox[dst].append(torch.cat((h, tag)))
            gates.append((weights, targets))

        send_counts = [len(rows) for rows in outbox]
        # Counts first: this exchange also proves every member entered the layer.
        recv_counts = group.alltoall(
            torch.tensor(send_counts, dtype=torch.int64), [1] * group.size, [1] * group.size
        ).tolist()
        flat = [row for rows in outbox for row in rows]
        packed = torch.stack(flat) if flat else torch.empty(0, d + 1, dtype=DTYPE)
        inbox = group.alltoall(packed, send_counts, recv_counts)

        outs = []
        base = self.rank * spr
        for row in inbox:
            w1, w2 = self._slots[(layer, base + int(row[d]))]
            # A fresh copy: a matmul over a view at another offset may round differently.
            outs.append(expert_ffn(w1, w2, row[:d].clone()))
        results = torch.stack(outs) if outs else torch.empty(0, d, dtype=DTYPE)
        returned = group.alltoall(results, recv_counts, send_counts)

        offsets = [sum(send_counts[:g]) for g in range(group.size)]
        return [
            combine(x, weights, [returned[offsets[dst] + j] for dst, j in targets])
            for x, (weights, targets) in zip(xs, gates, strict=True)
        ]
