"""h2grpc against @grpc/grpc-js (Node's nghttp2), the stack of Cloudstate's JavaScript SDK.

Both directions over real sockets on 127.0.0.1: a grpc-js client
(node/client.js, one process per scenario) calling an h2grpc server in this
process, and an h2grpc channel calling a grpc-js server (node/server.js).
The service is node/interop.proto; its messages are well-known wrapper types.
Last, a grpc-js client calls the shopping cart through the real proxy.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google.api
import grpc
import grpc_tools
import pytest
from google.protobuf import empty_pb2, wrappers_pb2

import h2grpc
from tests.interop.conftest import NodeTools
from tools.launch import ROOT, free_port, start_proxy, start_user_function, wait_port, wait_serving

SERVICE = "interop.Interop"
MiB = 1024 * 1024
BIG = 3 * MiB
LIMITS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
WAIT = 20.0  # upper bound for anything that should happen promptly

ERROR_DETAILS = "Ünïcødé fäilure ✗ 100% — ½ done\nsecond line"
ERROR_DATA = bytes([0x00, 0xFF, 0x10, 0x80])
ECHO_DATA = bytes([0x00, 0xFF, 0x10, 0x80, 0x0D, 0x0A])

StringValue = wrappers_pb2.StringValue
Int32Value = wrappers_pb2.Int32Value
BytesValue = wrappers_pb2.BytesValue
Empty = empty_pb2.Empty


def code_number(code: grpc.StatusCode) -> int:
    return int(code.value[0])


def pattern(size: int) -> bytes:
    """The big-message payload, as node/common.js makes it: byte i is i % 251."""
    return bytes(range(251)) * (size // 251) + bytes(range(size % 251))


# -- the service in Python, hosted by h2grpc ---------------------------------------------


@dataclass
class Servicer:
    """node/interop.proto's Interop service; records what the tests check on the server."""

    sleep_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    echo_calls: int = 0

    async def echo(self, request: StringValue, context: grpc.aio.ServicerContext) -> StringValue:
        self.echo_calls += 1
        return StringValue(value=f"echo: {request.value}")

    async def fail(self, request: StringValue, context: grpc.aio.ServicerContext) -> StringValue:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            request.value,
            (("error-text", "ascii text"), ("error-data-bin", ERROR_DATA)),
        )
        raise AssertionError("abort returned")

    async def echo_metadata(self, request: Empty, context: grpc.aio.ServicerContext) -> Empty:
        echoed = [(k, v) for k, v in context.invocation_metadata() if k.startswith("x-echo-")]
        await context.send_initial_metadata(echoed)
        context.set_trailing_metadata(
            [(k.replace("x-echo-", "x-trailer-", 1), v) for k, v in echoed]
        )
        return Empty()

    async def sleep(self, request: Empty, context: grpc.aio.ServicerContext) -> Empty:
        try:
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            self.sleep_cancelled.set()
            raise
        raise AssertionError("unreachable")

    async def count(
        self, request: Int32Value, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Int32Value]:
        for i in range(request.value):
            yield Int32Value(value=i)

    async def count_then_fail(
        self, request: Int32Value, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Int32Value]:
        for i in range(request.value):
            yield Int32Value(value=i)
        await context.abort(
            grpc.StatusCode.ABORTED,
            f"failed after {request.value}",
            (("x-count", str(request.value)),),
        )

    async def sum(
        self, requests: AsyncIterator[Int32Value], context: grpc.aio.ServicerContext
    ) -> Int32Value:
        return Int32Value(value=sum([r.value async for r in requests]))

    async def ping_pong(
        self, requests: AsyncIterator[StringValue], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[StringValue]:
        async for request in requests:
            yield StringValue(value=request.value.replace("ping", "pong", 1))

    async def reverse(self, request: BytesValue, context: grpc.aio.ServicerContext) -> BytesValue:
        return BytesValue(value=request.value[::-1])

    def handler(self) -> grpc.GenericRpcHandler:
        unary, stream = grpc.unary_unary_rpc_method_handler, grpc.stream_stream_rpc_method_handler
        unary_stream, stream_unary = (
            grpc.unary_stream_rpc_method_handler,
            grpc.stream_unary_rpc_method_handler,
        )
        methods: dict[str, tuple[Callable[..., grpc.RpcMethodHandler], Any, Any, Any]] = {
            "Echo": (unary, self.echo, StringValue, StringValue),
            "Fail": (unary, self.fail, StringValue, StringValue),
            "EchoMetadata": (unary, self.echo_metadata, Empty, Empty),
            "Sleep": (unary, self.sleep, Empty, Empty),
            "Count": (unary_stream, self.count, Int32Value, Int32Value),
            "CountThenFail": (unary_stream, self.count_then_fail, Int32Value, Int32Value),
            "Sum": (stream_unary, self.sum, Int32Value, Int32Value),
            "PingPong": (stream, self.ping_pong, StringValue, StringValue),
            "Reverse": (unary, self.reverse, BytesValue, BytesValue),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: kind(
                    behaviour,
                    request_deserializer=request.FromString,
                    response_serializer=reply.SerializeToString,
                )
                for name, (kind, behaviour, request, reply) in methods.items()
            },
        )


