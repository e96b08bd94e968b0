"""Shapes of the reference MoE model and of the cluster that serves it."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: Annotated[int, Field(ge=2)] = 64
    d_model: Annotated[int, Field(ge=1)] = 32
    n_layers: Annotated[int, Field(ge=1)] = 2
    n_experts: Annotated[int, Field(ge=1)] = 8
    top_k: Annotated[int, Field(ge=1)] = 2
    ffn_hidden: Annotated[int, Field(ge=1)] = 64
    replicas: Annotated[int, Field(ge=1)] = 2
    seed: Annotated[int, Field(ge=0)] = 1234

    @model_validator(mode="after")
    def _top_k_fits(self) -> ModelConfig:
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must not exceed n_experts ({self.n_experts})")
        return self


class ClusterLayout(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    world_size: Annotated[int, Field(ge=1)]
    ranks_per_node: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _whole_nodes(self) -> ClusterLayout:
        if self.world_size % self.ranks_per_node:
            raise ValueError(
                f"ranks_per_node ({self.ranks_per_node}) must divide world_size ({self.world_size})"
            )
        return self

    @property
    def n_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node
