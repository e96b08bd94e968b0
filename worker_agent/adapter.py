"""What an engine implements so that the agent can execute recovery commands.

Every method except `abort_collectives` and `rebuild_groups` is called on the
engine's own thread, while the engine is held at an iteration boundary (or
inside `on_step_failed`), so an implementation needs no locking of its own.
`rebuild_groups` runs on a helper thread, possibly while the engine still
serves on the previous epoch's groups (an admission builds them before the
pause): it must only build and keep the new groups, which `reset_state`
switches to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from protos.types import Placement

__all__ = ["EngineAdapter", "GroupSpec", "Placement", "StepAborted"]


class StepAborted(RuntimeError):
    """Raised by an engine's collective wait when the agent aborted its epoch."""


@dataclass(frozen=True)
class GroupSpec:
    """Where and how to build the process groups of one epoch.

    Group rank i is cluster rank `members[i]`; every key of the rendezvous lives
    under `store_prefix` on the coordinator-hosted TCPStore, so groups of two
    epochs never mix.
    """

    epoch: int
    store_host: str
    store_port: int
    store_prefix: str
    members: tuple[int, ...]
    timeout_s: float
    # The collective backend of the engine's groups: "gloo" (CPU tensors, the
    # default) or "nccl" (CUDA tensors; the engine picks it from its device,
    # see `worker_agent.groups.backend_for_device`). The agent's own transfer
    # group is always gloo.
    backend: str = "gloo"

    def group_rank(self, rank: int) -> int:
        return self.members.index(rank)


class EngineAdapter(Protocol):
    def fingerprint(self) -> str:
        """Identifies model, weights and engine build; ranks of one cluster agree.
        At most 256 characters (the coordinator refuses a longer one)."""
        ...

    def placement(self) -> Placement:
        """The engine's own view of the expert placement (may be stale on a joiner).
        At most 1,024 layers of 65,536 slots, and 16 MiB in the Hello that
        carries it (protos/limits.py); the coordinator refuses more."""
        ...

    def abort_collectives(self, epoch: int) -> None:
        """Make every pending and future collective of epochs <= `epoch` raise
        `StepAborted`. Called from the agent's thread; must not block."""
        ...

    def rebuild_groups(self, spec: GroupSpec) -> None:
        """Build `spec.epoch`'s process groups and keep them for `reset_state`;
        the engine's current groups stay in use until then. Called on a helper
        thread; a build never switched to is abandoned (kept, never destroyed)."""
        ...

    def expert_tensors(self, layer: int, slot: int) -> Sequence[torch.Tensor]:
        """The tensors of one expert slot, in a fixed order: sent from, or
        received into (in place)."""
        ...

    def export_metadata(self) -> bytes:
        """Placement metadata to hand to the other ranks (from a healthy rank)."""
        ...

    def apply_metadata(self, blob: bytes, placement: Placement) -> None:
        """Adopt metadata exported by a healthy rank and the coordinator's placement."""
        ...

    def reload_experts(self, placement: Placement) -> int:
        """Adopt `placement`: fill every own slot whose logical expert it
        changes from the checkpoint (the engine's weights on disk, only those
        experts), and route by it from now on. Idempotent: a slot that already
        holds its expert is left alone. Called while held in a shrink whose
        survivors lost every replica of some expert. Returns the slots loaded."""
        ...

    def reset_state(self, epoch: int, iteration: int, members: Sequence[int]) -> None:
        """Resume after `iteration` in `epoch` with `members` active: switch to the
        groups `rebuild_groups` built for `epoch`, roll back any work past
        `iteration`, route experts only to `members`, clear per-epoch state."""
        ...
