"""The generated code matches the .proto files, and our names cannot clash with
etcd clients' bare proto files in protobuf's default pool."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "protos.generate", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_protos_live_under_a_versioned_package_beside_aetcd() -> None:
    import aetcd  # noqa: F401  (registers etcd's bare rpc.proto, kv.proto)
    from google.protobuf import descriptor_pool

    from protos.ep_recovery.v1 import admin_pb2, worker_pb2

    for module in (worker_pb2, admin_pb2):
        name = module.DESCRIPTOR.name
        assert name.startswith("protos/ep_recovery/v1/"), name
        assert descriptor_pool.Default().FindFileByName(name) is not None
    assert worker_pb2.DESCRIPTOR.package == "ep_recovery.v1"
