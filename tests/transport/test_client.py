"""h2grpc.client.Channel calling a real grpc.aio server (grpcio) over 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import hpack
import hpack as reference_hpack
import pytest
from google.protobuf import wrappers_pb2

from h2grpc.client import Channel, insecure_channel

SERVICE = "test.ClientSvc"
WAIT = 10.0  # upper bound for anything that should happen promptly
MiB = 1024 * 1024
BIG_OPTIONS = (
    ("grpc.max_send_message_length", 8 << 20),
    ("grpc.max_receive_message_length", 8 << 20),
)

Handlers = dict[str, grpc.RpcMethodHandler]


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


async def start_server(
    handlers: Handlers,
    *,
    options: Sequence[tuple[str, Any]] | None = None,
    port: int = 0,
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound > 0
    if port:
        assert bound == port
    await server.start()
    return server, bound


@dataclass
class Served:
    server: grpc.aio.Server
    port: int
    channel: Channel
    servers: list[grpc.aio.Server] = field(default_factory=list)

    async def restart(self, handlers: Handlers, **kwargs: Any) -> None:
        """Stop the server and start a new one with ``handlers`` on the same port."""
        await self.server.stop(None)
        self.server, _ = await start_server(handlers, port=self.port, **kwargs)
        self.servers.append(self.server)


@contextlib.asynccontextmanager
async def serve(
    handlers: Handlers,
    *,
    options: Sequence[tuple[str, Any]] | None = None,
    channel_options: Sequence[tuple[str, Any]] | None = None,
) -> AsyncIterator[Served]:
    server, port = await start_server(handlers, options=options)
    channel = insecure_channel(f"127.0.0.1:{port}", options=channel_options)
    served = Served(server, port, channel, [server])
    try:
        yield served
    finally:
        await channel.close()
        for each in served.servers:
            await each.stop(None)


async def free_port() -> int:
    """A port a grpc server was just bound to and has released: nothing listens there."""
    server, port = await start_server({})
    await server.stop(None)
    return port


async def within(awaitable: Any, limit: float = WAIT) -> Any:
    """``awaitable``'s result, or TimeoutError after ``limit`` seconds."""
    return await asyncio.wait_for(awaitable, limit)


