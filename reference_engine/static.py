"""The fixed-shape decode step: every tensor of the step has a shape fixed at
construction, so on CUDA the whole step (attention, gate, both all-to-alls of
every MoE layer, the experts, the head) is captured once per process group in
a CUDA graph and replayed. The agent's hook runs between steps, outside it.

Shapes: B = max_batch rows (running requests sit in fixed rows; a free row is
inactive), T = max_seq cache positions, C = B * top_k rows of capacity for
each destination rank in the all-to-all, and the experts always run on
world_size * C received rows: the expert matmuls keep one shape however many
ranks the group has, so a row's result does not depend on the membership.

Row by row the arithmetic is the one of `reference_engine.model` (the same
functions, batched), so the tokens match the single-process reference; the
bits of a batched matmul may differ from a row's, which the CPU row path
(engine.py, the default on CPU) avoids. On CPU this path runs eagerly over
gloo; tests run it there.

The KV cache is written in place at the position of the token being fed, and
only there: a step that is aborted or undone leaves every committed position
as it was (the engine keeps rows of the undo state out of new admissions).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from coordinator.logs import fields
from reference_engine.config import ModelConfig
from reference_engine.ep import EPGroup, StepAborted
from reference_engine.model import DTYPE, Weights
from reference_engine.placement import Placement, live_replicas
from reference_engine.staging import ExpertStore

log = logging.getLogger(__name__)

TOKEN, POSITION, SALT, ACTIVE = range(4)


class StaticForward:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: Weights,
        rank: int,
        world_size: int,
        placement: Placement,
        max_batch: int,
        max_seq: int,
        device: torch.device,
        staging: bool,
        cuda_graph: bool = True,
    ) -> None:
        dev = device
        self.cfg = cfg
        self.rank = rank
        self.device = dev
        self.cuda = dev.type == "cuda"
        self.use_graph = cuda_graph and self.cuda
        d, n_layers, n_experts, k = cfg.d_model, cfg.n_layers, cfg.n_experts, cfg.top_k
        spr = placement.slots_per_rank
        self.spr = spr
        self.B, self.T, self.k = max_batch, max_seq, k
        self.C = max_batch * k
        self.n_max = world_size * self.C
        self.embed = weights.embed.to(dev)
        self.layers = [
            tuple(t.to(dev) for t in (lw.wq, lw.wk, lw.wv, lw.wo, lw.gate)) for lw in weights.layers
        ]
        self.lm_head = weights.lm_head.to(dev)
        self.experts = ExpertStore(n_layers, spr, d, cfg.ffn_hidden, DTYPE, dev, staging=staging)
        pin = self.cuda
        self.inp = torch.zeros(4, max_batch, dtype=torch.int64, device=dev)
        self.host_inp = torch.zeros(4, max_batch, dtype=torch.int64, pin_memory=pin)
        self.k_cache = torch.zeros(n_layers, max_batch + 1, max_seq, d, dtype=DTYPE, device=dev)
        self.v_cache = torch.zeros_like(self.k_cache)
        replicas = world_size * spr
        self.cand_dst = torch.zeros(n_layers, n_experts, replicas, dtype=torch.int64, device=dev)
        self.cand_slot = torch.zeros_like(self.cand_dst)
        self.cand_n = torch.ones(n_layers, n_experts, dtype=torch.int64, device=dev)
        self.local = torch.full((n_layers, n_experts), -1, dtype=torch.int64, device=dev)
        self.send = torch.zeros(self.n_max + 1, d + 2, dtype=DTYPE, device=dev)
        self.recv = torch.zeros(self.n_max, d + 2, dtype=DTYPE, device=dev)
        self.back = torch.zeros(self.n_max, d, dtype=DTYPE, device=dev)
        self.ret = torch.zeros(self.n_max + 1, d, dtype=DTYPE, device=dev)  # last row: zeros
        self.rows_b = torch.arange(max_batch, device=dev)
        self.rows_n = torch.arange(self.n_max, device=dev)
        self.t_range = torch.arange(max_seq, device=dev)
        self.e_range = torch.arange(n_experts, device=dev)
        self.w_range = torch.arange(world_size, device=dev)
        n_out = max_batch + n_layers * n_experts
        self.out = torch.zeros(n_out, dtype=torch.int64, device=dev)
        self.host_out = torch.zeros(n_out, dtype=torch.int64, pin_memory=pin)
        self.stream = torch.cuda.Stream(dev) if self.cuda else None
        self.event = torch.cuda.Event() if self.cuda else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self._graph_group: EPGroup | None = None
        self._eager_group: EPGroup | None = None
        self._eager_steps = 0
        self.capture_ms: float | None = None
        self.replays = 0

    # --- routing tables ----------------------------------------------------------

    def set_routes(
        self, placement: Placement, members: Sequence[int], group_members: Sequence[int]
    ) -> None:
        """Route each (layer, expert) to its live replicas among `members`, as
        the row path does: the local replica if there is one, else replica
        (request id + position) % count. Written in place (a graph reads them)."""
        live_members = [m for m in members if m in group_members]
        n_layers, n_experts, replicas = self.cand_dst.shape
        dst = torch.zeros(n_layers, n_experts, replicas, dtype=torch.int64)
        slot = torch.zeros_like(dst)
        count = torch.ones(n_layers, n_experts, dtype=torch.int64)
        local = torch.full((n_layers, n_experts), -1, dtype=torch.int64)
        for layer in range(n_layers):
            for expert in range(n_experts):
                slots = live_replicas(placement, layer, expert, live_members)
                if not slots:
                    continue  # no route: reset_active refuses such members
                count[layer, expert] = len(slots)
                for r, s in enumerate(slots):
                    owner = placement.rank_of_slot(s)
                    dst[layer, expert, r] = list(group_members).index(owner)
                    slot[layer, expert, r] = s - owner * self.spr
                    if owner == self.rank and local[layer, expert] < 0:
                        local[layer, expert] = r
        self.cand_dst.copy_(dst)
        self.cand_slot.copy_(slot)
        self.cand_n.copy_(count)
        self.local.copy_(local)

    # --- the step ----------------------------------------------------------------

    def stepped_on(self, group: EPGroup) -> bool:
        """A step on `group` has completed (CUDA; always True on CPU)."""
        return not self.cuda or (group is self._eager_group and self._eager_steps >= 1)

    def drop_graph(self) -> None:
        self.graph = None
        self._graph_group = None

    def run(
        self,
        group: EPGroup,
        rows: Sequence[tuple[int, int, int, int]],
        aborted: Callable[[], bool],
        may_capture: bool = True,
    ) -> tuple[list[int], list[list[int]]]:
        """One step for `rows` = (row, token, position, salt) of every running
        request; returns the next token of every row and the tokens routed to
        each (layer, expert). Raises StepAborted or CollectiveFailed."""
        host = self.host_inp
        host.zero_()
        for row, token, position, salt in rows:
            if not 0 <= position < self.T:
                raise ValueError(f"position {position} outside the cache (max_seq {self.T})")
            host[TOKEN, row] = token
            host[POSITION, row] = position
            host[SALT, row] = salt
            host[ACTIVE, row] = 1
        if not self.cuda:
            self.inp.copy_(host)
            self._body(group)
            return self._unpack(self.out)
        assert self.stream is not None and self.event is not None
        started = time.perf_counter()
        if group is not self._eager_group:
            self._eager_group, self._eager_steps = group, 0
        first = self._eager_steps == 0
        if (
            self.use_graph
            and self._graph_group is not group
            and self._eager_steps >= 1
            and may_capture
        ):
            self._capture(group)
        with torch.cuda.stream(self.stream):
            self.inp.copy_(host, non_blocking=True)
            if self.graph is not None and self._graph_group is group:
                self.graph.replay()
                self.replays += 1
            else:
                self._body(group)
                self._eager_steps += 1
            self.host_out.copy_(self.out, non_blocking=True)
            self.event.record(self.stream)
        self._wait(aborted)
        if first and group.epoch > 0:  # NCCL connects its peers lazily, at first use
            ms = (time.perf_counter() - started) * 1000.0
            log.info(
                "first step on group",
                extra=fields(rank=self.rank, epoch=group.epoch, ms=round(ms, 2)),
            )
        return self._unpack(self.host_out)

    def _wait(self, aborted: Callable[[], bool]) -> None:
        assert self.event is not None
        spins = 0
        while not self.event.query():
            if aborted():
                raise StepAborted("collective aborted")
            spins += 1
            time.sleep(0 if spins < 2000 else 0.0002)
        if aborted():  # the communicator may have been aborted under this step
            raise StepAborted("collective aborted")

    def _unpack(self, out: torch.Tensor) -> tuple[list[int], list[list[int]]]:
        values = out.tolist()
        n_experts = self.cfg.n_experts
        counts = values[self.B :]
        return values[: self.B], [
            counts[i * n_experts : (i + 1) * n_experts] for i in range(self.cfg.n_layers)
        ]

    def _capture(self, group: EPGroup) -> None:
        assert self.stream is not None
        started = time.perf_counter()
        self.graph = None
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            self._body(group)
        self.graph, self._graph_group = graph, group
        self.capture_ms = (time.perf_counter() - started) * 1000.0
        log.info(
            "cuda graph captured",
            extra=fields(rank=self.rank, epoch=group.epoch, capture_ms=round(self.capture_ms, 2)),
        )

    def _body(self, group: EPGroup) -> None:
        """The step on the static buffers: reads `inp`, writes `out` and the
        KV cache at each active row's position."""
        cfg = self.cfg
        d, k, B, C = cfg.d_model, self.k, self.B, self.C
        n_max, size = self.n_max, group.size
        n_sent = size * C
        token, position, salt = self.inp[TOKEN], self.inp[POSITION], self.inp[SALT]
        active = self.inp[ACTIVE] > 0
        cache_rows = torch.where(active, self.rows_b, B)  # inactive rows write the spare row
        x = self.embed[token]
        counts = []
        for layer, (wq, wk, wv, wo, gate) in enumerate(self.layers):
            # Attention over the cache, the new token's key and value included.
            h = F.layer_norm(x, (d,))
            q, key, value = h @ wq, h @ wk, h @ wv
            self.k_cache[layer].index_put_((cache_rows, position), key)
            self.v_cache[layer].index_put_((cache_rows, position), value)
            keys, values = self.k_cache[layer, :B], self.v_cache[layer, :B]
            scores = (keys @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(d)
            future = self.t_range.unsqueeze(0) > position.unsqueeze(1)
            scores = scores.masked_fill(future, -math.inf)
            probs = torch.softmax(scores, dim=-1)
            x = x + (probs.unsqueeze(1) @ values).squeeze(1) @ wo

            # Gate: top-k experts (descending) and their softmax weights.
            h = F.layer_norm(x, (d,))
            top, experts = torch.topk(h @ gate, k, dim=-1)
            gate_weights = torch.softmax(top, dim=-1)
            hits = (experts.unsqueeze(-1) == self.e_range) & active.view(B, 1, 1)
            counts.append(hits.sum(dim=(0, 1)))

            # Route every (row, choice) to a replica: (group rank, its local slot).
            local = self.local[layer][experts]
            choice = torch.where(local >= 0, local, salt.unsqueeze(1) % self.cand_n[layer][experts])
            valid = active.repeat_interleave(k)
            dst = torch.where(valid, self.cand_dst[layer][experts, choice].reshape(-1), 0)
            slot = self.cand_slot[layer][experts, choice].reshape(-1)
            onehot = (dst.unsqueeze(1) == self.w_range[:size]) & valid.unsqueeze(1)
            rank_in_dst = (onehot.cumsum(0) * onehot).sum(-1) - 1
            index = torch.where(valid, dst * C + rank_in_dst, n_max)
            payload = torch.cat(
                (
                    h.repeat_interleave(k, 0),
                    valid.to(DTYPE).unsqueeze(1),
                    slot.to(DTYPE).unsqueeze(1),
                ),
                dim=1,
            )
            self.send.zero_()
            self.send.index_copy_(0, index, payload)
            group.alltoall_equal(self.recv[:n_sent], self.send[:n_sent])

            # The experts of this rank on every received row (one shape always).
            rows = self.recv[:, :d].contiguous()
            got = self.recv[:, d] > 0.5
            which = self.recv[:, d + 1].to(torch.int64).clamp(0, self.spr - 1)
            w1, w2 = self.experts.w1[layer], self.experts.w2[layer]
            outs = torch.stack([F.gelu(rows @ w1[s]) @ w2[s] for s in range(self.spr)])
            y = outs[which, self.rows_n]
            self.back.copy_(torch.where(got.unsqueeze(1), y, 0.0))
            group.alltoall_equal(self.ret[:n_sent], self.back[:n_sent])

            # Residual plus the weighted expert outputs, in the gate's order.
            at = index.view(B, k)
            for j in range(k):
                x = x + gate_weights[:, j : j + 1] * self.ret[at[:, j]]
        tokens = torch.argmax(F.layer_norm(x, (d,)) @ self.lm_head, dim=-1)
        self.out[:B].copy_(tokens)
        self.out[B:].copy_(torch.stack(counts).reshape(-1))
