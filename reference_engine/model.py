"""Weights of the reference MoE decoder and the per-token functions that use them.

Every function here works on ONE token row at a time. A matmul over an [n, d]
batch may round differently from n row-by-row matmuls, so batching tokens would
make a rank's output depend on what else it serves; row by row, the engine and
the single-process reference compute bit-identical tokens.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from reference_engine.config import ModelConfig

DTYPE = torch.float64


@dataclass(frozen=True)
class LayerWeights:
    wq: torch.Tensor  # [d, d]
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    gate: torch.Tensor  # [d, n_experts]
    w1: tuple[torch.Tensor, ...]  # per logical expert, [d, ffn_hidden]
    w2: tuple[torch.Tensor, ...]  # per logical expert, [ffn_hidden, d]


@dataclass(frozen=True)
class Weights:
    embed: torch.Tensor  # [vocab, d]
    layers: tuple[LayerWeights, ...]
    lm_head: torch.Tensor  # [d, vocab]

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor under a stable name, in a fixed order."""
        yield "embed", self.embed
        for i, layer in enumerate(self.layers):
            for name in ("wq", "wk", "wv", "wo", "gate"):
                yield f"layers.{i}.{name}", getattr(layer, name)
            for e, (w1, w2) in enumerate(zip(layer.w1, layer.w2, strict=True)):
                yield f"layers.{i}.experts.{e}.w1", w1
                yield f"layers.{i}.experts.{e}.w2", w2
        yield "lm_head", self.lm_head

    def without_experts(self) -> Weights:
        return replace(self, layers=tuple(replace(lw, w1=(), w2=()) for lw in self.layers))


