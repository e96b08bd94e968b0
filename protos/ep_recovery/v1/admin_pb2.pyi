from protos.ep_recovery.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RankState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RANK_STATE_UNSPECIFIED: _ClassVar[RankState]
    RANK_STATE_ABSENT: _ClassVar[RankState]
    RANK_STATE_SERVING: _ClassVar[RankState]
    RANK_STATE_SUSPECT: _ClassVar[RankState]
    RANK_STATE_FAILED: _ClassVar[RankState]
    RANK_STATE_JOINING: _ClassVar[RankState]
    RANK_STATE_DRAINED: _ClassVar[RankState]
RANK_STATE_UNSPECIFIED: RankState
RANK_STATE_ABSENT: RankState
RANK_STATE_SERVING: RankState
RANK_STATE_SUSPECT: RankState
RANK_STATE_FAILED: RankState
RANK_STATE_JOINING: RankState
RANK_STATE_DRAINED: RankState

class AbortOperationRequest(_message.Message):
    __slots__ = ("request_id", "op_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    op_id: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., op_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SetAutoRejoinRequest(_message.Message):
    __slots__ = ("request_id", "enabled")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    enabled: bool
    def __init__(self, request_id: _Optional[str] = ..., enabled: _Optional[bool] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("request_id", "rank")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    rank: int
    def __init__(self, request_id: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class AdmitRequest(_message.Message):
    __slots__ = ("request_id", "rank")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    rank: int
    def __init__(self, request_id: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class AdminReply(_message.Message):
    __slots__ = ("request_id", "message", "replayed", "op_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    message: str
    replayed: bool
    op_id: str
    def __init__(self, request_id: _Optional[str] = ..., message: _Optional[str] = ..., replayed: _Optional[bool] = ..., op_id: _Optional[str] = ...) -> None: ...

class ListOperationsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListOperationsReply(_message.Message):
    __slots__ = ("operations",)
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    operations: _containers.RepeatedCompositeFieldContainer[OperationSummary]
    def __init__(self, operations: _Optional[_Iterable[_Union[OperationSummary, _Mapping]]] = ...) -> None: ...

class GetOperationRequest(_message.Message):
    __slots__ = ("op_id",)
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    op_id: str
    def __init__(self, op_id: _Optional[str] = ...) -> None: ...

class RankSpan(_message.Message):
    __slots__ = ("rank", "step", "start_unix_ms", "end_unix_ms", "outcome")
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    rank: int
    step: str
    start_unix_ms: float
    end_unix_ms: float
    outcome: str
    def __init__(self, rank: _Optional[int] = ..., step: _Optional[str] = ..., start_unix_ms: _Optional[float] = ..., end_unix_ms: _Optional[float] = ..., outcome: _Optional[str] = ...) -> None: ...

class OperationDetail(_message.Message):
    __slots__ = ("summary", "phases", "ranks")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    summary: OperationSummary
    phases: _containers.RepeatedCompositeFieldContainer[PhaseSpan]
    ranks: _containers.RepeatedCompositeFieldContainer[RankSpan]
    def __init__(self, summary: _Optional[_Union[OperationSummary, _Mapping]] = ..., phases: _Optional[_Iterable[_Union[PhaseSpan, _Mapping]]] = ..., ranks: _Optional[_Iterable[_Union[RankSpan, _Mapping]]] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdminCall(_message.Message):
    __slots__ = ("request_id", "method", "arguments", "code", "message", "replayed", "op_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    method: str
    arguments: str
    code: str
    message: str
    replayed: bool
    op_id: str
    def __init__(self, request_id: _Optional[str] = ..., method: _Optional[str] = ..., arguments: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., replayed: _Optional[bool] = ..., op_id: _Optional[str] = ...) -> None: ...

class ClusterEvent(_message.Message):
    __slots__ = ("seq", "unix_ms", "snapshot", "phase", "operation_started", "operation_ended", "rank_failed", "admin_call")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_STARTED_FIELD_NUMBER: _ClassVar[int]
    OPERATION_ENDED_FIELD_NUMBER: _ClassVar[int]
    RANK_FAILED_FIELD_NUMBER: _ClassVar[int]
    ADMIN_CALL_FIELD_NUMBER: _ClassVar[int]
    seq: int
    unix_ms: float
    snapshot: ClusterStatus
    phase: PhaseSpan
    operation_started: OperationSummary
    operation_ended: OperationSummary
    rank_failed: FailureRecord
    admin_call: AdminCall
    def __init__(self, seq: _Optional[int] = ..., unix_ms: _Optional[float] = ..., snapshot: _Optional[_Union[ClusterStatus, _Mapping]] = ..., phase: _Optional[_Union[PhaseSpan, _Mapping]] = ..., operation_started: _Optional[_Union[OperationSummary, _Mapping]] = ..., operation_ended: _Optional[_Union[OperationSummary, _Mapping]] = ..., rank_failed: _Optional[_Union[FailureRecord, _Mapping]] = ..., admin_call: _Optional[_Union[AdminCall, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RankStatus(_message.Message):
    __slots__ = ("rank", "state", "iteration", "last_heartbeat_ms_ago", "incarnation", "ready")
    RANK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_MS_AGO_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    rank: int
    state: RankState
    iteration: int
    last_heartbeat_ms_ago: int
    incarnation: str
    ready: bool
    def __init__(self, rank: _Optional[int] = ..., state: _Optional[_Union[RankState, str]] = ..., iteration: _Optional[int] = ..., last_heartbeat_ms_ago: _Optional[int] = ..., incarnation: _Optional[str] = ..., ready: _Optional[bool] = ...) -> None: ...

class Operation(_message.Message):
    __slots__ = ("op_id", "kind", "phase", "target_epoch", "joining", "leaving", "hold_iteration")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TARGET_EPOCH_FIELD_NUMBER: _ClassVar[int]
    JOINING_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    HOLD_ITERATION_FIELD_NUMBER: _ClassVar[int]
    op_id: str
    kind: str
    phase: _common_pb2.Phase
    target_epoch: int
    joining: _containers.RepeatedScalarFieldContainer[int]
    leaving: _containers.RepeatedScalarFieldContainer[int]
    hold_iteration: int
    def __init__(self, op_id: _Optional[str] = ..., kind: _Optional[str] = ..., phase: _Optional[_Union[_common_pb2.Phase, str]] = ..., target_epoch: _Optional[int] = ..., joining: _Optional[_Iterable[int]] = ..., leaving: _Optional[_Iterable[int]] = ..., hold_iteration: _Optional[int] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("cluster", "epoch", "phase", "members", "pending_members", "world_size", "placement_version", "ranks", "operation", "fingerprint", "timeline", "failures", "operations", "leader")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    PENDING_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    epoch: int
    phase: _common_pb2.Phase
    members: _containers.RepeatedScalarFieldContainer[int]
    pending_members: _containers.RepeatedScalarFieldContainer[int]
    world_size: int
    placement_version: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankStatus]
    operation: Operation
    fingerprint: str
    timeline: _containers.RepeatedCompositeFieldContainer[PhaseSpan]
    failures: _containers.RepeatedCompositeFieldContainer[FailureRecord]
    operations: _containers.RepeatedCompositeFieldContainer[OperationSummary]
    leader: bool
    def __init__(self, cluster: _Optional[str] = ..., epoch: _Optional[int] = ..., phase: _Optional[_Union[_common_pb2.Phase, str]] = ..., members: _Optional[_Iterable[int]] = ..., pending_members: _Optional[_Iterable[int]] = ..., world_size: _Optional[int] = ..., placement_version: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankStatus, _Mapping]]] = ..., operation: _Optional[_Union[Operation, _Mapping]] = ..., fingerprint: _Optional[str] = ..., timeline: _Optional[_Iterable[_Union[PhaseSpan, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[FailureRecord, _Mapping]]] = ..., operations: _Optional[_Iterable[_Union[OperationSummary, _Mapping]]] = ..., leader: _Optional[bool] = ...) -> None: ...

class PhaseSpan(_message.Message):
    __slots__ = ("phase", "op_id", "epoch", "start_unix_ms", "end_unix_ms")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    phase: _common_pb2.Phase
    op_id: str
    epoch: int
    start_unix_ms: float
    end_unix_ms: float
    def __init__(self, phase: _Optional[_Union[_common_pb2.Phase, str]] = ..., op_id: _Optional[str] = ..., epoch: _Optional[int] = ..., start_unix_ms: _Optional[float] = ..., end_unix_ms: _Optional[float] = ...) -> None: ...

class FailureRecord(_message.Message):
    __slots__ = ("rank", "reason", "suspected_unix_ms", "confirmed_unix_ms")
    RANK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SUSPECTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    reason: str
    suspected_unix_ms: float
    confirmed_unix_ms: float
    def __init__(self, rank: _Optional[int] = ..., reason: _Optional[str] = ..., suspected_unix_ms: _Optional[float] = ..., confirmed_unix_ms: _Optional[float] = ...) -> None: ...

class OperationSummary(_message.Message):
    __slots__ = ("op_id", "kind", "outcome", "epoch", "joined", "left", "stall_ms", "start_unix_ms", "end_unix_ms", "reason", "retargets", "target_epoch", "survivors", "joining", "leaving", "phase")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    STALL_MS_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETARGETS_FIELD_NUMBER: _ClassVar[int]
    TARGET_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    JOINING_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    op_id: str
    kind: str
    outcome: str
    epoch: int
    joined: _containers.RepeatedScalarFieldContainer[int]
    left: _containers.RepeatedScalarFieldContainer[int]
    stall_ms: float
    start_unix_ms: float
    end_unix_ms: float
    reason: str
    retargets: int
    target_epoch: int
    survivors: _containers.RepeatedScalarFieldContainer[int]
    joining: _containers.RepeatedScalarFieldContainer[int]
    leaving: _containers.RepeatedScalarFieldContainer[int]
    phase: _common_pb2.Phase
    def __init__(self, op_id: _Optional[str] = ..., kind: _Optional[str] = ..., outcome: _Optional[str] = ..., epoch: _Optional[int] = ..., joined: _Optional[_Iterable[int]] = ..., left: _Optional[_Iterable[int]] = ..., stall_ms: _Optional[float] = ..., start_unix_ms: _Optional[float] = ..., end_unix_ms: _Optional[float] = ..., reason: _Optional[str] = ..., retargets: _Optional[int] = ..., target_epoch: _Optional[int] = ..., survivors: _Optional[_Iterable[int]] = ..., joining: _Optional[_Iterable[int]] = ..., leaving: _Optional[_Iterable[int]] = ..., phase: _Optional[_Union[_common_pb2.Phase, str]] = ...) -> None: ...
