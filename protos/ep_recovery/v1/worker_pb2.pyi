from protos.ep_recovery.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_MEMBER: _ClassVar[Role]
    ROLE_JOINER: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
ROLE_MEMBER: Role
ROLE_JOINER: Role

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "progress", "ack", "ready", "step_failed", "lease_renewed")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    STEP_FAILED_FIELD_NUMBER: _ClassVar[int]
    LEASE_RENEWED_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    progress: Progress
    ack: Ack
    ready: JoinerReady
    step_failed: StepFailed
    lease_renewed: LeaseRenewed
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., ready: _Optional[_Union[JoinerReady, _Mapping]] = ..., step_failed: _Optional[_Union[StepFailed, _Mapping]] = ..., lease_renewed: _Optional[_Union[LeaseRenewed, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("cluster", "rank", "fingerprint", "lease_id", "rejoin", "incarnation", "placement", "proof")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REJOIN_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    rank: int
    fingerprint: str
    lease_id: int
    rejoin: bool
    incarnation: str
    placement: _common_pb2.Placement
    proof: str
    def __init__(self, cluster: _Optional[str] = ..., rank: _Optional[int] = ..., fingerprint: _Optional[str] = ..., lease_id: _Optional[int] = ..., rejoin: _Optional[bool] = ..., incarnation: _Optional[str] = ..., placement: _Optional[_Union[_common_pb2.Placement, _Mapping]] = ..., proof: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("iteration", "rank_clock_ms")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    RANK_CLOCK_MS_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    rank_clock_ms: float
    def __init__(self, iteration: _Optional[int] = ..., rank_clock_ms: _Optional[float] = ...) -> None: ...

class JoinerReady(_message.Message):
    __slots__ = ("epoch", "op_id")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    op_id: str
    def __init__(self, epoch: _Optional[int] = ..., op_id: _Optional[str] = ...) -> None: ...

class StepFailed(_message.Message):
    __slots__ = ("epoch", "last_completed", "message")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    last_completed: int
    message: str
    def __init__(self, epoch: _Optional[int] = ..., last_completed: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class LeaseRenewed(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    def __init__(self, lease_id: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("epoch", "op_id", "command_id", "held", "past_target", "halted", "groups_ready", "resynced", "resumed", "failed", "reloaded")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    PAST_TARGET_FIELD_NUMBER: _ClassVar[int]
    HALTED_FIELD_NUMBER: _ClassVar[int]
    GROUPS_READY_FIELD_NUMBER: _ClassVar[int]
    RESYNCED_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    RELOADED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    op_id: str
    command_id: int
    held: Held
    past_target: PastTarget
    halted: Halted
    groups_ready: GroupsReady
    resynced: Resynced
    resumed: Resumed
    failed: CommandFailed
    reloaded: Reloaded
    def __init__(self, epoch: _Optional[int] = ..., op_id: _Optional[str] = ..., command_id: _Optional[int] = ..., held: _Optional[_Union[Held, _Mapping]] = ..., past_target: _Optional[_Union[PastTarget, _Mapping]] = ..., halted: _Optional[_Union[Halted, _Mapping]] = ..., groups_ready: _Optional[_Union[GroupsReady, _Mapping]] = ..., resynced: _Optional[_Union[Resynced, _Mapping]] = ..., resumed: _Optional[_Union[Resumed, _Mapping]] = ..., failed: _Optional[_Union[CommandFailed, _Mapping]] = ..., reloaded: _Optional[_Union[Reloaded, _Mapping]] = ...) -> None: ...

class Held(_message.Message):
    __slots__ = ("iteration",)
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    def __init__(self, iteration: _Optional[int] = ...) -> None: ...

class PastTarget(_message.Message):
    __slots__ = ("iteration",)
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    def __init__(self, iteration: _Optional[int] = ...) -> None: ...

class Halted(_message.Message):
    __slots__ = ("last_completed",)
    LAST_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    last_completed: int
    def __init__(self, last_completed: _Optional[int] = ...) -> None: ...

class GroupsReady(_message.Message):
    __slots__ = ("build_ms", "progress")
    BUILD_MS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    build_ms: float
    progress: Progress
    def __init__(self, build_ms: _Optional[float] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ...) -> None: ...

class Resynced(_message.Message):
    __slots__ = ("bytes_received", "bytes_sent", "transfer_ms")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    bytes_sent: int
    transfer_ms: float
    def __init__(self, bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., transfer_ms: _Optional[float] = ...) -> None: ...

class Resumed(_message.Message):
    __slots__ = ("stall_ms",)
    STALL_MS_FIELD_NUMBER: _ClassVar[int]
    stall_ms: float
    def __init__(self, stall_ms: _Optional[float] = ...) -> None: ...

class Reloaded(_message.Message):
    __slots__ = ("slots_loaded", "load_ms")
    SLOTS_LOADED_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    slots_loaded: int
    load_ms: float
    def __init__(self, slots_loaded: _Optional[int] = ..., load_ms: _Optional[float] = ...) -> None: ...

class CommandFailed(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class CoordinatorMessage(_message.Message):
    __slots__ = ("welcome", "command", "refusal")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    command: Command
    refusal: Refusal
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., command: _Optional[_Union[Command, _Mapping]] = ..., refusal: _Optional[_Union[Refusal, _Mapping]] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("code", "message", "op_id", "command_id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    op_id: str
    command_id: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., op_id: _Optional[str] = ..., command_id: _Optional[int] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("role", "epoch", "session_id", "progress_interval_ms")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    role: Role
    epoch: int
    session_id: str
    progress_interval_ms: int
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., epoch: _Optional[int] = ..., session_id: _Optional[str] = ..., progress_interval_ms: _Optional[int] = ...) -> None: ...

class GroupSpec(_message.Message):
    __slots__ = ("epoch", "store_host", "store_port", "store_prefix", "members", "timeout_ms")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STORE_HOST_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    STORE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    store_host: str
    store_port: int
    store_prefix: str
    members: _containers.RepeatedScalarFieldContainer[int]
    timeout_ms: int
    def __init__(self, epoch: _Optional[int] = ..., store_host: _Optional[str] = ..., store_port: _Optional[int] = ..., store_prefix: _Optional[str] = ..., members: _Optional[_Iterable[int]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class Transfer(_message.Message):
    __slots__ = ("layer", "src_rank", "src_slot", "dst_rank", "dst_slot")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SRC_RANK_FIELD_NUMBER: _ClassVar[int]
    SRC_SLOT_FIELD_NUMBER: _ClassVar[int]
    DST_RANK_FIELD_NUMBER: _ClassVar[int]
    DST_SLOT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int
    def __init__(self, layer: _Optional[int] = ..., src_rank: _Optional[int] = ..., src_slot: _Optional[int] = ..., dst_rank: _Optional[int] = ..., dst_slot: _Optional[int] = ...) -> None: ...

class TransferPlan(_message.Message):
    __slots__ = ("placement_version", "transfers")
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    placement_version: int
    transfers: _containers.RepeatedCompositeFieldContainer[Transfer]
    def __init__(self, placement_version: _Optional[int] = ..., transfers: _Optional[_Iterable[_Union[Transfer, _Mapping]]] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("epoch", "op_id", "command_id", "hold", "abort", "rebuild", "resync", "resume", "retry", "leave", "prefetch", "reload")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    REBUILD_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    LEAVE_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    RELOAD_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    op_id: str
    command_id: int
    hold: Hold
    abort: Abort
    rebuild: Rebuild
    resync: Resync
    resume: Resume
    retry: Retry
    leave: Leave
    prefetch: Prefetch
    reload: Reload
    def __init__(self, epoch: _Optional[int] = ..., op_id: _Optional[str] = ..., command_id: _Optional[int] = ..., hold: _Optional[_Union[Hold, _Mapping]] = ..., abort: _Optional[_Union[Abort, _Mapping]] = ..., rebuild: _Optional[_Union[Rebuild, _Mapping]] = ..., resync: _Optional[_Union[Resync, _Mapping]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ..., retry: _Optional[_Union[Retry, _Mapping]] = ..., leave: _Optional[_Union[Leave, _Mapping]] = ..., prefetch: _Optional[_Union[Prefetch, _Mapping]] = ..., reload: _Optional[_Union[Reload, _Mapping]] = ...) -> None: ...

class Reload(_message.Message):
    __slots__ = ("placement", "loads")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    placement: _common_pb2.Placement
    loads: _containers.RepeatedCompositeFieldContainer[CheckpointLoad]
    def __init__(self, placement: _Optional[_Union[_common_pb2.Placement, _Mapping]] = ..., loads: _Optional[_Iterable[_Union[CheckpointLoad, _Mapping]]] = ...) -> None: ...

class CheckpointLoad(_message.Message):
    __slots__ = ("layer", "slot", "expert", "rank")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    layer: int
    slot: int
    expert: int
    rank: int
    def __init__(self, layer: _Optional[int] = ..., slot: _Optional[int] = ..., expert: _Optional[int] = ..., rank: _Optional[int] = ...) -> None: ...

class Hold(_message.Message):
    __slots__ = ("iteration",)
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    def __init__(self, iteration: _Optional[int] = ...) -> None: ...

class Abort(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class Rebuild(_message.Message):
    __slots__ = ("groups",)
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    groups: GroupSpec
    def __init__(self, groups: _Optional[_Union[GroupSpec, _Mapping]] = ...) -> None: ...

class Prefetch(_message.Message):
    __slots__ = ("plan", "groups")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    plan: TransferPlan
    groups: GroupSpec
    def __init__(self, plan: _Optional[_Union[TransferPlan, _Mapping]] = ..., groups: _Optional[_Union[GroupSpec, _Mapping]] = ...) -> None: ...

class Resync(_message.Message):
    __slots__ = ("plan", "metadata_source", "placement")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    METADATA_SOURCE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    plan: TransferPlan
    metadata_source: int
    placement: _common_pb2.Placement
    def __init__(self, plan: _Optional[_Union[TransferPlan, _Mapping]] = ..., metadata_source: _Optional[int] = ..., placement: _Optional[_Union[_common_pb2.Placement, _Mapping]] = ...) -> None: ...

class Resume(_message.Message):
    __slots__ = ("iteration", "members")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    members: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, iteration: _Optional[int] = ..., members: _Optional[_Iterable[int]] = ...) -> None: ...

class Retry(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Leave(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...