def _param(seed: int, name: str, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    # One generator per tensor, seeded from its name: any tensor (one expert of
    # one layer, say) can be derived alone, independent of creation order.
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(shape, generator=gen, dtype=DTYPE) * scale


def expert_weights(cfg: ModelConfig, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    d, h = cfg.d_model, cfg.ffn_hidden
    prefix = f"layers.{layer}.experts.{expert}"
    return (
        _param(cfg.seed, f"{prefix}.w1", (d, h), 1 / math.sqrt(d)),
        _param(cfg.seed, f"{prefix}.w2", (h, d), 1 / math.sqrt(h)),
    )


def derive_weights(cfg: ModelConfig) -> Weights:
    d, scale = cfg.d_model, 1 / math.sqrt(cfg.d_model)
    layers = []
    for i in range(cfg.n_layers):
        experts = [expert_weights(cfg, i, e) for e in range(cfg.n_experts)]
        square = {n: _param(cfg.seed, f"layers.{i}.{n}", (d, d), scale) for n in "qkvo"}
        layers.append(
            LayerWeights(
                wq=square["q"],
                wk=square["k"],
                wv=square["v"],
                wo=square["o"],
                gate=_param(cfg.seed, f"layers.{i}.gate", (d, cfg.n_experts), scale),
                w1=tuple(w1 for w1, _ in experts),
                w2=tuple(w2 for _, w2 in experts),
            )
        )
    return Weights(
        embed=_param(cfg.seed, "embed", (cfg.vocab_size, d), 1.0),
        layers=tuple(layers),
        lm_head=_param(cfg.seed, "lm_head", (d, cfg.vocab_size), scale),
    )


def save_checkpoint(path: Path, cfg: ModelConfig, weights: Weights | None = None) -> None:
    weights = derive_weights(cfg) if weights is None else weights
    torch.save({"config": cfg.model_dump(), "tensors": dict(weights.named_tensors())}, path)


class CheckpointExperts:
    """Single experts read from a checkpoint file as they are asked for. The
    file is memory-mapped: only the pages of the experts read are loaded, not
    the whole model (what a survivor needs when it takes over a lost expert)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tensors: dict[str, torch.Tensor] | None = None

    def __call__(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tensors is None:
            self._tensors = torch.load(self.path, weights_only=True, mmap=True)["tensors"]
        t = self._tensors
        key = f"layers.{layer}.experts.{expert}"
        if f"{key}.w1" not in t:
            raise KeyError(f"{self.path} holds no expert {expert} of layer {layer}")
        return t[f"{key}.w1"], t[f"{key}.w2"]


def load_checkpoint(path: Path) -> tuple[ModelConfig, Weights]:
    blob = torch.load(path, weights_only=True)
    cfg = ModelConfig.model_validate(blob["config"])
    t: dict[str, torch.Tensor] = blob["tensors"]
    layers = tuple(
        LayerWeights(
            wq=t[f"layers.{i}.wq"],
            wk=t[f"layers.{i}.wk"],
            wv=t[f"layers.{i}.wv"],
            wo=t[f"layers.{i}.wo"],
            gate=t[f"layers.{i}.gate"],
            w1=tuple(t[f"layers.{i}.experts.{e}.w1"] for e in range(cfg.n_experts)),
            w2=tuple(t[f"layers.{i}.experts.{e}.w2"] for e in range(cfg.n_experts)),
        )
        for i in range(cfg.n_layers)
    )
    return cfg, Weights(embed=t["embed"], layers=layers, lm_head=t["lm_head"])


def fingerprint(cfg: ModelConfig, weights: Weights | None = None) -> str:
    """sha256 of the configuration and of every weight's bytes."""
    weights = derive_weights(cfg) if weights is None else weights
    h = hashlib.sha256(cfg.model_dump_json().encode())
    for name, tensor in weights.named_tensors():
        h.update(name.encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return f"reference-moe:{h.hexdigest()}"


# --- per-token functions -------------------------------------------------------


def layer_norm(x_row: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x_row, x_row.shape)


def embed(weights: Weights, token: int) -> torch.Tensor:
    # A copy, not a view into the table: every row the functions below reduce
    # over starts at a fresh allocation, the same in engine and reference.
    return weights.embed[token].clone()


def attention_step(
    layer: LayerWeights, x_row: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Single-head causal attention of one new token over its cache.

    Returns the residual stream after attention and the caches grown by this
    token's key and value (new tensors: the inputs are left untouched).
    """
    h = layer_norm(x_row)
    q, k, v = h @ layer.wq, h @ layer.wk, h @ layer.wv
    keys = torch.cat((k_cache, k.unsqueeze(0)))
    values = torch.cat((v_cache, v.unsqueeze(0)))
    probs = torch.softmax(keys @ q / math.sqrt(q.numel()), dim=0)
    return x_row + (probs @ values) @ layer.wo, keys, values


def empty_cache(cfg: ModelConfig) -> torch.Tensor:
    return torch.empty(0, cfg.d_model, dtype=DTYPE)


def gate_topk(gate_w: torch.Tensor, h_row: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
    """The k experts with the highest logits (ties: lower index first) and their
    softmax weights over those k logits, in that order."""
    logits = h_row @ gate_w
    values = logits.tolist()
    chosen = sorted(range(len(values)), key=lambda e: (-values[e], e))[:k]
    return chosen, torch.softmax(logits[chosen], dim=0)


def expert_ffn(w1: torch.Tensor, w2: torch.Tensor, h_row: torch.Tensor) -> torch.Tensor:
    return F.gelu(h_row @ w1) @ w2


def combine(
    x_row: torch.Tensor, gate_weights: torch.Tensor, expert_outs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Residual plus the weighted expert outputs, summed in the gate's order:
    floating-point addition is not associative, so the order is part of the result."""
    out = x_row
    for weight, y in zip(gate_weights, expert_outs, strict=True):
        out = out + weight * y
    return out


def lm_head_argmax(lm_head: torch.Tensor, x_row: torch.Tensor) -> int:
    # torch.argmax returns the first of equal maxima: ties go to the lower id.
    return int(torch.argmax(layer_norm(x_row) @ lm_head))
