"""Size limits of the wire contract, shared by the coordinator and the agent.

Each string and repeated field a client sends carries its own limit in the
.proto files (the `max_chars` and `max_items` field options of common.proto);
`field_limits` reads them. `MAX_MESSAGE_BYTES` bounds a whole message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from protos.ep_recovery.v1 import common_pb2

# The largest message the coordinator accepts from a client, and an agent from
# the coordinator (gRPC's default is 4 MiB). The largest legitimate messages
# carry an expert placement: a rank's Hello, and the Resync command (the same
# placement plus a transfer plan of a few bytes per moved slot). A layer of S
# slots takes about 4 + S * b bytes, b the varint size of an expert id (1 below
# 128 experts, 2 below 16,384): 128 layers of 32,768 slots (4,096 ranks of 8
# slots) with 256 experts take 8 MiB, half of this limit. Per-field limits
# (at most 1,024 layers of 65,536 slots) allow more than fits here; this limit
# is the one that bounds a whole placement.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# The channel and server options that apply it.
MESSAGE_SIZE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


@dataclass(frozen=True)
class FieldLimit:
    """A field's limits as the .proto states them; 0: none stated."""

    max_chars: int = 0
    max_items: int = 0


def field_limits(field: FieldDescriptor) -> FieldLimit:
    # Any: the generated stubs type the extensions as plain FieldDescriptors,
    # which typeshed's Extensions mapping does not take as keys.
    extensions: Any = field.GetOptions().Extensions
    return FieldLimit(
        max_chars=int(extensions[common_pb2.max_chars]),
        max_items=int(extensions[common_pb2.max_items]),
    )
