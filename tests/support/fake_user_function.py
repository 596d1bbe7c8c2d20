"""A scripted fake user function for protocol-tier tests.

It is a real gRPC server (grpc.aio, loopback, a free port) implementing
`cloudstate.EntityDiscovery` and `cloudstate.eventsourced.EventSourced`. A test
sees every `handle` stream the proxy opens (`next_stream()`), every message the
proxy sends on it (`FakeStream.next()`, `expect_init()`, ...), and scripts the
replies (`reply()`, `forward()`, `fail_command()`, `fail_stream()`, `end()`,
`abort()`). An optional autopilot answers automatically, for tests about
throughput or ordering rather than about single messages.

    async with FakeUserFunction(spec) as fake:
        channel = grpc.aio.insecure_channel(fake.address)
        ...
        stream = await fake.next_stream()
        init = await stream.expect_init()
        command = await stream.expect_command()
        stream.reply(command.id, Response(message="ok"), events=[Persisted(value="a")])
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc
from google.protobuf import any_pb2, descriptor_pb2, empty_pb2
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import Message

from cloudstate import entity_pb2, entity_pb2_grpc, event_sourced_pb2, event_sourced_pb2_grpc

StreamIn = event_sourced_pb2.EventSourcedStreamIn
StreamOut = event_sourced_pb2.EventSourcedStreamOut

DEFAULT_WAIT = 5.0

# gRPC core cancels calls that wait unaccepted beyond 1000 (its default) while
# the Python server takes them one by one: a burst of new entity streams would
# see CANCELLED. A user function server needs the same options.
_SERVER_OPTIONS = [
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
]

# Called with every message the proxy sends on a stream; may script replies.
Autopilot = Callable[["FakeStream", StreamIn], None]


def to_any(message: Message | any_pb2.Any) -> any_pb2.Any:
    """Pack a message as the Cloudstate SDKs do (type.googleapis.com/<full name>)."""
    if isinstance(message, any_pb2.Any):
        return message
    return any_pb2.Any(
        type_url="type.googleapis.com/" + message.DESCRIPTOR.full_name,
        value=message.SerializeToString(),
    )


def file_descriptor_set(*files: FileDescriptor) -> descriptor_pb2.FileDescriptorSet:
    """The given files and everything they import, dependencies first."""
    result = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def visit(file: FileDescriptor) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            visit(dependency)
        file.CopyToProto(result.file.add())

    for file in files:
        visit(file)
    return result


def metadata_of(entries: Iterable[tuple[str, str | bytes]]) -> entity_pb2.Metadata:
    metadata = entity_pb2.Metadata()
    for key, value in entries:
        if isinstance(value, bytes):
            metadata.entries.add(key=key, bytes_value=value)
        else:
            metadata.entries.add(key=key, string_value=value)
    return metadata


@dataclass(frozen=True)
class _Abort:
    code: grpc.StatusCode
    details: str


_END = object()


class FakeStream:
    """One `handle` stream as the user function sees it."""

    def __init__(self, index: int, autopilot: Autopilot | None) -> None:
        self.index = index
        # Every message received, in order; None marks the proxy's half-close.
        self.received: asyncio.Queue[StreamIn | None] = asyncio.Queue()
        self.history: list[StreamIn] = []
        self.half_closed = asyncio.Event()
        # Set when the RPC is over, whoever ended it.
        self.closed = asyncio.Event()
        self.cancelled = False
        self._outbox: asyncio.Queue[StreamOut | _Abort | object] = asyncio.Queue()
        self._autopilot = autopilot

    def __repr__(self) -> str:
        return f"<FakeStream #{self.index}>"

    # -- observing ---------------------------------------------------------

    async def next(self, within: float = DEFAULT_WAIT) -> StreamIn:
        """The next message from the proxy; AssertionError on half-close or timeout."""
        try:
            message = await asyncio.wait_for(self.received.get(), within)
        except TimeoutError:
            raise AssertionError(f"{self}: no message from the proxy within {within}s") from None
        assert message is not None, f"{self}: the proxy half-closed the stream"
        return message

    async def expect_init(self, within: float = DEFAULT_WAIT) -> event_sourced_pb2.EventSourcedInit:
        message = await self.next(within)
        _expect_kind(message, "init")
        return message.init

    async def expect_event(
        self, within: float = DEFAULT_WAIT
    ) -> event_sourced_pb2.EventSourcedEvent:
        message = await self.next(within)
        _expect_kind(message, "event")
        return message.event

    async def expect_command(self, within: float = DEFAULT_WAIT) -> entity_pb2.Command:
        message = await self.next(within)
        _expect_kind(message, "command")
        return message.command

    async def expect_half_close(self, within: float = DEFAULT_WAIT) -> None:
        try:
            message = await asyncio.wait_for(self.received.get(), within)
        except TimeoutError:
            error = f"{self}: the proxy did not half-close within {within}s"
            raise AssertionError(error) from None
        assert message is None, f"{self}: expected half-close, got {message}"

    async def wait_closed(self, within: float = DEFAULT_WAIT) -> None:
        try:
            await asyncio.wait_for(self.closed.wait(), within)
        except TimeoutError:
            raise AssertionError(f"{self}: the stream did not end within {within}s") from None

    def assert_silent(self) -> None:
        """Nothing received that a test has not taken yet."""
        assert self.received.empty(), f"{self}: unexpected {self.received.get_nowait()}"

    # -- scripting ---------------------------------------------------------

    def send(self, message: StreamOut) -> None:
        self._outbox.put_nowait(message)

    def reply(
        self,
        command_id: int,
        payload: Message | any_pb2.Any | None = None,
        *,
        events: Sequence[Message | any_pb2.Any] = (),
        snapshot: Message | any_pb2.Any | None = None,
        side_effects: Sequence[entity_pb2.SideEffect] = (),
        metadata: Iterable[tuple[str, str | bytes]] = (),
    ) -> None:
        action = entity_pb2.ClientAction(reply=entity_pb2.Reply(metadata=metadata_of(metadata)))
        if payload is not None:
            action.reply.payload.CopyFrom(to_any(payload))
        self._send_reply(command_id, action, events, snapshot, side_effects)

    def forward(
        self,
        command_id: int,
        service: str,
        method: str,
        payload: Message | any_pb2.Any,
        *,
        events: Sequence[Message | any_pb2.Any] = (),
        side_effects: Sequence[entity_pb2.SideEffect] = (),
    ) -> None:
        forward = entity_pb2.Forward(
            service_name=service, command_name=method, payload=to_any(payload)
        )
        action = entity_pb2.ClientAction(forward=forward)
        self._send_reply(command_id, action, events, None, side_effects)

    def fail_command(
        self,
        command_id: int,
        description: str,
        *,
        restart: bool = False,
        events: Sequence[Message | any_pb2.Any] = (),
        side_effects: Sequence[entity_pb2.SideEffect] = (),
    ) -> None:
        failure = entity_pb2.Failure(
            command_id=command_id, description=description, restart=restart
        )
        action = entity_pb2.ClientAction(failure=failure)
        self._send_reply(command_id, action, events, None, side_effects)

    def fail_stream(self, command_id: int, description: str) -> None:
        """A stream-level `EventSourcedStreamOut.failure`."""
        failure = entity_pb2.Failure(command_id=command_id, description=description)
        self.send(StreamOut(failure=failure))

    def end(self) -> None:
        """Complete the RPC with status OK."""
        self._outbox.put_nowait(_END)

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._outbox.put_nowait(_Abort(code, details))

    def _send_reply(
        self,
        command_id: int,
        action: entity_pb2.ClientAction,
        events: Sequence[Message | any_pb2.Any],
        snapshot: Message | any_pb2.Any | None,
        side_effects: Sequence[entity_pb2.SideEffect],
    ) -> None:
        reply = event_sourced_pb2.EventSourcedReply(
            command_id=command_id,
            client_action=action,
            side_effects=side_effects,
            events=[to_any(e) for e in events],
        )
        if snapshot is not None:
            reply.snapshot.CopyFrom(to_any(snapshot))
        self.send(StreamOut(reply=reply))

    # -- the server's side -------------------------------------------------

    async def _pump(
        self,
        requests: AsyncIterator[StreamIn],
        context: grpc.aio.ServicerContext,
        end_on_half_close: bool,
    ) -> None:
        async for message in requests:
            self.history.append(message)
            self.received.put_nowait(message)
            if self._autopilot is not None:
                self._autopilot(self, message)
        if context.cancelled():
            # The requests also end when the proxy cancels: that is no half-close.
            self.cancelled = True
            return
        self.half_closed.set()
        self.received.put_nowait(None)
        if end_on_half_close:
            self.end()

    async def _serve(self, context: grpc.aio.ServicerContext) -> None:
        while True:
            item = await self._outbox.get()
            if item is _END:
                return
            if isinstance(item, _Abort):
                await context.abort(item.code, item.details)
            await context.write(item)


def side_effect(
    service: str, method: str, payload: Message | any_pb2.Any, *, synchronous: bool = False
) -> entity_pb2.SideEffect:
    return entity_pb2.SideEffect(
        service_name=service,
        command_name=method,
        payload=to_any(payload),
        synchronous=synchronous,
    )


def _expect_kind(message: StreamIn, kind: str) -> None:
    actual = message.WhichOneof("message")
    assert actual == kind, f"expected {kind}, the proxy sent {actual}: {message}"


class FakeUserFunction:
    """The fake server. ``autopilot`` is called with each message the proxy sends;
    with ``end_on_half_close`` (default) a stream ends as soon as the proxy
    half-closes it, as a real SDK does."""

    def __init__(
        self,
        spec: entity_pb2.EntitySpec | None = None,
        *,
        autopilot: Autopilot | None = None,
        end_on_half_close: bool = True,
    ) -> None:
        self.spec = spec or entity_pb2.EntitySpec()
        self.autopilot = autopilot
        self.end_on_half_close = end_on_half_close
        self.streams: asyncio.Queue[FakeStream] = asyncio.Queue()
        self.all_streams: list[FakeStream] = []
        self.proxy_infos: list[entity_pb2.ProxyInfo] = []
        self.reported_errors: list[str] = []
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = grpc.aio.server(options=_SERVER_OPTIONS)
        event_sourced_pb2_grpc.add_EventSourcedServicer_to_server(_EventSourced(self), self._server)
        entity_pb2_grpc.add_EntityDiscoveryServicer_to_server(_Discovery(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None

    async def __aenter__(self) -> FakeUserFunction:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def next_stream(self, within: float = DEFAULT_WAIT) -> FakeStream:
        """The next stream the proxy opens."""
        try:
            return await asyncio.wait_for(self.streams.get(), within)
        except TimeoutError:
            raise AssertionError(f"the proxy opened no stream within {within}s") from None

    def assert_no_new_stream(self) -> None:
        assert self.streams.empty(), f"unexpected new stream {self.streams.get_nowait()}"

    async def _handle(
        self, requests: AsyncIterator[StreamIn], context: grpc.aio.ServicerContext
    ) -> None:
        stream = FakeStream(len(self.all_streams), self.autopilot)
        self.all_streams.append(stream)
        self.streams.put_nowait(stream)
        pump = asyncio.create_task(stream._pump(requests, context, self.end_on_half_close))
        try:
            await stream._serve(context)
        except asyncio.CancelledError:
            stream.cancelled = True
            raise
        finally:
            stream.cancelled = stream.cancelled or context.cancelled()
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await pump
            stream.closed.set()


class _EventSourced(event_sourced_pb2_grpc.EventSourcedServicer):
    def __init__(self, owner: FakeUserFunction) -> None:
        self._owner = owner

    async def handle(
        self, request_iterator: AsyncIterator[StreamIn], context: grpc.aio.ServicerContext
    ) -> None:
        await self._owner._handle(request_iterator, context)


class _Discovery(entity_pb2_grpc.EntityDiscoveryServicer):
    def __init__(self, owner: FakeUserFunction) -> None:
        self._owner = owner

    async def discover(
        self, request: entity_pb2.ProxyInfo, context: grpc.aio.ServicerContext
    ) -> entity_pb2.EntitySpec:
        self._owner.proxy_infos.append(request)
        return self._owner.spec

    async def reportError(
        self, request: entity_pb2.UserFunctionError, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        self._owner.reported_errors.append(request.message)
        return empty_pb2.Empty()
