"""The coordinator's configuration: one pydantic model, validated at the edge."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

_HOST_PORT = re.compile(r"^[A-Za-z0-9._-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class CoordinatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cluster: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    world_size: int = Field(ge=1, le=65536, description="number of rank slots in the cluster")
    listen: str = Field(default="127.0.0.1:50051", description="gRPC address (host:port)")
    etcd: str = Field(default="127.0.0.1:2379", description="etcd client endpoint (host:port)")
    store_host: str = Field(
        default="127.0.0.1",
        description="address ranks use to reach the rendezvous store this daemon hosts",
    )
    store_port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")
    progress_interval_ms: int = Field(default=50, ge=5, le=10_000)
    hold_lead_s: float = Field(
        default=0.05, gt=0, le=10, description="time a hold order is assumed to take to arrive"
    )
    group_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    auto_rejoin: bool = True
    fingerprint: str = Field(default="", description="expected engine fingerprint; empty: first")

    @field_validator("listen", "etcd")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if not _HOST_PORT.match(value):
            raise ValueError(f"expected host:port, got {value!r}")
        if not 0 <= split_host_port(value)[1] < 65536:
            raise ValueError(f"port out of range in {value!r}")
        return value
