"""h2grpc.server.Server hosting handlers, called by a real grpc.aio client over 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from h2grpc.client import insecure_channel
from h2grpc.server import Server
from tests.support import eventually

SERVICE = "test.Svc"
WAIT = 10.0  # upper bound for anything that should happen promptly
MiB = 1024 * 1024

Handlers = dict[str, grpc.RpcMethodHandler]


@dataclass
class Served:
    server: Server
    port: int
    channel: grpc.aio.Channel

    def unary(self, method: str, **kwargs: Any) -> grpc.aio.UnaryUnaryMultiCallable:
        return self.channel.unary_unary(f"/{SERVICE}/{method}", **kwargs)

    def unary_stream(self, method: str, **kwargs: Any) -> grpc.aio.UnaryStreamMultiCallable:
        return self.channel.unary_stream(f"/{SERVICE}/{method}", **kwargs)

    def stream_unary(self, method: str, **kwargs: Any) -> grpc.aio.StreamUnaryMultiCallable:
        return self.channel.stream_unary(f"/{SERVICE}/{method}", **kwargs)

    def stream_stream(self, method: str, **kwargs: Any) -> grpc.aio.StreamStreamMultiCallable:
        return self.channel.stream_stream(f"/{SERVICE}/{method}", **kwargs)


@contextlib.asynccontextmanager
async def serve(
    handlers: Handlers,
    *,
    options: Sequence[tuple[str, Any]] | None = None,
    channel_options: Sequence[tuple[str, Any]] | None = None,
    setup: Callable[[Server], None] | None = None,
) -> AsyncIterator[Served]:
    server = Server(options)
    if handlers:
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    if setup is not None:
        setup(server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options)
    try:
        yield Served(server, port, channel)
    finally:
        await channel.close()
        await server.stop(None)


async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


def unary(behaviour: Callable[..., Any], **kwargs: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(behaviour, **kwargs)


async def no_calls_left(server: Server) -> None:
    async def check() -> None:
        assert not server.calls

    await eventually(check, within=WAIT)


def pairs(metadata: Any) -> list[tuple[str, Any]]:
    return [(key, value) for key, value in metadata]


# -- unary ---------------------------------------------------------------------------------


async def test_unary_echo_bytes() -> None:
    handler = unary(echo, request_deserializer=None, response_serializer=None)
    async with serve({"Echo": handler}) as s:
        call = s.unary("Echo")
        assert await call(b"hello", timeout=WAIT) == b"hello"
        assert await call(b"", timeout=WAIT) == b""
        assert await call(bytes(range(256)), timeout=WAIT) == bytes(range(256))
        answer = call(b"again", timeout=WAIT)
        assert await answer == b"again"
        assert await answer.code() == grpc.StatusCode.OK
        assert await answer.details() == ""
        await no_calls_left(s.server)


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
async def test_a_client_that_compresses_is_understood(compression: grpc.Compression) -> None:
    async with serve({"Echo": unary(echo)}) as s:
        request = b"compress me " * 500
        assert await s.unary("Echo")(request, timeout=WAIT, compression=compression) == request


async def test_unary_protobuf_serializers() -> None:
    async def shout(
        request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext
    ) -> wrappers_pb2.StringValue:
        assert isinstance(request, wrappers_pb2.StringValue)
        return wrappers_pb2.StringValue(value=request.value.upper() + "!")

    handler = unary(
        shout,
        request_deserializer=wrappers_pb2.StringValue.FromString,
        response_serializer=wrappers_pb2.StringValue.SerializeToString,
    )
    async with serve({"Shout": handler}) as s:
        call = s.unary(
            "Shout",
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=wrappers_pb2.StringValue.FromString,
        )
        reply = await call(wrappers_pb2.StringValue(value="héllo"), timeout=WAIT)
        assert reply == wrappers_pb2.StringValue(value="HÉLLO!")
        # The default value serializes to zero bytes: an empty message still arrives.
        assert await call(wrappers_pb2.StringValue(), timeout=WAIT) == wrappers_pb2.StringValue(
            value="!"
        )


async def test_undecodable_request_is_internal() -> None:
    handler = unary(
        echo,
        request_deserializer=wrappers_pb2.StringValue.FromString,
        response_serializer=wrappers_pb2.StringValue.SerializeToString,
    )
    async with serve({"Echo": handler}) as s:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.unary("Echo")(b"\xff\xff\xff", timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.INTERNAL
        assert failure.value.details() == "Exception deserializing request!"


async def test_sync_unary_handler() -> None:
    def double(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request * 2

    async with serve({"Double": unary(double)}) as s:
        assert await s.unary("Double")(b"ab", timeout=WAIT) == b"abab"


async def test_registered_method_handlers() -> None:
    def setup(server: Server) -> None:
        server.add_registered_method_handlers("reg.Svc", {"Echo": unary(echo)})

    async with serve({}, setup=setup) as s:
        assert await s.channel.unary_unary("/reg.Svc/Echo")(b"r", timeout=WAIT) == b"r"
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.channel.unary_unary("/reg.Svc/Other")(b"r", timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_unknown_method_is_unimplemented() -> None:
    async with serve({"Echo": unary(echo)}) as s:
        for path in (f"/{SERVICE}/Nope", "/other.Svc/Echo", "/x"):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await s.channel.unary_unary(path)(b"x", timeout=WAIT)
            assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert failure.value.details() == "Method not found!"
        # Streaming calls to an unknown method too. (No request iterator: grpc.aio's client
        # reports INTERNAL instead of the status when its write of a request message loses
        # the race with a fast trailers-only answer; see test_frames for the wire format.)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.stream_stream("Nope")(timeout=WAIT).read()
        assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # The connection still works.
        assert await s.unary("Echo")(b"ok", timeout=WAIT) == b"ok"
        await no_calls_left(s.server)


async def test_handler_exception_is_unknown() -> None:
    async def broken(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise ValueError("boom at 42")

    async with serve({"Broken": unary(broken)}) as s:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.unary("Broken")(b"x", timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.UNKNOWN
        assert failure.value.details() == "Unexpected <class 'ValueError'>: boom at 42"
        await no_calls_left(s.server)


async def test_abort_with_trailing_metadata() -> None:
    reached_after_abort: list[bool] = []

    async def missing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(
            grpc.StatusCode.NOT_FOUND,
            "x",
            trailing_metadata=(("why", "gone"), ("blob-bin", b"\x00\xff\x01")),
        )
        reached_after_abort.append(True)
        return b"never"

    async with serve({"Missing": unary(missing)}) as s:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.unary("Missing")(b"x", timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
        assert failure.value.details() == "x"
        assert pairs(failure.value.trailing_metadata()) == [
            ("why", "gone"),
            ("blob-bin", b"\x00\xff\x01"),
        ]
        assert reached_after_abort == []


async def test_abort_uses_trailing_metadata_set_before() -> None:
    async def missing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        context.set_trailing_metadata((("set", "before"),))
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no")
        return b"never"

    async with serve({"Missing": unary(missing)}) as s:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.unary("Missing")(b"x", timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert pairs(failure.value.trailing_metadata()) == [("set", "before")]


async def test_abort_in_a_streaming_handler_after_messages() -> None:
    async def numbers(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"1"
        yield b"2"
        await context.abort(grpc.StatusCode.OUT_OF_RANGE, "enough")

    handler = grpc.unary_stream_rpc_method_handler(numbers)
    async with serve({"Numbers": handler}) as s:
        call = s.unary_stream("Numbers")(b"", timeout=WAIT)
        assert await call.read() == b"1"
        assert await call.read() == b"2"
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call.read()
        assert failure.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert failure.value.details() == "enough"


async def test_set_code_and_details_with_a_response() -> None:
    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        context.set_code(grpc.StatusCode.PERMISSION_DENIED)
        context.set_details("not you")
        assert context.code() == grpc.StatusCode.PERMISSION_DENIED
        assert context.details() == "not you"
        return b"ignored"

    async def fine(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        context.set_code(grpc.StatusCode.OK)
        context.set_details("all good")
        return b"answer"

    async with serve({"Refuse": unary(refuse), "Fine": unary(fine)}) as s:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.unary("Refuse")(b"x", timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert failure.value.details() == "not you"
        call = s.unary("Fine")(b"x", timeout=WAIT)
        assert await call == b"answer"
        assert await call.code() == grpc.StatusCode.OK


async def test_invocation_metadata() -> None:
    seen: list[tuple[tuple[str, Any], ...]] = []

    async def record(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(tuple(context.invocation_metadata()))
        return b""

    async with serve({"Record": unary(record)}) as s:
        metadata = (("x-text", "value 1"), ("x-data-bin", b"\x00\x01\xfe\xff"), ("x-text", "2"))
        await s.unary("Record")(b"", metadata=metadata, timeout=WAIT)
    (received,) = seen
    # grpc's client groups repeated keys, so compare without order.
    ours = sorted((pair for pair in received if pair[0].startswith("x-")), key=repr)
    assert ours == sorted(metadata, key=repr)
    names = [name for name, _ in received]
    assert not [name for name in names if name.startswith(":")]
    for transport in ("content-type", "te", "grpc-timeout", "grpc-accept-encoding"):
        assert transport not in names
    assert any(name == "user-agent" for name in names)


async def test_send_initial_metadata() -> None:
    async def greet(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.send_initial_metadata((("hello", "there"), ("raw-bin", b"\x80\x81")))
        return b"done"

    async with serve({"Greet": unary(greet)}) as s:
        call = s.unary("Greet")(b"", timeout=WAIT)
        assert pairs(await call.initial_metadata()) == [
            ("hello", "there"),
            ("raw-bin", b"\x80\x81"),
        ]
        assert await call == b"done"
        assert pairs(await call.trailing_metadata()) == []


async def test_send_initial_metadata_in_a_stream_before_messages() -> None:
    async def greet(request: bytes, context: grpc.aio.ServicerContext) -> None:
        await context.send_initial_metadata((("early", "1"),))
        await context.write(b"a")
        await context.write(b"b")

    async with serve({"Greet": grpc.unary_stream_rpc_method_handler(greet)}) as s:
        call = s.unary_stream("Greet")(b"", timeout=WAIT)
        assert pairs(await call.initial_metadata()) == [("early", "1")]
        assert [m async for m in call] == [b"a", b"b"]
        assert await call.code() == grpc.StatusCode.OK


async def test_set_trailing_metadata() -> None:
    async def tag(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        context.set_trailing_metadata((("t1", "a"), ("t2-bin", b"\xff\x00")))
        assert tuple(context.trailing_metadata()) == (("t1", "a"), ("t2-bin", b"\xff\x00"))
        return b"body"

    async def tag_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"m"
        context.set_trailing_metadata((("after", "stream"),))

    handlers = {"Tag": unary(tag), "TagStream": grpc.unary_stream_rpc_method_handler(tag_stream)}
    async with serve(handlers) as s:
        call = s.unary("Tag")(b"", timeout=WAIT)
        assert await call == b"body"
        assert pairs(await call.trailing_metadata()) == [("t1", "a"), ("t2-bin", b"\xff\x00")]
        assert await call.code() == grpc.StatusCode.OK
        stream = s.unary_stream("TagStream")(b"", timeout=WAIT)
        assert [m async for m in stream] == [b"m"]
        assert pairs(await stream.trailing_metadata()) == [("after", "stream")]


async def test_invalid_trailing_metadata_is_internal() -> None:
    async def bad(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        context.set_trailing_metadata((("x-bad", "line\nbreak"),))
        return b"body"

    async with serve({"Bad": unary(bad)}) as s:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.unary("Bad")(b"", timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.INTERNAL
        # The connection survives it.
        s.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("other.Svc", {"Echo": unary(echo)})]
        )
        assert await s.channel.unary_unary("/other.Svc/Echo")(b"k", timeout=WAIT) == b"k"


@pytest.mark.parametrize(
    "details", ["héllo ✓ 100%", "%41 is not A", "line\nbreak\ttab", "日本語", "plain ascii"]
)
async def test_details_are_percent_encoded(details: str) -> None:
    async def abort(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)
        return b""

    async def detail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        context.set_code(grpc.StatusCode.ABORTED)
        context.set_details(details)
        return b"ok"

    async with serve({"Abort": unary(abort), "Detail": unary(detail)}) as s:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.unary("Abort")(b"", timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert failure.value.details() == details
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.unary("Detail")(b"", timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.ABORTED
        assert failure.value.details() == details


# -- deadlines and cancellation --------------------------------------------------------------


async def test_time_remaining() -> None:
    seen: list[float | None] = []

    async def remaining(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(context.time_remaining())
        return b""

    async with serve({"Remaining": unary(remaining)}) as s:
        await s.unary("Remaining")(b"", timeout=5.0)
        await s.unary("Remaining")(b"")
        await s.unary("Remaining")(b"", timeout=3600.0)
    with_timeout, without, long = seen
    assert with_timeout is not None and 3.0 < with_timeout <= 5.0
    assert without is None
    # grpc's client rounds long timeouts up (3600 s goes out as 3610 s or so).
    assert long is not None and 3590.0 < long <= 3611.0


async def test_deadline_exceeded_cancels_the_handler() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()
    observed: list[Any] = []

    async def block(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            observed.append(context.time_remaining())
            cancelled.set()
            raise
        return b"never"

    async with serve({"Block": unary(block)}) as s:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.unary("Block")(b"", timeout=0.3)
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert started.is_set()
        await asyncio.wait_for(cancelled.wait(), WAIT)
        # Cancelled at the deadline: by the server's timer or by the client's RST_STREAM,
        # whichever came first.
        (remaining,) = observed
        assert remaining is not None and 0.0 <= remaining < 0.1
        await no_calls_left(s.server)
        # A later call on the same channel is unaffected.
        s.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("other.Svc", {"Echo": unary(echo)})]
        )
        assert await s.channel.unary_unary("/other.Svc/Echo")(b"k", timeout=WAIT) == b"k"


async def test_deadline_exceeded_in_a_stream() -> None:
    cancelled = asyncio.Event()

    async def trickle(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async with serve({"Trickle": grpc.unary_stream_rpc_method_handler(trickle)}) as s:
        call = s.unary_stream("Trickle")(b"", timeout=0.5)
        assert await call.read() == b"first"
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call.read()
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(cancelled.wait(), WAIT)


async def test_client_cancel_cancels_the_handler() -> None:
    started, cancelled, done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    observed: dict[str, Any] = {}

    async def block(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        context.add_done_callback(lambda ctx: done.set())
        observed["before"] = (context.cancelled(), context.done())
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            observed["after"] = (context.cancelled(), context.done())
            cancelled.set()
            raise
        return b"never"

    async with serve({"Block": unary(block)}) as s:
        call = s.unary("Block")(b"", timeout=WAIT)
        await asyncio.wait_for(started.wait(), WAIT)
        assert call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.wait_for(cancelled.wait(), WAIT)
        await asyncio.wait_for(done.wait(), WAIT)
        assert observed == {"before": (False, False), "after": (True, True)}
        await no_calls_left(s.server)


async def test_client_cancel_of_a_bidi_stream() -> None:
    cancelled = asyncio.Event()
    received: list[bytes] = []

    async def sink(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        try:
            async for request in requests:
                received.append(request)
                await context.write(b"ack")
        except asyncio.CancelledError:
            assert context.cancelled()
            cancelled.set()
            raise

    async with serve({"Sink": grpc.stream_stream_rpc_method_handler(sink)}) as s:
        call = s.stream_stream("Sink")(timeout=WAIT)
        await call.write(b"one")
        assert await call.read() == b"ack"
        call.cancel()
        await asyncio.wait_for(cancelled.wait(), WAIT)
        assert received == [b"one"]
        await no_calls_left(s.server)


async def test_done_callback_after_a_normal_call() -> None:
    done: list[bool] = []

    async def quick(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        context.add_done_callback(lambda ctx: done.append(ctx.cancelled()))
        return b"q"

    async with serve({"Quick": unary(quick)}) as s:
        assert await s.unary("Quick")(b"", timeout=WAIT) == b"q"

        async def check() -> None:
            assert done == [False]

        await eventually(check, within=WAIT)


# -- streaming -------------------------------------------------------------------------------


async def test_unary_stream_async_generator() -> None:
    async def count(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield b"%d" % i

    async with serve({"Count": grpc.unary_stream_rpc_method_handler(count)}) as s:
        call = s.unary_stream("Count")(b"1000", timeout=WAIT)
        assert [m async for m in call] == [b"%d" % i for i in range(1000)]
        assert await call.code() == grpc.StatusCode.OK
        empty = s.unary_stream("Count")(b"0", timeout=WAIT)
        assert [m async for m in empty] == []
        assert await empty.code() == grpc.StatusCode.OK


async def test_unary_stream_context_write() -> None:
    async def count(request: bytes, context: grpc.aio.ServicerContext) -> None:
        for i in range(int(request)):
            await context.write(b"%d" % i)

    async with serve({"Count": grpc.unary_stream_rpc_method_handler(count)}) as s:
        call = s.unary_stream("Count")(b"1000", timeout=WAIT)
        assert [m async for m in call] == [b"%d" % i for i in range(1000)]
        assert await call.code() == grpc.StatusCode.OK


async def test_unary_stream_with_protobuf_and_large_messages() -> None:
    async def repeat(
        request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[wrappers_pb2.StringValue]:
        for i in range(20):
            yield wrappers_pb2.StringValue(value=f"{i}:" + request.value * 20_000)

    handler = grpc.unary_stream_rpc_method_handler(
        repeat,
        request_deserializer=wrappers_pb2.StringValue.FromString,
        response_serializer=wrappers_pb2.StringValue.SerializeToString,
    )
    async with serve({"Repeat": handler}) as s:
        call = s.unary_stream(
            "Repeat",
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=wrappers_pb2.StringValue.FromString,
        )(wrappers_pb2.StringValue(value="ab"), timeout=WAIT)
        got = [m.value async for m in call]
        assert got == [f"{i}:" + "ab" * 20_000 for i in range(20)]


async def test_unary_stream_sync_generator() -> None:
    def letters(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        yield b"a"
        yield b"b"

    async with serve({"Letters": grpc.unary_stream_rpc_method_handler(letters)}) as s:
        call = s.unary_stream("Letters")(b"", timeout=WAIT)
        assert [m async for m in call] == [b"a", b"b"]


async def test_stream_unary_with_a_request_iterator() -> None:
    async def join(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        return b"|".join([request async for request in requests])

    async with serve({"Join": grpc.stream_unary_rpc_method_handler(join)}) as s:
        parts = [b"%d" % i for i in range(300)]
        assert await s.stream_unary("Join")(iter(parts), timeout=WAIT) == b"|".join(parts)

        async def generate() -> AsyncIterator[bytes]:
            for part in (b"x", b"", b"y"):
                yield part

        assert await s.stream_unary("Join")(generate(), timeout=WAIT) == b"x||y"
        assert await s.stream_unary("Join")(iter([]), timeout=WAIT) == b""


async def test_stream_unary_with_read_and_write_api() -> None:
    async def total(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        size = 0
        while (message := await context.read()) is not grpc.aio.EOF:
            size += len(message)
        assert await context.read() is grpc.aio.EOF  # stays at EOF
        return b"%d" % size

    async with serve({"Total": grpc.stream_unary_rpc_method_handler(total)}) as s:
        call = s.stream_unary("Total")(timeout=WAIT)
        for size in (1, 10, 100, 1000):
            await call.write(b"z" * size)
        await call.done_writing()
        assert await call == b"1111"


async def test_stream_stream_ping_pong_with_read_and_write() -> None:
    async def pong(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        while (message := await context.read()) is not grpc.aio.EOF:
            await context.write(b"pong " + message)
        await context.write(b"bye")

    async with serve({"Pong": grpc.stream_stream_rpc_method_handler(pong)}) as s:
        call = s.stream_stream("Pong")(timeout=WAIT)
        for i in range(50):
            await call.write(b"ping %d" % i)
            assert await call.read() == b"pong ping %d" % i
        await call.done_writing()
        assert await call.read() == b"bye"
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_stream_stream_async_for_and_async_generator() -> None:
    async def echo_all(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request[::-1]

    async with serve({"EchoAll": grpc.stream_stream_rpc_method_handler(echo_all)}) as s:
        requests = [b"message %d" % i for i in range(200)]
        call = s.stream_stream("EchoAll")(iter(requests), timeout=WAIT)
        assert [m async for m in call] == [r[::-1] for r in requests]
        assert await call.code() == grpc.StatusCode.OK


async def test_stream_stream_server_ends_first() -> None:
    """The handler returns while the client is still able to write: the call ends OK."""

    async def first_only(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request
            return

    async with serve({"First": grpc.stream_stream_rpc_method_handler(first_only)}) as s:
        call = s.stream_stream("First")(timeout=WAIT)
        await call.write(b"a")
        assert await call.read() == b"a"
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        await no_calls_left(s.server)


# -- sizes and load ------------------------------------------------------------------------


async def test_large_messages_cross_flow_control_windows() -> None:
    size = 3 * MiB
    limits = [
        ("grpc.max_send_message_length", 8 * MiB),
        ("grpc.max_receive_message_length", 8 * MiB),
    ]

    async def mirror(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request[::-1]

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(3):
            yield bytes([i]) * size

    handlers = {"Mirror": unary(mirror), "Stream": grpc.unary_stream_rpc_method_handler(stream)}
    async with serve(handlers, options=limits, channel_options=limits) as s:
        payload = random.Random(9).randbytes(size)
        assert await s.unary("Mirror")(payload, timeout=30) == payload[::-1]
        # Above grpc's 4 MiB default, allowed by the options on both sides.
        bigger = random.Random(10).randbytes(6 * MiB)
        assert await s.unary("Mirror")(bigger, timeout=30) == bigger[::-1]
        call = s.unary_stream("Stream")(b"", timeout=30)
        assert [m async for m in call] == [bytes([i]) * size for i in range(3)]


async def test_request_larger_than_the_server_limit() -> None:
    async with serve(
        {"Echo": unary(echo)}, options=[("grpc.max_receive_message_length", 1024)]
    ) as s:
        assert await s.unary("Echo")(b"a" * 1024, timeout=WAIT) == b"a" * 1024
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.unary("Echo")(b"a" * 2048, timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Received message larger than max (2048 vs. 1024)" in failure.value.details()
        # The connection is still good.
        assert await s.unary("Echo")(b"b", timeout=WAIT) == b"b"
        await no_calls_left(s.server)


async def test_request_larger_than_the_server_limit_in_a_stream() -> None:
    received: list[bytes] = []

    async def sink(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        async for request in requests:
            received.append(request)
        return b"done"

    options = [("grpc.max_receive_message_length", 100)]
    async with serve({"Sink": grpc.stream_unary_rpc_method_handler(sink)}, options=options) as s:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.stream_unary("Sink")(iter([b"ok", b"x" * 101, b"after"]), timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert received == [b"ok"]
        await no_calls_left(s.server)


async def test_response_larger_than_the_server_send_limit() -> None:
    async def big(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"x" * 2048

    async with serve({"Big": unary(big)}, options=[("grpc.max_send_message_length", 1024)]) as s:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.unary("Big")(b"", timeout=WAIT)
        assert "Sent message larger than max (2048 vs. 1024)" in failure.value.details()
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_many_concurrent_calls_on_one_channel() -> None:
    active, most = 0, 0
    release = asyncio.Event()

    async def slow_echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal active, most
        active += 1
        most = max(most, active)
        if active == 500:
            release.set()
        await release.wait()  # every call is in flight at once
        active -= 1
        return request + b"!"

    async with serve({"SlowEcho": unary(slow_echo)}) as s:
        call = s.unary("SlowEcho")
        results = await asyncio.gather(*(call(b"%d" % i, timeout=30) for i in range(500)))
        assert results == [b"%d!" % i for i in range(500)]
        assert most == 500
        await no_calls_left(s.server)


# -- shutdown --------------------------------------------------------------------------------


async def test_stop_with_grace() -> None:
    finishing_started, blocked_started = asyncio.Event(), asyncio.Event()
    release, blocked_cancelled = asyncio.Event(), asyncio.Event()

    async def finishing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        finishing_started.set()
        await release.wait()
        return b"finished"

    async def blocked(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        blocked_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            blocked_cancelled.set()
            raise
        return b"never"

    handlers = {"Finishing": unary(finishing), "Blocked": unary(blocked)}
    async with serve(handlers) as s:
        finishing_call = asyncio.ensure_future(s.unary("Finishing")(b"", timeout=WAIT))
        blocked_call = asyncio.ensure_future(s.unary("Blocked")(b"", timeout=WAIT))
        await asyncio.wait_for(finishing_started.wait(), WAIT)
        await asyncio.wait_for(blocked_started.wait(), WAIT)
        loop = asyncio.get_running_loop()
        began = loop.time()
        stopping = asyncio.ensure_future(s.server.stop(grace=1.0))

        async def is_stopping() -> None:
            assert s.server.stopping

        await eventually(is_stopping, within=WAIT)
        release.set()  # within the grace
        assert await asyncio.wait_for(finishing_call, WAIT) == b"finished"
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await asyncio.wait_for(blocked_call, WAIT)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.wait_for(stopping, WAIT)
        assert loop.time() - began >= 1.0  # the blocked call held stop() for the grace
        await asyncio.wait_for(blocked_cancelled.wait(), WAIT)
        assert await asyncio.wait_for(s.server.wait_for_termination(), WAIT) is True
        assert not s.server.calls
        # New calls: the listener is gone.
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.unary("Finishing")(b"", timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") as fresh:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await fresh.unary_unary(f"/{SERVICE}/Finishing")(b"", timeout=WAIT)
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_stop_returns_early_once_calls_finish() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def finishing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started.set()
        await release.wait()
        return b"finished"

    async with serve({"Finishing": unary(finishing)}) as s:
        call = asyncio.ensure_future(s.unary("Finishing")(b"", timeout=WAIT))
        await asyncio.wait_for(started.wait(), WAIT)
        stopping = asyncio.ensure_future(s.server.stop(grace=60.0))

        async def is_stopping() -> None:
            assert s.server.stopping

        await eventually(is_stopping, within=WAIT)
        assert not stopping.done()
        release.set()
        assert await asyncio.wait_for(call, WAIT) == b"finished"
        await asyncio.wait_for(stopping, WAIT)  # far sooner than the 60 s grace


async def test_stop_without_grace_cancels_calls() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def blocked(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b"never"

    async with serve({"Blocked": unary(blocked)}) as s:
        call = asyncio.ensure_future(s.unary("Blocked")(b"", timeout=WAIT))
        await asyncio.wait_for(started.wait(), WAIT)
        await asyncio.wait_for(s.server.stop(None), WAIT)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await asyncio.wait_for(call, WAIT)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.wait_for(cancelled.wait(), WAIT)
        # Stopping again is harmless.
        await asyncio.wait_for(s.server.stop(None), WAIT)


async def test_wait_for_termination_times_out_while_serving() -> None:
    async with serve({"Echo": unary(echo)}) as s:
        assert await s.server.wait_for_termination(timeout=0.05) is False
        assert await s.unary("Echo")(b"still", timeout=WAIT) == b"still"


async def test_add_insecure_port_on_a_taken_port_fails() -> None:
    async with serve({"Echo": unary(echo)}) as s:
        other = Server()
        with pytest.raises(RuntimeError, match="Failed to bind"):
            other.add_insecure_port(f"127.0.0.1:{s.port}")


async def test_peer() -> None:
    peers: list[str] = []

    async def who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        peers.append(context.peer())
        return b""

    async with serve({"Who": unary(who)}) as s:
        await s.unary("Who")(b"", timeout=WAIT)
    (peer,) = peers
    prefix = "ipv4:127.0.0.1:"
    assert peer.startswith(prefix)
    assert 0 < int(peer[len(prefix) :]) < 65536


# -- grpcio's own servicers ------------------------------------------------------------------


async def test_health_service() -> None:
    servicer = health.aio.HealthServicer()

    def setup(server: Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)

    async with serve({}, setup=setup) as s:
        await servicer.set("my.Service", health_pb2.HealthCheckResponse.SERVING)
        stub = health_pb2_grpc.HealthStub(s.channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service="my.Service"), timeout=WAIT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Check(health_pb2.HealthCheckRequest(service="unknown"), timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND

        watch = stub.Watch(health_pb2.HealthCheckRequest(service="my.Service"), timeout=WAIT)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        await servicer.set("my.Service", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        await no_calls_left(s.server)


async def list_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(timeout=WAIT)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.write(
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=health.SERVICE_NAME)
    )
    described = await call.read()
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert len(described.file_descriptor_response.file_descriptor_proto) >= 1
    return [service.name for service in response.list_services_response.service]


async def test_reflection_as_the_front_door_enables_it() -> None:
    names = [health.SERVICE_NAME, reflection.SERVICE_NAME]

    def setup(server: Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        reflection.enable_server_reflection(names, server)

    async with serve({}, setup=setup) as s:
        assert sorted(await list_services(s.channel)) == sorted(names)


async def test_reflection_with_the_aio_servicer() -> None:
    from grpc_reflection.v1alpha._async import ReflectionServicer

    names = [health.SERVICE_NAME, reflection.SERVICE_NAME]

    def setup(server: Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            ReflectionServicer(names), server
        )

    async with serve({}, setup=setup) as s:
        assert sorted(await list_services(s.channel)) == sorted(names)


# -- uvloop (what the proxy and the SDK run on) ----------------------------------------------


def test_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def count(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield b"%d" % i

    async def missing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "héllo ✓ 100%")
        return b""

    async def scenario() -> None:
        assert "uvloop" in type(asyncio.get_running_loop()).__module__
        handlers = {
            "Echo": unary(echo),
            "Missing": unary(missing),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        }
        async with serve(handlers) as s:
            payload = random.Random(11).randbytes(3 * MiB)
            assert await s.unary("Echo")(payload, timeout=30) == payload
            call = s.unary_stream("Count")(b"500", timeout=WAIT)
            assert [m async for m in call] == [b"%d" % i for i in range(500)]
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await s.unary("Missing")(b"", timeout=WAIT)
            assert failure.value.code() == grpc.StatusCode.NOT_FOUND
            assert failure.value.details() == "héllo ✓ 100%"
            results = await asyncio.gather(*(s.unary("Echo")(b"%d" % i) for i in range(200)))
            assert results == [b"%d" % i for i in range(200)]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(), 60))


async def test_metadata_over_the_clients_limit_is_not_sent() -> None:
    # The client announces 4 KiB; a response carrying more would make it drop
    # the connection (and every call on it). The call fails instead.
    async def big_initial(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.send_initial_metadata((("x-big", "v" * 6000),))
        return b"unreachable"

    async def big_trailing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        context.set_trailing_metadata((("x-big", "v" * 6000),))
        return b"answer"

    handlers = {"Initial": unary(big_initial), "Trailing": unary(big_trailing), "Echo": unary(echo)}
    options = [("grpc.max_metadata_size", 4096), ("grpc.absolute_max_metadata_size", 4096)]
    async with serve(handlers, channel_options=options) as s:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.unary("Initial")(b"", timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.UNKNOWN
        assert "over the client's limit of 4096" in (failure.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await s.unary("Trailing")(b"", timeout=WAIT)
        assert failure.value.code() == grpc.StatusCode.INTERNAL
        assert "over the client's limit of 4096" in (failure.value.details() or "")
        assert await s.unary("Echo")(b"still fine", timeout=WAIT) == b"still fine"


async def test_finished_calls_leave_no_cyclic_garbage() -> None:
    # Calls and their streams must be freed by reference counting: thousands
    # of cycles per second would make every collection a long pause.
    async with serve({"Echo": unary(echo)}) as s:
        channel = insecure_channel(f"127.0.0.1:{s.port}")
        try:
            call = channel.unary_unary(f"/{SERVICE}/Echo")
            assert await call(b"warm", timeout=WAIT) == b"warm"  # connections, caches
            gc.collect()
            gc.disable()
            try:
                for i in range(50):
                    assert await call(b"%d" % i, timeout=WAIT) == b"%d" % i
                await no_calls_left(s.server)
                unreachable = gc.collect()
            finally:
                gc.enable()
            assert unreachable < 50, f"{unreachable} objects in cycles after 50 calls"
        finally:
            await channel.close()
