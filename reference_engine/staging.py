"""The expert slots of one rank, on the engine's device, with pinned host staging.

The slots of a layer are stacked (`w1` [layers, local slots, d, ffn], `w2`
[layers, local slots, ffn, d]), so a fixed-shape step (and a CUDA graph of it)
reads them at fixed addresses; a slot is a view and is only ever written in
place.

With staging (the default on CUDA), a pinned host mirror of the same layout is
kept. Transfers go through it: a source sends straight from its mirror (no
device-to-host copy in the pause), and a slot that is not filled receives into
its mirror, then `commit()` copies every received slot to the device with
non-blocking copies from pinned memory (bench/gpu.py: per-slot copies from
pinned memory run at the host-to-device bound). Without staging (CPU), the
transfer views are the slots themselves and receives land in place.

Which slots are "filled" (hold their expert's weights) is tracked: a slot
loaded from the checkpoint or committed after a receive is filled; a slot
emptied by a placement change (or never loaded, on a joiner) is not, and is
the one a transfer into this rank targets.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

Key = tuple[int, int]  # (layer, local slot index)


@dataclass(frozen=True)
class CommitResult:
    slots: int
    bytes: int
    ms: float


class ExpertStore:
    def __init__(
        self,
        n_layers: int,
        local_slots: int,
        d_model: int,
        ffn_hidden: int,
        dtype: torch.dtype,
        device: torch.device,
        staging: bool,
        pin: bool | None = None,
    ) -> None:
        self.device = device
        self.staging = staging
        self.n_layers = n_layers
        self.local_slots = local_slots
        shape1 = (n_layers, local_slots, d_model, ffn_hidden)
        shape2 = (n_layers, local_slots, ffn_hidden, d_model)
        self.w1 = torch.full(shape1, math.nan, dtype=dtype, device=device)
        self.w2 = torch.full(shape2, math.nan, dtype=dtype, device=device)
        self.host1: torch.Tensor | None = None
        self.host2: torch.Tensor | None = None
        if staging:
            if pin is None:
                pin = device.type == "cuda"
            self.pinned = bool(pin)
            self.host1 = torch.empty(shape1, dtype=dtype, pin_memory=self.pinned).fill_(math.nan)
            self.host2 = torch.empty(shape2, dtype=dtype, pin_memory=self.pinned).fill_(math.nan)
        else:
            self.pinned = False
        self.filled: set[Key] = set()
        self.pending: set[Key] = set()
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def slot_bytes(self) -> int:
        return (self.w1[0, 0].numel() + self.w2[0, 0].numel()) * self.w1.element_size()

    def load(self, key: Key, w1: torch.Tensor, w2: torch.Tensor) -> None:
        """Fill a slot from host tensors (the checkpoint's)."""
        layer, i = key
        if self.host1 is not None and self.host2 is not None:
            self.host1[layer, i].copy_(w1)
            self.host2[layer, i].copy_(w2)
            self.w1[layer, i].copy_(self.host1[layer, i], non_blocking=True)
            self.w2[layer, i].copy_(self.host2[layer, i], non_blocking=True)
        else:
            self.w1[layer, i].copy_(w1)
            self.w2[layer, i].copy_(w2)
        self.filled.add(key)
        self.pending.discard(key)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def empty(self, key: Key) -> None:
        """The slot's expert changes: NaN until its weights are received."""
        layer, i = key
        self.w1[layer, i].fill_(math.nan)
        self.w2[layer, i].fill_(math.nan)
        if self.host1 is not None and self.host2 is not None:
            self.host1[layer, i].fill_(math.nan)
            self.host2[layer, i].fill_(math.nan)
        self.filled.discard(key)
        self.pending.discard(key)

    def device_views(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        layer, i = key
        return self.w1[layer, i], self.w2[layer, i]

    def transfer_views(self, key: Key) -> list[torch.Tensor]:
        """[W1, W2] to send from (a filled slot) or receive into (one that is
        not: it is committed to the device by the next `commit`)."""
        layer, i = key
        if key not in self.filled:
            self.pending.add(key)
        if self.host1 is not None and self.host2 is not None:
            return [self.host1[layer, i], self.host2[layer, i]]
        return [self.w1[layer, i], self.w2[layer, i]]

    def commit(self) -> CommitResult:
        """Copy every slot received since the last commit to the device; they
        are filled from then on."""
        started = time.perf_counter()
        keys = sorted(self.pending)
        moved = 0
        if self.host1 is not None and self.host2 is not None and keys:
            stream = self._copy_stream
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for layer, i in keys:
                        self.w1[layer, i].copy_(self.host1[layer, i], non_blocking=True)
                        self.w2[layer, i].copy_(self.host2[layer, i], non_blocking=True)
                stream.synchronize()
            else:
                for layer, i in keys:
                    self.w1[layer, i].copy_(self.host1[layer, i])
                    self.w2[layer, i].copy_(self.host2[layer, i])
            moved = len(keys) * self.slot_bytes
        self.filled.update(keys)
        self.pending.clear()
        return CommitResult(len(keys), moved, (time.perf_counter() - started) * 1000.0)
