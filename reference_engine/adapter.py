"""The reference engine seen through the agent's `EngineAdapter` interface."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from reference_engine.config import ModelConfig
from reference_engine.engine import EPEngine, ExpertSource
from reference_engine.ep import EPGroup
from reference_engine.model import expert_weights
from worker_agent.adapter import EngineAdapter, GroupSpec, Placement


class ReferenceEngineAdapter:
    def __init__(
        self,
        engine: EPEngine,
        cfg: ModelConfig,
        hostname: str = "127.0.0.1",
        experts: ExpertSource | None = None,
    ) -> None:
        """`experts`: where reloaded experts come from (the checkpoint file);
        by default derived from the config's seed, as derive_weights does."""
        self.engine = engine
        self.cfg = cfg
        self.hostname = hostname  # the address this rank's gloo device listens on
        self.experts: ExpertSource = experts or (
            lambda layer, expert: expert_weights(cfg, layer, expert)
        )

    def fingerprint(self) -> str:
        return self.engine.fingerprint

    def placement(self) -> Placement:
        return self.engine.placement

    def abort_collectives(self, epoch: int) -> None:
        # On NCCL this also starts the abort of the epoch's communicator on a
        # helper thread (reference_engine.ep): this call does not block.
        self.engine.abort_signal.abort(epoch)

    def rebuild_groups(self, spec: GroupSpec) -> None:
        # The engine's device decides its groups' backend: gloo on CPU, NCCL on CUDA.
        spec = replace(spec, backend=self.engine.backend)
        group = EPGroup.build(
            spec, self.engine.rank, self.engine.abort_signal, self.hostname, self.engine.device
        )
        self.engine.stage_group(group)  # the engine may be serving: adopted in reset_state

    def expert_tensors(self, layer: int, slot: int) -> Sequence[torch.Tensor]:
        return self.engine.slot_tensors(layer, slot)

    def export_metadata(self) -> bytes:
        meta = {
            "placement_version": self.engine.placement.version,
            "expert_tokens": self.engine.expert_tokens,
        }
        return json.dumps(meta).encode()

    def apply_metadata(self, blob: bytes, placement: Placement) -> None:
        counters = json.loads(blob)["expert_tokens"]
        shape = [self.cfg.n_experts] * self.cfg.n_layers
        if [len(row) for row in counters] != shape:
            raise ValueError(
                f"metadata counters do not match {self.cfg.n_layers} layers x "
                f"{self.cfg.n_experts} experts"
            )
        self.engine.apply_placement(placement)
        self.engine.expert_tokens = [[int(n) for n in row] for row in counters]

    def reload_experts(self, placement: Placement) -> int:
        return self.engine.reload_experts(placement, self.experts)

    def reset_state(self, epoch: int, iteration: int, members: Sequence[int]) -> None:
        self.engine.install_staged(epoch)
        # Expert slots received into pinned host staging reach the device now,
        # before the first step that may route to them.
        self.engine.commit_received()
        if iteration <= self.engine.iteration:
            self.engine.rollback_to(iteration)
        else:
            self.engine.advance_to(iteration)
        self.engine.reset_active(members)


if TYPE_CHECKING:

    def _satisfies_protocol(adapter: ReferenceEngineAdapter) -> EngineAdapter:
        return adapter  # mypy checks the structural match here