@dataclass
class Hosted:
    servicer: Servicer
    port: int
    node: NodeTools

    async def client(self, scenario: str) -> Any:
        """Run `node client.js <port> <scenario>` and return the JSON it printed."""
        return await run_node(self.node, "client.js", str(self.port), scenario)


async def run_node(node: NodeTools, script: str, *args: str, within: float = WAIT) -> Any:
    process = await asyncio.create_subprocess_exec(
        node.node,
        node.script(script),
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(within):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"node {script} {' '.join(args)} ran over {within} s") from None
    output = stdout.decode(errors="replace").strip()
    assert process.returncode == 0, (
        f"node {script} {' '.join(args)} exited with {process.returncode}:\n"
        f"{output}\n{stderr.decode(errors='replace')}"
    )
    return json.loads(output.splitlines()[-1])


@pytest.fixture
async def hosted(node_tools: NodeTools) -> AsyncIterator[Hosted]:
    """An h2grpc server hosting the Interop service on a free port of 127.0.0.1."""
    servicer = Servicer()
    server = h2grpc.server(LIMITS)
    server.add_generic_rpc_handlers([servicer.handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Hosted(servicer, port, node_tools)
    finally:
        await server.stop(None)


# -- grpc-js client -> h2grpc server ---------------------------------------------------


async def test_js_client_unary(hosted: Hosted) -> None:
    assert await hosted.client("unary") == {"reply": "echo: héllo, wörld ✓"}


async def test_js_client_concurrent_unary(hosted: Hosted) -> None:
    assert await hosted.client("concurrent") == {"replies": 200, "wrong": []}
    assert hosted.servicer.echo_calls == 200


async def test_js_client_error_status(hosted: Hosted) -> None:
    assert await hosted.client("error") == {
        "code": code_number(grpc.StatusCode.FAILED_PRECONDITION),
        "details": ERROR_DETAILS,
        # A trailers-only response: grpc-js reports its content-type and
        # grpc-accept-encoding too (as with grpcio, whose server sends both).
        "metadata": {
            "content-type": ["application/grpc"],
            "grpc-accept-encoding": ["identity, deflate, gzip"],
            "error-text": ["ascii text"],
            "error-data-bin": [ERROR_DATA.hex()],
        },
    }


async def test_js_client_metadata_echo(hosted: Hosted) -> None:
    result = await hosted.client("metadata")
    assert result == {
        "code": 0,
        "initial": {
            "content-type": ["application/grpc"],
            "x-echo-text": ["hello interop"],
            "x-echo-data-bin": [ECHO_DATA.hex()],
        },
        "trailing": {"x-trailer-text": ["hello interop"], "x-trailer-data-bin": [ECHO_DATA.hex()]},
    }


async def test_js_client_deadline_cancels_handler(hosted: Hosted) -> None:
    result = await hosted.client("deadline")
    assert result["code"] == code_number(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert 150 <= result["elapsed_ms"] < 5000
    async with asyncio.timeout(WAIT):
        await hosted.servicer.sleep_cancelled.wait()


async def test_js_client_server_streaming(hosted: Hosted) -> None:
    assert await hosted.client("serverStream") == {"code": 0, "values": list(range(1000))}


async def test_js_client_error_after_streamed_messages(hosted: Hosted) -> None:
    assert await hosted.client("streamError") == {
        "values": list(range(10)),
        "code": code_number(grpc.StatusCode.ABORTED),
        "details": "failed after 10",
        "metadata": {"x-count": ["10"]},
    }


async def test_js_client_client_streaming(hosted: Hosted) -> None:
    assert await hosted.client("clientStream") == {"sum": 5050}


async def test_js_client_bidi_ping_pong(hosted: Hosted) -> None:
    assert await hosted.client("bidi") == {
        "code": 0,
        "replies": [f"pong {i}" for i in range(100)],
    }


async def test_js_client_big_messages(hosted: Hosted) -> None:
    assert await hosted.client("big") == {"received": BIG, "matches": True}


async def test_js_client_unknown_method(hosted: Hosted) -> None:
    assert await hosted.client("unimplemented") == {
        "code": code_number(grpc.StatusCode.UNIMPLEMENTED)
    }


# -- h2grpc client -> grpc-js server ---------------------------------------------------


class NodeServer:
    """node/server.js as a child process; its stdout JSON lines collected as events."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self._eof = False
        self._changed = asyncio.Condition()
        self._readers = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
        ]

    async def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            async with self._changed:
                self.events.append(json.loads(line))
                self._changed.notify_all()
        async with self._changed:
            self._eof = True
            self._changed.notify_all()

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self.stderr = await self.process.stderr.read()

    async def event(self, kind: str, within: float = WAIT) -> dict[str, Any]:
        """The first event of ``kind``, waiting for it up to ``within`` seconds."""

        def found() -> dict[str, Any] | None:
            return next((e for e in self.events if e.get("event") == kind), None)

        try:
            async with asyncio.timeout(within), self._changed:
                while (event := found()) is None:
                    if self._eof:
                        raise AssertionError(f"server.js ended before {kind!r}: {self.events}")
                    await self._changed.wait()
                return event
        except TimeoutError:
            raise AssertionError(
                f"no {kind!r} event from server.js within {within} s: {self.events}\n"
                f"{self.stderr.decode(errors='replace')}"
            ) from None

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        await asyncio.gather(*self._readers)


@dataclass
class Remote:
    """An h2grpc channel to a grpc-js server."""

    server: NodeServer
    channel: h2grpc.Channel

    def unary(self, method: str, request: Any, reply: Any) -> Any:
        return self.channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=request.SerializeToString,
            response_deserializer=reply.FromString,
        )

    def stream(self, method: str, request: Any, reply: Any) -> Any:
        return self.channel.stream_stream(
            f"/{SERVICE}/{method}",
            request_serializer=request.SerializeToString,
            response_deserializer=reply.FromString,
        )


@pytest.fixture
async def remote(node_tools: NodeTools) -> AsyncIterator[Remote]:
    """node/server.js on a free port of 127.0.0.1 and an h2grpc channel to it."""
    process = await asyncio.create_subprocess_exec(
        node_tools.node,
        node_tools.script("server.js"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    server = NodeServer(process)
    try:
        ready = await server.event("ready")
        channel = h2grpc.insecure_channel(f"127.0.0.1:{ready['port']}", LIMITS)
        try:
            yield Remote(server, channel)
        finally:
            await channel.close()
    finally:
        await server.kill()


async def test_h2grpc_client_unary(remote: Remote) -> None:
    reply = await remote.unary("Echo", StringValue, StringValue)(
        StringValue(value="héllo, wörld ✓"), timeout=WAIT
    )
    assert reply.value == "echo: héllo, wörld ✓"


async def test_h2grpc_client_concurrent_unary(remote: Remote) -> None:
    echo = remote.unary("Echo", StringValue, StringValue)
    replies = await asyncio.gather(
        *(echo(StringValue(value=f"message {i}"), timeout=WAIT) for i in range(200))
    )
    assert [r.value for r in replies] == [f"echo: message {i}" for i in range(200)]


async def test_h2grpc_client_error_status(remote: Remote) -> None:
    fail = remote.unary("Fail", StringValue, StringValue)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await fail(StringValue(value=ERROR_DETAILS), timeout=WAIT)
    error = failed.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == ERROR_DETAILS
    trailing = [(k, v) for k, v in error.trailing_metadata() if k.startswith("error-")]
    assert trailing == [("error-text", "ascii text"), ("error-data-bin", ERROR_DATA)]


async def test_h2grpc_client_metadata_echo(remote: Remote) -> None:
    call = remote.unary("EchoMetadata", Empty, Empty)(
        Empty(),
        timeout=WAIT,
        metadata=(("x-echo-text", "hello interop"), ("x-echo-data-bin", ECHO_DATA)),
    )
    assert await call == Empty()
    initial = [(k, v) for k, v in await call.initial_metadata() if k.startswith("x-")]
    trailing = [(k, v) for k, v in await call.trailing_metadata() if k.startswith("x-")]
    assert initial == [("x-echo-text", "hello interop"), ("x-echo-data-bin", ECHO_DATA)]
    assert trailing == [("x-trailer-text", "hello interop"), ("x-trailer-data-bin", ECHO_DATA)]
    assert await call.code() == grpc.StatusCode.OK


async def test_h2grpc_client_deadline(remote: Remote) -> None:
    sleep = remote.unary("Sleep", Empty, Empty)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await sleep(Empty(), timeout=0.2)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.15 <= time.monotonic() - started < 5.0
    assert await remote.server.event("cancelled") == {"event": "cancelled", "method": "Sleep"}


async def test_h2grpc_client_server_streaming(remote: Remote) -> None:
    call = remote.channel.unary_stream(
        f"/{SERVICE}/Count",
        request_serializer=Int32Value.SerializeToString,
        response_deserializer=Int32Value.FromString,
    )(Int32Value(value=1000), timeout=WAIT)
    assert [m.value async for m in call] == list(range(1000))
    assert await call.code() == grpc.StatusCode.OK


async def test_h2grpc_client_error_after_streamed_messages(remote: Remote) -> None:
    call = remote.channel.unary_stream(
        f"/{SERVICE}/CountThenFail",
        request_serializer=Int32Value.SerializeToString,
        response_deserializer=Int32Value.FromString,
    )(Int32Value(value=10), timeout=WAIT)
    values = []
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for message in call:
            values.append(message.value)
    assert values == list(range(10))
    assert failed.value.code() == grpc.StatusCode.ABORTED
    assert failed.value.details() == "failed after 10"
    assert [(k, v) for k, v in failed.value.trailing_metadata() if k.startswith("x-")] == [
        ("x-count", "10")
    ]


async def test_h2grpc_client_client_streaming(remote: Remote) -> None:
    # h2grpc's Channel has no stream_unary: the same call on the wire as stream_stream.
    call = remote.stream("Sum", Int32Value, Int32Value)(timeout=WAIT)
    for i in range(1, 101):
        await call.write(Int32Value(value=i))
    await call.done_writing()
    assert [m.value async for m in call] == [5050]
    assert await call.code() == grpc.StatusCode.OK


async def test_h2grpc_client_bidi_ping_pong(remote: Remote) -> None:
    call = remote.stream("PingPong", StringValue, StringValue)(timeout=WAIT)
    replies = []
    for i in range(100):
        await call.write(StringValue(value=f"ping {i}"))
        replies.append((await call.read()).value)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert replies == [f"pong {i}" for i in range(100)]
    assert await call.code() == grpc.StatusCode.OK


async def test_h2grpc_client_big_messages(remote: Remote) -> None:
    sent = pattern(BIG)
    reply = await remote.unary("Reverse", BytesValue, BytesValue)(
        BytesValue(value=sent), timeout=WAIT
    )
    assert len(reply.value) == BIG
    assert reply.value == sent[::-1]


async def test_h2grpc_client_unknown_method(remote: Remote) -> None:
    nope = remote.channel.unary_unary(f"/{SERVICE}/Nope")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await nope(b"", timeout=WAIT)
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_h2grpc_client_server_killed_during_bidi(remote: Remote) -> None:
    call = remote.stream("PingPong", StringValue, StringValue)(timeout=WAIT)
    await call.write(StringValue(value="ping 0"))
    assert (await call.read()).value == "pong 0"
    await remote.server.kill()
    async with asyncio.timeout(WAIT):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call.read()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    await assert_nothing_listens(remote)


async def test_h2grpc_client_server_graceful_shutdown_during_bidi(remote: Remote) -> None:
    call = remote.stream("PingPong", StringValue, StringValue)(timeout=WAIT)
    await call.write(StringValue(value="ping 0"))
    assert (await call.read()).value == "pong 0"
    remote.server.process.send_signal(signal.SIGTERM)  # grpc-js: GOAWAY, open calls may finish
    await remote.server.event("stopping")
    await call.write(StringValue(value="ping 1"))
    assert (await call.read()).value == "pong 1"
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    async with asyncio.timeout(WAIT):
        assert await remote.server.process.wait() == 0
    await assert_nothing_listens(remote)


async def assert_nothing_listens(remote: Remote) -> None:
    """The grpc-js server is gone: new calls fail fast with UNAVAILABLE."""
    echo = remote.unary("Echo", StringValue, StringValue)
    async with asyncio.timeout(WAIT):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await echo(StringValue(value="anyone?"), timeout=WAIT)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


# -- grpc-js client -> proxy -> shopping cart ---------------------------------------------


def proto_include_dirs() -> list[str]:
    """What protos/generate.py compiles with: our protos, google/api, google/protobuf."""
    return [
        str(ROOT / "protos"),
        str(Path(google.api.__path__[0]).parent.parent),
        str(Path(grpc_tools.__file__).parent / "_proto"),
    ]


def test_js_client_shopping_cart_through_proxy(node_tools: NodeTools, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    uf_port, port = free_port(), free_port()
    user_function = start_user_function("examples.shoppingcart", uf_port, logs)
    proxy = None
    try:
        wait_port(uf_port, 30.0, user_function)
        proxy = start_proxy(uf_port, port, "memory://", logs)
        wait_serving(f"127.0.0.1:{port}", 60.0, proxy)
        includes = proto_include_dirs()
        result = subprocess.run(
            [node_tools.node, node_tools.script("cart.js"), str(port), "js-user", *includes],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        assert result.returncode == 0, f"cart.js failed:\n{result.stdout}\n{result.stderr}"
        assert json.loads(result.stdout.splitlines()[-1]) == {
            "added": [{}, {}],
            "cart": {
                "items": [
                    {"product_id": "apple", "name": "Apple", "quantity": 2},
                    {"product_id": "pear", "name": "Pear", "quantity": 3},
                ]
            },
            "empty_user": {"code": code_number(grpc.StatusCode.INVALID_ARGUMENT)},
        }
    except BaseException:
        for process in (proxy, user_function):
            if process is not None:
                print(f"--- {process.name} log ---\n{process.log_tail(80)}")
        raise
    finally:
        for process in (proxy, user_function):
            if process is not None:
                process.stop(timeout=10)
