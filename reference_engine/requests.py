"""Decode requests and a deterministic request set for tests and the demo."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    id: int
    prompt: tuple[int, ...]
    max_new_tokens: int

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError(f"request {self.id}: empty prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.id}: max_new_tokens {self.max_new_tokens} < 1")


def make_requests(seed: int, count: int, vocab_size: int = 64) -> list[Request]:
    """`count` requests with ids 0..count-1, prompts of 3..8 tokens, 4..12 new tokens."""
    return list(itertools.islice(request_stream(seed, vocab_size), count))


def request_stream(seed: int, vocab_size: int = 64) -> Iterator[Request]:
    """The endless sequence `make_requests` takes its first `count` from."""
    rng = random.Random(seed)
    for i in itertools.count():
        prompt = tuple(rng.randrange(vocab_size) for _ in range(rng.randint(3, 8)))
        yield Request(id=i, prompt=prompt, max_new_tokens=rng.randint(4, 12))
