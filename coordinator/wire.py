"""The coordinator's door for request bytes: every WorkerService and
AdminService request is parsed and checked against the contract's size limits
before a servicer sees any of it.

- gRPC turns an exception of a request deserializer into `UNKNOWN: Unexpected
  <class DecodeError>`. Our deserializer (`parse_request`) therefore never
  raises: bytes that do not parse, or a message with a field over its limit,
  become a `Rejected` that names the problem.
- `WireGuard`, a server interceptor, installs that deserializer on every
  method of both services and ends a call that received a `Rejected` with
  INVALID_ARGUMENT: unary requests before the servicer runs, streamed ones at
  the `context.read()` (or request iterator step) that returned it.
- The limits are the `max_chars`/`max_items` options of the .proto files
  (protos/limits.py). Every string and repeated field a client may send must
  have one: building `RULES` at import raises for one without, so a field
  added later without a limit stops the coordinator at start rather than
  letting an unbounded string in.

A problem names the field and its limit, never the value: the value is what
must not be stored, logged or echoed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from coordinator.logs import fields
from protos.ep_recovery.v1 import admin_pb2, worker_pb2
from protos.limits import field_limits

log = logging.getLogger(__name__)

SERVICES = (
    worker_pb2.DESCRIPTOR.services_by_name["WorkerService"],
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
)
# "/ep_recovery.v1.AdminService/Drain" -> DrainRequest, for every method.
REQUEST_TYPES: dict[str, type[Message]] = {
    f"/{service.full_name}/{method.name}": GetMessageClass(method.input_type)
    for service in SERVICES
    for method in service.methods
}


@dataclass(frozen=True)
class Rejected:
    """Request bytes the coordinator refuses; `problem` says why (the field
    and its limit, or that the bytes do not parse), without the value."""

    problem: str


@dataclass(frozen=True)
class _Rule:
    """What to check of one field: its length, and the fields of a message."""

    field: FieldDescriptor
    max_chars: int
    max_items: int
    nested: Descriptor | None  # the field's message type, checked in turn


def _rules_of(descriptor: Descriptor, seen: dict[str, tuple[_Rule, ...]]) -> tuple[_Rule, ...]:
    if descriptor.full_name in seen:
        return seen[descriptor.full_name]
    seen[descriptor.full_name] = ()  # a recursive type: its rules are being built
    rules: list[_Rule] = []
    for field in descriptor.fields:
        limit = field_limits(field)
        nested = field.message_type if field.type == FieldDescriptor.TYPE_MESSAGE else None
        where = f"{descriptor.name}.{field.name}"
        if field.is_repeated and not limit.max_items:
            raise TypeError(f"{where} is repeated but has no (max_items) limit in its .proto")
        if field.type == FieldDescriptor.TYPE_BYTES:
            # No request has one; a limit in bytes would need an option of its own.
            raise TypeError(f"{where} is a bytes field: WireGuard has no limit for those yet")
        if field.type == FieldDescriptor.TYPE_STRING and not limit.max_chars:
            raise TypeError(f"{where} is a string but has no (max_chars) limit in its .proto")
        if nested is not None:
            _rules_of(nested, seen)
        if limit.max_chars or limit.max_items or nested is not None:
            rules.append(_Rule(field, limit.max_chars, limit.max_items, nested))
    seen[descriptor.full_name] = tuple(rules)
    return seen[descriptor.full_name]


def request_rules() -> dict[str, tuple[_Rule, ...]]:
    """The rules of every message type a client may send (by full name)."""
    seen: dict[str, tuple[_Rule, ...]] = {}
    for message_type in REQUEST_TYPES.values():
        _rules_of(cast(Descriptor, message_type.DESCRIPTOR), seen)
    return seen


# Built at import: a request field without a limit stops the daemon at start.
RULES = request_rules()


def find_problem(message: Message) -> str | None:
    """The first field of `message` (nested ones too) over its limit, named
    by its path from the message, e.g. `WorkerMessage.hello.placement.layers[3]
    .slot_expert`; None when every field is within its limit."""
    return _problem(message, message.DESCRIPTOR.name, RULES)


def _problem(message: Message, path: str, rules: dict[str, tuple[_Rule, ...]]) -> str | None:
    for rule in rules.get(message.DESCRIPTOR.full_name, ()):
        field = rule.field
        where = f"{path}.{field.name}"
        if field.is_repeated:
            values = getattr(message, field.name)
            if len(values) > rule.max_items:
                return f"{where} has {len(values)} items; at most {rule.max_items} are allowed"
            if rule.max_chars:
                for i, text in enumerate(values):
                    if len(text) > rule.max_chars:
                        return _too_long(f"{where}[{i}]", len(text), rule.max_chars)
            if rule.nested is not None:
                for i, item in enumerate(values):
                    found = _problem(item, f"{where}[{i}]", rules)
                    if found is not None:
                        return found
        elif rule.nested is not None:
            if message.HasField(field.name):
                found = _problem(getattr(message, field.name), where, rules)
                if found is not None:
                    return found
        else:
            size = len(getattr(message, field.name))
            if size > rule.max_chars:
                return _too_long(where, size, rule.max_chars)
    return None


def _too_long(where: str, size: int, limit: int) -> str:
    return f"{where} is {size} characters long; at most {limit} are allowed"


def parse_request(message_type: type[Message]) -> Callable[[bytes], Message | Rejected]:
    """A request deserializer that never raises: the message, or a Rejected."""
    name = message_type.DESCRIPTOR.name

    def parse(raw: bytes) -> Message | Rejected:
        try:
            message = message_type.FromString(raw)
        except DecodeError as exc:
            # protobuf's text ("...: Wire format was corrupt", "...: String field
            # had bad UTF-8") names the kind of damage, never the bytes.
            damage = str(exc).rpartition(": ")[2] or "it does not parse"
            return Rejected(f"malformed request: not a valid {name} ({damage})")
        problem = find_problem(message)
        return message if problem is None else Rejected(problem)

    return parse


# Ends a call with INVALID_ARGUMENT for a Rejected request (context.abort raises).
Refuse = Callable[[grpc.aio.ServicerContext, Rejected], Awaitable[None]]


class _CheckedReads:
    """A servicer context whose `read()` ends the call with INVALID_ARGUMENT
    when the message it read was rejected; everything else is the context's.
    (grpc.aio's own context type cannot be subclassed: it is a Cython class.)"""

    def __init__(
        self,
        context: grpc.aio.ServicerContext,
        refuse: Refuse,
    ) -> None:
        self._context = context
        self._refuse = refuse

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def read(self) -> Any:
        message = await self._context.read()
        if isinstance(message, Rejected):
            # From whichever task reads (a session's reader task too): abort
            # sends the status at once, and grpc ends the handler when it
            # returns or next writes.
            await self._refuse(self._context, message)
        return message


class WireGuard(grpc.aio.ServerInterceptor):
    """Installs `parse_request` on every WorkerService and AdminService method
    and ends calls whose request was rejected with INVALID_ARGUMENT.

    Put it after AdminAuth in the server's interceptors: AdminAuth's wrapper
    keeps this one's deserializer and runs first, so a mutating call without
    the admin credential is UNAUTHENTICATED whatever its request holds."""

    def __init__(self, on_refused: Callable[[], None] | None = None) -> None:
        self.on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        message_type = REQUEST_TYPES.get(method)
        if handler is None or message_type is None:
            return handler
        parse = parse_request(message_type)
        serializer = handler.response_serializer

        async def refuse(context: grpc.aio.ServicerContext, rejected: Rejected) -> None:
            log.info(
                "request refused",
                extra=fields(
                    method=method.rsplit("/", 1)[-1], peer=context.peer(), why=rejected.problem
                ),
            )
            if self.on_refused is not None:
                self.on_refused()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, rejected.problem)

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, refuse),
                request_deserializer=parse,
                response_serializer=serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _unary(handler.unary_stream, refuse),
                request_deserializer=parse,
                response_serializer=serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _streamed(handler.stream_unary, refuse),
                request_deserializer=parse,
                response_serializer=serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _streamed(handler.stream_stream, refuse),
            request_deserializer=parse,
            response_serializer=serializer,
        )


