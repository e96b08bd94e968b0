"""Single-process greedy decoding: the outputs a never-failed cluster must match."""

from __future__ import annotations

from collections.abc import Iterable

from reference_engine.config import ModelConfig
from reference_engine.model import (
    Weights,
    attention_step,
    combine,
    embed,
    empty_cache,
    expert_ffn,
    gate_topk,
    layer_norm,
    lm_head_argmax,
)
from reference_engine.requests import Request


def reference_outputs(
    weights: Weights, cfg: ModelConfig, requests: Iterable[Request]
) -> dict[int, tuple[int, ...]]:
    return {request.id: decode(weights, cfg, request) for request in requests}


def decode(weights: Weights, cfg: ModelConfig, request: Request) -> tuple[int, ...]:
    """One token per step, the prompt included (the engine's schedule): a
    prompt token's prediction is dropped except the last one's."""
    keys = [empty_cache(cfg)] * cfg.n_layers
    values = [empty_cache(cfg)] * cfg.n_layers
    prompt, generated = request.prompt, list[int]()
    pos = 0
    while len(generated) < request.max_new_tokens:
        x = embed(weights, prompt[pos] if pos < len(prompt) else generated[-1])
        for i, layer in enumerate(weights.layers):
            x, keys[i], values[i] = attention_step(layer, x, keys[i], values[i])
            h = layer_norm(x)
            experts, gate_weights = gate_topk(layer.gate, h, cfg.top_k)
            outs = [expert_ffn(layer.w1[e], layer.w2[e], h) for e in experts]
            x = combine(x, gate_weights, outs)
        token = lm_head_argmax(weights.lm_head, x)
        if pos >= len(prompt) - 1:
            generated.append(token)
        pos += 1
    return tuple(generated)
