"""One rank of the reference EP engine.

Attention is data-parallel (each rank decodes its own requests) and the MoE
layers are expert-parallel: every iteration, all member ranks exchange token
rows in all-to-alls, in lockstep, even ranks with nothing to decode.

A step computes into new objects and commits at its end, so a step that raises
leaves the committed state as it was. The state from before the last completed
step is kept: after a rank dies mid-iteration, some survivors may have completed
it and others not, and the recovery rolls everyone back to the lower count.
"""

from __future__ import annotations

import logging
import math
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

log = logging.getLogger(__name__)

CompleteFn = Callable[[int, tuple[int, ...]], None]


@dataclass(frozen=True)
class _Sequence:
    """A request being decoded; tensors are never modified in place once built."""

    request: Request
    fed: int  # tokens fed so far, prompt included
    generated: tuple[int, ...]
    keys: tuple[torch.Tensor, ...]  # per layer, [fed, d]
    values: tuple[torch.Tensor, ...]

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
        return _Sequence(self.request, self.fed + 1, generated, keys, values)

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
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.max_batch = max_batch
        self.fingerprint = fingerprint(cfg, weights)
        self.abort_signal = AbortSignal()
        self.on_complete = on_complete
        self._weights = weights.without_experts()
        self._placement = placement
        self._slots: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, slot_expert in enumerate(placement.layers):
            for slot in placement.slots_of_rank(rank):
                if load_experts:
                    lw = weights.layers[layer]
                    expert = slot_expert[slot]
                    # Copies: received expert weights land in these in place.
                    pair = (lw.w1[expert].clone(), lw.w2[expert].clone())
                else:
                    pair = self._empty_slot()
                self._slots[(layer, slot)] = pair
        # Routing statistics (tokens per logical expert per layer): best effort,
        # a rolled-back iteration's tokens stay counted.
        self.expert_tokens = [[0] * cfg.n_experts for _ in range(cfg.n_layers)]
        self.members: tuple[int, ...] = tuple(range(world_size))
        self._routes = self._build_routes(self.members)
        self.group: EPGroup | None = None
        # Abandoned groups stay referenced: destroying a gloo group with a work
        # still pending on a dead peer blocks until the group timeout (measured).
        self._retired: list[EPGroup] = []
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
        """Queue a request (any thread)."""
        self._queue.append(request)

    def busy(self) -> bool:
        return bool(self._state.running or self._state.finished or self._queue)

    def install_group(self, group: EPGroup) -> None:
        if self.group is not None:
            self._retired.append(self.group)
        self.group = group
        log.info("ep group installed", extra=fields(epoch=group.epoch, members=group.members))

    def reset_active(self, members: Sequence[int]) -> None:
        """Route experts only to replicas on `members` (ValueError if one has none)."""
        members = tuple(members)
        if self.rank not in members:
            raise ValueError(f"rank {self.rank} is not among the members {members}")
        if self.group is not None and not set(members) <= set(self.group.members):
            raise ValueError(f"members {members} outside the group {self.group.members}")
        self._routes = self._build_routes(members)
        self.members = members

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
        """[W1, W2] of one of this rank's global slots (received into in place)."""
        pair = self._slots.get((layer, slot))
        if pair is None:
            raise ValueError(f"slot {slot} of layer {layer} is not on rank {self.rank}")
        return list(pair)

    def apply_placement(self, placement: Placement) -> None:
        """Adopt `placement`; a slot whose expert changes is emptied (NaN) until
        its weights are received."""
        if len(placement.layers) != self.cfg.n_layers:
            raise ValueError(
                f"placement has {len(placement.layers)} layers, the model {self.cfg.n_layers}"
            )
        slots: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, slot_expert in enumerate(placement.layers):
            for slot in placement.slots_of_rank(self.rank):
                kept = self._slots.get((layer, slot))
                same = kept is not None and self._placement.layers[layer][slot] == slot_expert[slot]
                slots[(layer, slot)] = kept if kept is not None and same else self._empty_slot()
        routes = self._build_routes(self.members, placement)
        self._placement, self._slots, self._routes = placement, slots, routes

    def step(self) -> None:
        """Decode one token of every running request; raises StepAborted or
        CollectiveFailed with the committed state unchanged."""
        group = self.group
        if group is None:
            raise RuntimeError("no process group installed")
        before = self._state
        admitted = self._admit(self.max_batch - len(before.running))
        try:
            running = before.running + tuple(self._start(r) for r in admitted)
            routed = [[0] * self.cfg.n_experts for _ in range(self.cfg.n_layers)]
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