def _unary(inner: Callable[..., Any], refuse: Refuse) -> Callable[..., Any]:
    """`inner` behind a check of its one request. The wrapper is of the same
    kind (coroutine or async generator): grpc.aio runs a handler by its kind."""
    if inspect.isasyncgenfunction(inner):

        async def checked_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Rejected):
                await refuse(context, request)
            async for response in inner(request, context):
                yield response

        return checked_stream
    if not inspect.iscoroutinefunction(inner):
        raise TypeError(f"{inner!r}: WireGuard wraps async handlers only")

    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Rejected):
            await refuse(context, request)
        return await inner(request, context)

    return checked


def _streamed(inner: Callable[..., Any], refuse: Refuse) -> Callable[..., Any]:
    """`inner` with every message it reads checked, through `context.read()`
    or the request iterator."""

    async def requests(source: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        async for message in source:
            if isinstance(message, Rejected):
                await refuse(context, message)
            yield message

    if inspect.isasyncgenfunction(inner):

        async def checked_stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            checked_context = _CheckedReads(context, refuse)
            async for response in inner(requests(request_iterator, context), checked_context):
                yield response

        return checked_stream
    if not inspect.iscoroutinefunction(inner):
        raise TypeError(f"{inner!r}: WireGuard wraps async handlers only")

    async def checked(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        return await inner(requests(request_iterator, context), _CheckedReads(context, refuse))

    return checked