async def until(condition: Callable[[], bool], limit: float = WAIT) -> None:
    """Wait until ``condition()`` holds, polling, for at most ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def fails_unavailable_soon(call: Callable[[], Any]) -> grpc.aio.AioRpcError:
    """Repeat ``call()`` until it fails with UNAVAILABLE (and return the error).

    Calls that race the start of the server's shutdown may also succeed, or be
    cancelled by the server (CANCELLED): those are tried again.
    """
    deadline = time.monotonic() + WAIT
    while True:
        try:
            await within(call())
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return exc
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise
        assert time.monotonic() < deadline, "calls kept succeeding"
        await asyncio.sleep(0.005)


def pairs(metadata: Any) -> list[tuple[str, Any]]:
    return [(key, value) for key, value in metadata]


def unary(behaviour: Callable[..., Any], **kwargs: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(behaviour, **kwargs)


def unary_stream(behaviour: Callable[..., Any], **kwargs: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_stream_rpc_method_handler(behaviour, **kwargs)


def stream_stream(behaviour: Callable[..., Any], **kwargs: Any) -> grpc.RpcMethodHandler:
    return grpc.stream_stream_rpc_method_handler(behaviour, **kwargs)


async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def ping_pong(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield b"pong:" + request


class Hang:
    """A handler body that waits forever and records that it started and was cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        # A bidi call's requests ended: without the client's half-close, only
        # its cancellation (RST_STREAM) ends them.
        self.requests_ended = asyncio.Event()
        self.calls = 0

    async def wait(self, context: grpc.aio.ServicerContext) -> None:
        self.calls += 1
        context.add_done_callback(lambda _: self.cancelled.set() if context.cancelled() else None)
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self.wait(context)
        return b"unreachable"

    async def stream(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        yield b"first"
        await self.wait(context)

    async def bidi(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        # Reads and writes through the context rather than as an async
        # generator: grpc.aio may leave a generator suspended at a yield for
        # good when the call is cancelled, and then nothing here would run.
        try:
            while (request := await context.read()) is not grpc.aio.EOF:
                await context.write(b"pong:" + request)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.requests_ended.set()
        await self.wait(context)


def pattern(size: int, salt: int = 0) -> bytes:
    """``size`` bytes that differ at every offset from a shifted copy."""
    block = bytes((i * 7 + salt) % 251 for i in range(251))
    return (block * (size // len(block) + 1))[:size]


# -- unary -----------------------------------------------------------------------------------


async def test_unary_bytes_without_serializers() -> None:
    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"echo:" + request

    async with serve({"Echo": unary(handler)}) as s:
        call = s.channel.unary_unary(method("Echo"))
        assert await call(b"hi", timeout=WAIT) == b"echo:hi"
        assert await call(b"", timeout=WAIT) == b"echo:"
        assert await call(bytes(range(256)), timeout=WAIT) == b"echo:" + bytes(range(256))
        answer = call(b"again", timeout=WAIT)
        assert await answer == b"echo:again"
        assert answer.done()
        assert await answer.code() == grpc.StatusCode.OK
        assert await answer.details() == ""


async def test_unary_protobuf_serializers() -> None:
    seen: list[Any] = []

    async def shout(
        request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext
    ) -> wrappers_pb2.StringValue:
        seen.append(request)
        return wrappers_pb2.StringValue(value=request.value.upper() + "!")

    handler = unary(
        shout,
        request_deserializer=wrappers_pb2.StringValue.FromString,
        response_serializer=wrappers_pb2.StringValue.SerializeToString,
    )
    async with serve({"Shout": handler}) as s:
        call = s.channel.unary_unary(
            method("Shout"),
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=wrappers_pb2.StringValue.FromString,
        )
        reply = await call(wrappers_pb2.StringValue(value="héllo"), timeout=WAIT)
        assert isinstance(reply, wrappers_pb2.StringValue)
        assert reply == wrappers_pb2.StringValue(value="HÉLLO!")
        # The default value serializes to zero bytes: an empty message still goes and comes.
        assert await call(wrappers_pb2.StringValue(), timeout=WAIT) == wrappers_pb2.StringValue(
            value="!"
        )
        assert seen == [wrappers_pb2.StringValue(value="héllo"), wrappers_pb2.StringValue()]


async def test_300_concurrent_unary_calls_on_one_channel() -> None:
    peers: set[str] = set()

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        peers.add(context.peer())
        await asyncio.sleep(0)
        return request[::-1]

    async with serve({"Reverse": unary(handler)}) as s:
        call = s.channel.unary_unary(method("Reverse"))
        requests = [f"request-{i:04d}".encode() for i in range(300)]
        replies = await within(asyncio.gather(*(call(r, timeout=WAIT) for r in requests)))
        assert replies == [r[::-1] for r in requests]
        # One connection carries them all (grpc's server does not cap concurrent streams).
        assert len(peers) == 1


async def test_unary_call_object_can_be_awaited_again() -> None:
    # grpc.aio's unary call objects are futures: awaiting one again gives the same response.
    async with serve({"Echo": unary(echo)}) as s:
        call = s.channel.unary_unary(method("Echo"))(b"once", timeout=WAIT)
        assert await call == b"once"
        assert await within(call) == b"once"


# -- statuses, details, metadata ---------------------------------------------------------------


async def test_abort_not_found_with_details_and_trailing_metadata() -> None:
    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(
            grpc.StatusCode.NOT_FOUND,
            "no entity 42",
            trailing_metadata=(("x-reason", "gone"), ("x-blob-bin", b"\x00\xff\x01")),
        )
        raise AssertionError("abort returned")

    async with serve({"Find": unary(handler)}) as s:
        call = s.channel.unary_unary(method("Find"))(b"42", timeout=WAIT)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call
        error = failure.value
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == "no entity 42"
        assert pairs(error.trailing_metadata()) == [
            ("x-reason", "gone"),
            ("x-blob-bin", b"\x00\xff\x01"),
        ]
        assert call.done()
        assert await call.code() == grpc.StatusCode.NOT_FOUND
        assert await call.details() == "no entity 42"
        assert pairs(await call.trailing_metadata()) == [
            ("x-reason", "gone"),
            ("x-blob-bin", b"\x00\xff\x01"),
        ]


async def test_trailers_only_error_has_no_initial_metadata() -> None:
    # A failure before any response is a Trailers-Only response: grpc.aio reports its
    # metadata as trailing metadata only, and the initial metadata as empty.
    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(
            grpc.StatusCode.NOT_FOUND, "gone", trailing_metadata=(("x-reason", "gone"),)
        )
        raise AssertionError("abort returned")

    async with serve({"Find": unary(handler)}) as s:
        reference = grpc.aio.insecure_channel(f"127.0.0.1:{s.port}")
        try:
            expected = reference.unary_unary(method("Find"))(b"", timeout=WAIT)
            with pytest.raises(grpc.aio.AioRpcError) as grpc_failure:
                await expected
            assert pairs(await expected.initial_metadata()) == []
            assert pairs(grpc_failure.value.initial_metadata()) == []
        finally:
            await reference.close()

        call = s.channel.unary_unary(method("Find"))(b"", timeout=WAIT)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call
        assert pairs(failure.value.trailing_metadata()) == [("x-reason", "gone")]
        assert pairs(await call.trailing_metadata()) == [("x-reason", "gone")]
        assert pairs(await call.initial_metadata()) == []
        assert pairs(failure.value.initial_metadata()) == []


async def test_non_ascii_details_round_trip() -> None:
    details = "héllo ✓ 100%"

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)
        raise AssertionError("abort returned")

    async with serve({"Bad": unary(handler)}) as s:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.channel.unary_unary(method("Bad"))(b"", timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert failure.value.details() == details


async def test_request_metadata_reaches_the_server() -> None:
    received: list[list[tuple[str, Any]]] = []

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        received.append(pairs(context.invocation_metadata()))
        return b"ok"

    def application(metadata: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        return [(key, value) for key, value in metadata if key.startswith("x-")]

    async with serve({"Meta": unary(handler)}) as s:
        call = s.channel.unary_unary(method("Meta"))
        binary = bytes([0, 255, 16, 128, 1])
        metadata = (("x-user", "alice"), ("x-token-bin", binary), ("x-user", "bob"))
        assert await call(b"", metadata=metadata, timeout=WAIT) == b"ok"
        assert application(received[0]) == [
            ("x-user", "alice"),
            ("x-token-bin", binary),
            ("x-user", "bob"),
        ]
        # grpc.aio.Metadata is accepted as well, and upper-case keys go lower-case.
        as_metadata = grpc.aio.Metadata(("X-Trace", "t-1"), ("x-raw-bin", b"\xfe"))
        assert await call(b"", metadata=as_metadata, timeout=WAIT) == b"ok"
        assert application(received[1]) == [("x-trace", "t-1"), ("x-raw-bin", b"\xfe")]


async def test_initial_metadata_of_a_unary_call_arrives_before_the_response() -> None:
    release = asyncio.Event()

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.send_initial_metadata((("x-init", "early"), ("x-init-bin", b"\x01\x02")))
        await release.wait()
        return b"late"

    async with serve({"Slow": unary(handler)}) as s:
        call = s.channel.unary_unary(method("Slow"))(b"", timeout=WAIT)
        initial = await within(call.initial_metadata())
        assert pairs(initial) == [("x-init", "early"), ("x-init-bin", b"\x01\x02")]
        assert not call.done()
        release.set()
        assert await call == b"late"
        assert pairs(await call.initial_metadata()) == [
            ("x-init", "early"),
            ("x-init-bin", b"\x01\x02"),
        ]


async def test_initial_and_trailing_metadata_of_a_stream_call() -> None:
    release = asyncio.Event()

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await context.send_initial_metadata((("x-init", "s"),))
        await release.wait()
        context.set_trailing_metadata((("x-trail", "t"), ("x-trail-bin", b"\x00")))
        yield b"one"
        yield b"two"

    async with serve({"Stream": unary_stream(handler)}) as s:
        call = s.channel.unary_stream(method("Stream"))(b"", timeout=WAIT)
        assert pairs(await within(call.initial_metadata())) == [("x-init", "s")]
        assert not call.done()
        release.set()
        assert [message async for message in call] == [b"one", b"two"]
        assert await call.code() == grpc.StatusCode.OK
        assert await call.details() == ""
        assert pairs(await call.trailing_metadata()) == [("x-trail", "t"), ("x-trail-bin", b"\x00")]


async def test_trailing_metadata_of_a_successful_unary_call() -> None:
    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        context.set_trailing_metadata((("x-cost", "3"), ("x-cost-bin", b"\x03")))
        return b"done"

    async with serve({"Cost": unary(handler)}) as s:
        call = s.channel.unary_unary(method("Cost"))(b"", timeout=WAIT)
        assert await call == b"done"
        assert await call.code() == grpc.StatusCode.OK
        assert pairs(await call.trailing_metadata()) == [("x-cost", "3"), ("x-cost-bin", b"\x03")]
        assert pairs(await call.initial_metadata()) == []


async def test_timeout_is_transmitted_to_the_server() -> None:
    remaining: list[float | None] = []

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        remaining.append(context.time_remaining())
        return b""

    async with serve({"Time": unary(handler)}) as s:
        call = s.channel.unary_unary(method("Time"))
        await call(b"", timeout=5.0)
        await call(b"", timeout=0.75)
        await call(b"")
        first, second, none = remaining
        assert first is not None and 0 < first <= 5.0
        assert second is not None and 0 < second <= 0.75
        # Without a timeout there is no deadline (grpc reports a huge remaining time or None).
        assert none is None or none > 3600


async def test_unknown_method_is_unimplemented() -> None:
    async with serve({"Echo": unary(echo)}) as s:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.channel.unary_unary(method("Nope"))(b"", timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert failure.value.details() == "Method not found!"

        stream = s.channel.stream_stream("/other.Service/Chat")(timeout=WAIT)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(stream.read())
        assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert await stream.code() == grpc.StatusCode.UNIMPLEMENTED


# -- deadlines and cancellation ----------------------------------------------------------------


async def test_deadline_exceeded_cancels_the_server_handler() -> None:
    hang = Hang()
    async with serve({"Hang": unary(hang.unary)}) as s:
        call = s.channel.unary_unary(method("Hang"))(b"", timeout=0.3)
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(call)
        elapsed = time.monotonic() - start
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert failure.value.details() == "Deadline Exceeded"
        assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.25 <= elapsed < 3.0
        assert hang.started.is_set()
        await within(hang.cancelled.wait())


async def test_deadline_exceeded_on_a_stream_after_messages() -> None:
    hang = Hang()
    async with serve({"Hang": unary_stream(hang.stream)}) as s:
        call = s.channel.unary_stream(method("Hang"))(b"", timeout=0.3)
        assert await within(call.read()) == b"first"
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(call.read())
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await within(hang.cancelled.wait())


async def test_cancel_a_stream_call() -> None:
    hang = Hang()
    async with serve({"Hang": unary_stream(hang.stream)}) as s:
        call = s.channel.unary_stream(method("Hang"))(b"", timeout=WAIT)
        done: list[Any] = []
        call.add_done_callback(done.append)
        assert await within(call.read()) == b"first"
        await within(hang.started.wait())
        assert not call.done()
        assert not call.cancelled()
        assert done == []

        assert call.cancel() is True
        assert call.cancelled()
        assert call.done()
        assert done == [call]
        assert await call.code() == grpc.StatusCode.CANCELLED
        assert call.cancel() is False
        await within(hang.cancelled.wait())
        assert done == [call]  # once, never again
        late: list[Any] = []
        call.add_done_callback(late.append)
        assert late == [call]
        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
            await call.read()


async def test_cancel_a_bidi_call() -> None:
    hang = Hang()
    async with serve({"Chat": stream_stream(hang.bidi)}) as s:
        call = s.channel.stream_stream(method("Chat"))(timeout=WAIT)
        done: list[Any] = []
        call.add_done_callback(done.append)
        await call.write(b"a")
        assert await within(call.read()) == b"pong:a"
        assert call.cancel() is True
        assert call.cancelled()
        assert await call.code() == grpc.StatusCode.CANCELLED
        assert done == [call]
        # The server learns of it: grpc.aio ends the handler's request
        # iterator, or cancels the handler, depending on timing.
        await until(lambda: hang.requests_ended.is_set() or hang.cancelled.is_set())
        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
            await call.write(b"b")


async def test_cancel_a_unary_call_object() -> None:
    hang = Hang()
    async with serve({"Hang": unary(hang.unary)}) as s:
        call = s.channel.unary_unary(method("Hang"))(b"", timeout=WAIT)
        done: list[Any] = []
        call.add_done_callback(done.append)
        await within(hang.started.wait())
        assert call.cancel() is True
        assert call.done()
        assert done == [call]
        assert await call.code() == grpc.StatusCode.CANCELLED
        await within(hang.cancelled.wait())


async def test_code_awaited_while_another_task_reads() -> None:
    # grpc.aio lets one task read a stream while another waits for its status.
    release = asyncio.Event()

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await release.wait()
        yield b"only"

    async with serve({"Stream": unary_stream(handler)}) as s:
        call = s.channel.unary_stream(method("Stream"))(b"", timeout=WAIT)
        reader = asyncio.ensure_future(call.read())
        status = asyncio.ensure_future(call.code())
        await asyncio.sleep(0)  # both are now waiting
        release.set()
        try:
            assert await within(reader, 2.0) == b"only"
            assert await within(status, 2.0) == grpc.StatusCode.OK
        finally:
            reader.cancel()
            status.cancel()


async def test_initial_metadata_awaited_by_two_tasks() -> None:
    release = asyncio.Event()

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await release.wait()
        await context.send_initial_metadata((("x-init", "1"),))
        yield b"only"

    async with serve({"Stream": unary_stream(handler)}) as s:
        call = s.channel.unary_stream(method("Stream"))(b"", timeout=WAIT)
        first = asyncio.ensure_future(call.initial_metadata())
        second = asyncio.ensure_future(call.initial_metadata())
        await asyncio.sleep(0)  # both are now waiting
        release.set()
        try:
            assert pairs(await within(first, 2.0)) == [("x-init", "1")]
            assert pairs(await within(second, 2.0)) == [("x-init", "1")]
        finally:
            first.cancel()
            second.cancel()


# -- streams ---------------------------------------------------------------------------------


async def test_bidi_ping_pong_200_messages() -> None:
    async with serve({"Chat": stream_stream(ping_pong)}) as s:
        call = s.channel.stream_stream(method("Chat"))(timeout=WAIT)
        for i in range(200):
            await call.write(f"m{i}".encode())
            assert await within(call.read()) == f"pong:m{i}".encode()
        await call.done_writing()
        assert await within(call.read()) is grpc.aio.EOF
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        assert await call.details() == ""
        assert call.done()
        assert not call.cancelled()


async def test_bidi_with_protobuf_serializers() -> None:
    async def handler(
        requests: AsyncIterator[wrappers_pb2.StringValue], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[wrappers_pb2.StringValue]:
        async for request in requests:
            yield wrappers_pb2.StringValue(value=request.value * 2)

    rpc = stream_stream(
        handler,
        request_deserializer=wrappers_pb2.StringValue.FromString,
        response_serializer=wrappers_pb2.StringValue.SerializeToString,
    )
    async with serve({"Double": rpc}) as s:
        call = s.channel.stream_stream(
            method("Double"),
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=wrappers_pb2.StringValue.FromString,
        )(timeout=WAIT)
        await call.write(wrappers_pb2.StringValue(value="ab"))
        await call.write(wrappers_pb2.StringValue(value="ç"))
        await call.done_writing()
        replies = [reply async for reply in call]
        assert replies == [
            wrappers_pb2.StringValue(value="abab"),
            wrappers_pb2.StringValue(value="çç"),
        ]


async def test_async_for_over_1000_streamed_messages() -> None:
    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield i.to_bytes(4, "big")

    async with serve({"Count": unary_stream(handler)}) as s:
        call = s.channel.unary_stream(method("Count"))(b"1000", timeout=WAIT)
        received = [message async for message in call]
        assert received == [i.to_bytes(4, "big") for i in range(1000)]
        assert await call.code() == grpc.StatusCode.OK
        assert await call.read() is grpc.aio.EOF


async def test_error_after_streamed_messages() -> None:
    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"m{i}".encode()
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "stopped after 3")

    async with serve({"Fail": unary_stream(handler)}) as s:
        rpc = s.channel.unary_stream(method("Fail"))
        call = rpc(b"", timeout=WAIT)
        assert [await within(call.read()) for _ in range(3)] == [b"m0", b"m1", b"m2"]
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(call.read())
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert failure.value.details() == "stopped after 3"
        assert await call.code() == grpc.StatusCode.FAILED_PRECONDITION

        received: list[bytes] = []
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for message in rpc(b"", timeout=WAIT):
                received.append(message)
        assert received == [b"m0", b"m1", b"m2"]
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# -- message sizes and flow control ------------------------------------------------------------


async def test_large_unary_request_and_response() -> None:
    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request[::-1]

    async with serve(
        {"Reverse": unary(handler)}, options=BIG_OPTIONS, channel_options=BIG_OPTIONS
    ) as s:
        call = s.channel.unary_unary(method("Reverse"))
        payload = pattern(3 * MiB)
        assert await call(payload, timeout=WAIT) == payload[::-1]
        # Several at once: more than the 16 MiB connection window in each direction.
        payloads = [pattern(3 * MiB, salt) for salt in range(7)]
        replies = await within(asyncio.gather(*(call(p, timeout=WAIT) for p in payloads)))
        assert replies == [p[::-1] for p in payloads]


async def test_large_messages_on_a_bidi_stream() -> None:
    async def handler(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request[::-1]
            yield request[: len(request) // 2]

    async with serve(
        {"Big": stream_stream(handler)}, options=BIG_OPTIONS, channel_options=BIG_OPTIONS
    ) as s:
        call = s.channel.stream_stream(method("Big"))(timeout=WAIT)
        payloads = [pattern(3 * MiB, salt) for salt in (1, 2)]
        for payload in payloads:
            await within(call.write(payload))
        await call.done_writing()
        replies = [reply async for reply in call]
        expected = [part for p in payloads for part in (p[::-1], p[: len(p) // 2])]
        assert [len(r) for r in replies] == [len(e) for e in expected]
        assert replies == expected
        assert await call.code() == grpc.StatusCode.OK


async def test_response_over_the_default_max_receive_is_resource_exhausted() -> None:
    size = 5 * MiB

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return pattern(size) if request == b"big" else b"small"

    async with serve({"Big": unary(handler)}, options=BIG_OPTIONS) as s:
        call = s.channel.unary_unary(method("Big"))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call(b"big", timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert failure.value.details() == f"Received message larger than max ({size} vs. {4 * MiB})"
        # The channel carries on.
        assert await call(b"small", timeout=WAIT) == b"small"


async def test_request_over_max_send_is_resource_exhausted_and_never_reaches_the_server() -> None:
    calls: list[int] = []

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        calls.append(len(request))
        return b"ok"

    size = 4 * MiB + 1
    expected = f"Sent message larger than max ({size} vs. {4 * MiB})"
    async with serve({"Echo": unary(handler)}, options=BIG_OPTIONS) as s:
        call = s.channel.unary_unary(method("Echo"))
        # Before any connection exists.
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call(pattern(size), timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert failure.value.details() == expected
        assert await call(b"x", timeout=WAIT) == b"ok"
        # And on a connected channel.
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call(pattern(size), timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert failure.value.details() == expected
        assert await call(b"y", timeout=WAIT) == b"ok"
        assert calls == [1, 1]

        stream = s.channel.stream_stream(method("Echo"))(timeout=WAIT)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stream.write(pattern(size))
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await stream.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


class FrameRecorder(asyncio.Protocol):
    """A TCP peer that sends only its (empty) SETTINGS and keeps the bytes it receives."""

    def __init__(self, received: bytearray) -> None:
        self.received = received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # an empty SETTINGS frame

    def data_received(self, data: bytes) -> None:
        self.received += data


def client_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream id, payload) of each whole HTTP/2 frame in a client's byte stream."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert data.startswith(preface)
    pos, frames = len(preface), []
    while len(data) - pos >= 9:
        length_kind, _, stream_id = struct.unpack_from(">IBI", data, pos)
        length = length_kind >> 8
        if len(data) - pos - 9 < length:
            break
        payload = data[pos + 9 : pos + 9 + length]
        frames.append((length_kind & 0xFF, stream_id & 0x7FFFFFFF, payload))
        pos += 9 + length
    return frames


def paths_by_stream(frames: list[tuple[int, int, bytes]]) -> dict[int, str]:
    """The :path each HEADERS frame opened its stream with (h2grpc never pads or splits)."""
    decoder = hpack.Decoder()
    return {
        stream_id: dict(decoder.decode(payload))[":path"]
        for kind, stream_id, payload in frames
        if kind == HEADERS_FRAME
    }


HEADERS_FRAME = 1


async def test_oversized_request_sends_no_frame_for_its_stream() -> None:
    # Seen at the wire: the call that fails its size check must not even open a stream.
    received = bytearray()
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: FrameRecorder(received), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    channel = insecure_channel(f"127.0.0.1:{port}")
    try:
        await within(channel.channel_ready())
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await channel.unary_unary(method("Big"))(pattern(4 * MiB + 1), timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # A call that does go out, as a marker: all that was sent before it has arrived
        # once its HEADERS have.
        marker = channel.unary_unary(method("Marker"))(b"m", timeout=WAIT)
        await until(
            lambda: method("Marker") in paths_by_stream(client_frames(bytes(received))).values()
        )
        frames = client_frames(bytes(received))
        paths = paths_by_stream(frames)
        (marker_stream,) = (sid for sid, path in paths.items() if path == method("Marker"))
        assert paths == {marker_stream: method("Marker")}
        assert {sid for _, sid, _ in frames if sid} == {marker_stream}
        marker.cancel()
    finally:
        await channel.close()
        listener.close()
        await listener.wait_closed()


# -- connections -------------------------------------------------------------------------------


async def test_no_server_fails_fast_then_reconnects() -> None:
    port = await free_port()
    channel = insecure_channel(f"127.0.0.1:{port}")
    server: grpc.aio.Server | None = None
    try:
        call = channel.unary_unary(method("Echo"))
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(call(b"x", timeout=WAIT))
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 2.0
        # And again, with a stream call and without a timeout.
        stream = channel.stream_stream(method("Chat"))()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(stream.write(b"x"))
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await stream.code() == grpc.StatusCode.UNAVAILABLE

        server, _ = await start_server({"Echo": unary(echo)}, port=port)
        assert await within(call(b"back", timeout=WAIT)) == b"back"
    finally:
        await channel.close()
        if server is not None:
            await server.stop(None)


async def test_server_stop_fails_an_open_stream_then_the_channel_reconnects() -> None:
    async with serve({"Chat": stream_stream(ping_pong)}) as s:
        call = s.channel.stream_stream(method("Chat"))(timeout=WAIT)
        await call.write(b"a")
        assert await within(call.read()) == b"pong:a"

        await s.server.stop(None)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(call.read())
        # grpcio 1.85 ends its calls with UNAVAILABLE "Cancelling all calls" (grpc.aio sees
        # the same); CANCELLED would do as well.
        assert failure.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert await call.code() == failure.value.code()

        await s.restart({"Chat": stream_stream(ping_pong)})
        again = s.channel.stream_stream(method("Chat"))(timeout=WAIT)
        await again.write(b"b")
        assert await within(again.read()) == b"pong:b"
        await again.done_writing()
        assert await within(again.read()) is grpc.aio.EOF


class StreamCounter:
    """A bidi echo handler that counts open calls per connection (peer address)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.active: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.all_active = asyncio.Event()

    async def handler(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        peer = context.peer()
        self.active[peer] = self.active.get(peer, 0) + 1
        self.most[peer] = max(self.most.get(peer, 0), self.active[peer])
        try:
            async for request in requests:
                if sum(self.active.values()) == self.total:
                    self.all_active.set()
                yield request
        finally:
            self.active[peer] -= 1


CAP = 10
CAPPED = (("grpc.max_concurrent_streams", CAP),)


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_50_concurrent_streams_against_a_server_capped_at_10(warm: bool) -> None:
    total = 50
    counter = StreamCounter(total)

    async def one(i: int) -> list[bytes]:
        call = rpc(timeout=WAIT)
        await call.write(f"{i}a".encode())
        first = await call.read()
        await counter.all_active.wait()  # every call is open at once
        await call.write(f"{i}b".encode())
        await call.done_writing()
        return [first, *[m async for m in call]]

    async with serve({"Hold": stream_stream(counter.handler)}, options=CAPPED) as s:
        rpc = s.channel.stream_stream(method("Hold"))
        if warm:  # a connection whose SETTINGS (and so the cap) the client has seen
            warmup = rpc(timeout=WAIT)
            await warmup.write(b"w")
            assert await within(warmup.read()) == b"w"
            await warmup.done_writing()
            assert await within(warmup.read()) is grpc.aio.EOF
        results = await within(asyncio.gather(*(one(i) for i in range(total))))
        assert results == [[f"{i}a".encode(), f"{i}b".encode()] for i in range(total)]
        assert max(counter.most.values()) <= CAP
        assert len(counter.most) >= total // CAP


async def test_50_streams_opened_one_by_one_against_a_server_capped_at_10() -> None:
    total = 50
    counter = StreamCounter(total)
    async with serve({"Hold": stream_stream(counter.handler)}, options=CAPPED) as s:
        rpc = s.channel.stream_stream(method("Hold"))
        calls = []
        for i in range(total):
            call = rpc(timeout=WAIT)
            await call.write(f"{i}a".encode())
            assert await within(call.read()) == f"{i}a".encode()
            calls.append(call)
        assert counter.all_active.is_set()
        for i, call in enumerate(calls):
            await call.write(f"{i}b".encode())
            await call.done_writing()
        for i, call in enumerate(calls):
            assert [m async for m in call] == [f"{i}b".encode()]
            assert await call.code() == grpc.StatusCode.OK
        assert max(counter.most.values()) == CAP
        assert len(counter.most) == total // CAP


async def test_channel_close_fails_open_calls_and_refuses_new_ones() -> None:
    hang = Hang()
    async with serve({"Hang": unary(hang.unary), "Chat": stream_stream(ping_pong)}) as s:
        unary_call = s.channel.unary_unary(method("Hang"))(b"", timeout=WAIT)
        stream = s.channel.stream_stream(method("Chat"))(timeout=WAIT)
        await stream.write(b"a")
        assert await within(stream.read()) == b"pong:a"
        await within(hang.started.wait())

        await s.channel.close()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(unary_call)
        assert failure.value.code() == grpc.StatusCode.CANCELLED
        assert failure.value.details() == "the channel was closed"
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(stream.read())
        assert failure.value.code() == grpc.StatusCode.CANCELLED
        assert failure.value.details() == "the channel was closed"
        await within(hang.cancelled.wait())

        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(s.channel.unary_unary(method("Hang"))(b"", timeout=WAIT))
        assert failure.value.code() == grpc.StatusCode.CANCELLED
        assert failure.value.details() == "the channel is closed"
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(s.channel.stream_stream(method("Chat"))().write(b"x"))
        assert failure.value.code() == grpc.StatusCode.CANCELLED
        assert hang.calls == 1


async def test_channel_close_before_a_call_starts_connecting() -> None:
    async with serve({"Echo": unary(echo)}) as s:
        call = s.channel.unary_unary(method("Echo"))(b"x", timeout=WAIT)
        # The channel has no connection yet and the call has not asked for one.
        await s.channel.close()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(call, 2.0)
        assert failure.value.code() == grpc.StatusCode.CANCELLED
        assert failure.value.details() == "the channel is closed"


async def test_channel_close_while_a_call_is_connecting() -> None:
    async with serve({"Echo": unary(echo)}) as s:
        call = s.channel.unary_unary(method("Echo"))(b"x", timeout=WAIT)
        await asyncio.sleep(0)  # one loop turn: the call now waits for the first connection
        connecting = s.channel._connecting
        assert connecting is not None and not connecting.done()
        await s.channel.close()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(call, 2.0)
        assert failure.value.code() == grpc.StatusCode.CANCELLED


async def test_graceful_server_stop_lets_open_calls_finish() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started.set()
        await release.wait()
        return b"finished"

    async with serve({"Slow": unary(slow), "Echo": unary(echo)}) as s:
        call = s.channel.unary_unary(method("Slow"))(b"", timeout=WAIT)
        await within(started.wait())
        stopping = asyncio.ensure_future(s.server.stop(WAIT))
        try:
            # The server says GOAWAY and stops listening: new calls fail fast...
            await fails_unavailable_soon(lambda: s.channel.unary_unary(method("Echo"))(b"x"))
            assert not call.done()
            # ...while the call it had accepted completes.
            release.set()
            assert await within(call) == b"finished"
            await within(stopping)
        finally:
            release.set()
            await s.server.stop(None)
            await within(stopping)

        await s.restart({"Echo": unary(echo)})
        assert await s.channel.unary_unary(method("Echo"))(b"back", timeout=WAIT) == b"back"


async def test_channel_close_fails_calls_on_a_connection_the_server_is_draining() -> None:
    hang = Hang()
    async with serve({"Hang": unary(hang.unary), "Echo": unary(echo)}) as s:
        call = s.channel.unary_unary(method("Hang"))(b"", timeout=WAIT)
        await within(hang.started.wait())
        stopping = asyncio.ensure_future(s.server.stop(WAIT))
        try:
            await fails_unavailable_soon(lambda: s.channel.unary_unary(method("Echo"))(b"x"))
            await s.channel.close()
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await within(call, 2.0)
            assert failure.value.code() == grpc.StatusCode.CANCELLED
            await within(hang.cancelled.wait())
        finally:
            await s.server.stop(None)
            await within(stopping)


# -- uvloop --------------------------------------------------------------------------------------


async def uvloop_scenario() -> None:
    hang = Hang()
    handlers = {
        "Chat": stream_stream(ping_pong),
        "Echo": unary(echo),
        "Hang": unary_stream(hang.stream),
    }
    async with serve(handlers, options=BIG_OPTIONS, channel_options=BIG_OPTIONS) as s:
        chat = s.channel.stream_stream(method("Chat"))(timeout=WAIT)
        for i in range(200):
            await chat.write(f"m{i}".encode())
            assert await within(chat.read()) == f"pong:m{i}".encode()
        await chat.done_writing()
        assert await within(chat.read()) is grpc.aio.EOF
        assert await chat.code() == grpc.StatusCode.OK

        echo_rpc = s.channel.unary_unary(method("Echo"))
        payloads = [pattern(3 * MiB, salt) for salt in range(7)]
        replies = await within(asyncio.gather(*(echo_rpc(p, timeout=WAIT) for p in payloads)))
        assert replies == payloads
        many = [f"{i}".encode() for i in range(300)]
        assert await within(asyncio.gather(*(echo_rpc(m, timeout=WAIT) for m in many))) == many

        stream = s.channel.unary_stream(method("Hang"))(b"", timeout=0.2)
        assert await within(stream.read()) == b"first"
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(stream.read())
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await within(hang.cancelled.wait())

        await s.server.stop(None)
        await fails_unavailable_soon(lambda: echo_rpc(b"x", timeout=WAIT))
        await s.restart({"Echo": unary(echo)})
        assert await within(echo_rpc(b"back", timeout=WAIT)) == b"back"


def test_main_paths_on_uvloop() -> None:
    # The proxy and the SDK run h2grpc on uvloop, whose transports differ from asyncio's.
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(uvloop_scenario())


async def test_keepalive_fails_calls_on_a_peer_that_stops_answering() -> None:
    # The peer sends its SETTINGS, then never answers anything, PINGs included.
    received = bytearray()
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: FrameRecorder(received), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    options = [("grpc.keepalive_time_ms", 200), ("grpc.keepalive_timeout_ms", 300)]
    channel = insecure_channel(f"127.0.0.1:{port}", options)
    try:
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(channel.unary_unary(method("Hang"))(b"x"))
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "keepalive ping" in (failure.value.details() or "")
        assert loop.time() - started < 5.0  # keepalive time + timeout, with slack
        pings = [f for f in client_frames(bytes(received)) if f[0] == 6]
        assert pings and all(payload == b"h2grpcka" for _, _, payload in pings)
    finally:
        await channel.close()
        listener.close()
        await listener.wait_closed()


class _AnswerFirstRequest(asyncio.Protocol):
    """An HTTP/2 peer that sends its SETTINGS (``settings``, empty by default), answers the first
    request's HEADERS with ``reply`` (raw frames), and then says nothing more."""

    def __init__(self, reply: bytes, settings: bytes = b"") -> None:
        self.reply = reply
        self.settings = settings
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.sent = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Its SETTINGS frame (type 4).
        transport.write(struct.pack(">IBI", len(self.settings) << 8 | 4, 0, 0) + self.settings)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        frames = client_frames(bytes(self.buffer))
        if not self.sent and any(kind == HEADERS_FRAME for kind, _, _ in frames):
            self.sent = True
            assert self.transport is not None
            self.transport.write(self.reply)


async def failure_of_a_call_answered_with(reply: bytes) -> grpc.aio.AioRpcError:
    """The error of a unary call to an `_AnswerFirstRequest` peer."""
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: _AnswerFirstRequest(reply), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    channel = insecure_channel(f"127.0.0.1:{port}")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(channel.unary_unary(method("Echo"))(b"x"))
        return failure.value
    finally:
        await channel.close()
        listener.close()
        await listener.wait_closed()


async def test_a_goaway_with_an_error_ends_the_calls_at_once() -> None:
    # GOAWAY(last stream 1, COMPRESSION_ERROR) and an open connection: stream 1
    # is not refused by the GOAWAY's numbers, yet nothing will ever answer it.
    payload = struct.pack(">II", 1, 9) + b"header too large"
    failure = await failure_of_a_call_answered_with(
        struct.pack(">IBI", len(payload) << 8 | 7, 0, 0) + payload
    )
    assert failure.code() == grpc.StatusCode.UNAVAILABLE
    assert "GOAWAY 9: header too large" in (failure.details() or "")


async def test_response_headers_that_decode_too_large_are_resource_exhausted() -> None:
    # ~80 KB of initial metadata from a ~4 KB block: one large value indexed
    # once, then referenced twenty times.
    fields = [(":status", "200"), ("content-type", "application/grpc")]
    block = reference_hpack.Encoder().encode(fields + [("x-big", "v" * 4000)] * 20)
    failure = await failure_of_a_call_answered_with(
        struct.pack(">IBI", len(block) << 8 | 1, 0x4, 1) + block
    )
    assert failure.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the limit of 65536" in (failure.details() or "")


async def test_request_metadata_over_our_limit_never_leaves() -> None:
    calls: list[bytes] = []

    async def record(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        calls.append(request)
        return request

    async with serve({"Echo": unary(record)}) as s:
        huge = [(f"x-k{i}", "v" * 1000) for i in range(70)]  # ~72 KB of metadata
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(s.channel.unary_unary(method("Echo"))(b"x", metadata=huge))
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over the limit of 65536" in (failure.value.details() or "")
        assert calls == []
        assert await within(s.channel.unary_unary(method("Echo"))(b"next")) == b"next"


async def test_request_metadata_over_the_servers_limit_never_leaves() -> None:
    # A server announcing SETTINGS_MAX_HEADER_LIST_SIZE = 4096 (answering
    # nothing): a call with more metadata fails here and sends no HEADERS.
    settings = struct.pack(">HI", 6, 4096)
    peer: list[_AnswerFirstRequest] = []

    def make() -> _AnswerFirstRequest:
        peer.append(_AnswerFirstRequest(b"", settings=settings))
        return peer[-1]

    loop = asyncio.get_running_loop()
    listener = await loop.create_server(make, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    channel = insecure_channel(f"127.0.0.1:{port}")
    try:
        await within(channel.channel_ready())
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await within(
                channel.unary_unary(method("Echo"))(b"x", metadata=[("x-big", "v" * 6000)])
            )
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over the server's limit of 4096" in (failure.value.details() or "")
        assert not any(kind == HEADERS_FRAME for kind, _, _ in client_frames(bytes(peer[0].buffer)))
    finally:
        await channel.close()
        listener.close()
        await listener.wait_closed()
