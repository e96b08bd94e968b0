from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_FORMING: _ClassVar[Phase]
    PHASE_STEADY: _ClassVar[Phase]
    PHASE_HALTING: _ClassVar[Phase]
    PHASE_SHRINKING: _ClassVar[Phase]
    PHASE_DEGRADED: _ClassVar[Phase]
    PHASE_ADMITTING: _ClassVar[Phase]
    PHASE_PAUSING: _ClassVar[Phase]
    PHASE_REBUILDING: _ClassVar[Phase]
    PHASE_RESYNCING: _ClassVar[Phase]
    PHASE_RESUMING: _ClassVar[Phase]
PHASE_UNSPECIFIED: Phase
PHASE_FORMING: Phase
PHASE_STEADY: Phase
PHASE_HALTING: Phase
PHASE_SHRINKING: Phase
PHASE_DEGRADED: Phase
PHASE_ADMITTING: Phase
PHASE_PAUSING: Phase
PHASE_REBUILDING: Phase
PHASE_RESYNCING: Phase
PHASE_RESUMING: Phase
MAX_CHARS_FIELD_NUMBER: _ClassVar[int]
max_chars: _descriptor.FieldDescriptor
MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
max_items: _descriptor.FieldDescriptor

class Placement(_message.Message):
    __slots__ = ("version", "slots_per_rank", "layers")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SLOTS_PER_RANK_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    version: int
    slots_per_rank: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerPlacement]
    def __init__(self, version: _Optional[int] = ..., slots_per_rank: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerPlacement, _Mapping]]] = ...) -> None: ...

class LayerPlacement(_message.Message):
    __slots__ = ("slot_expert",)
    SLOT_EXPERT_FIELD_NUMBER: _ClassVar[int]
    slot_expert: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, slot_expert: _Optional[_Iterable[int]] = ...) -> None: ...
