"""h2grpc's HTTP/2 engine on the wire: a raw socket speaking HTTP/2 by hand to a Server."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import random
import struct
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from h2grpc.frames import (
    ACK,
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    S_ENABLE_PUSH,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_CONCURRENT_STREAMS,
    S_MAX_FRAME_SIZE,
    SETTINGS,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    frame,
)
from h2grpc.hpack import Decoder, encode
from h2grpc.server import Server
from tests.support import eventually

WAIT = 10.0
SERVICE = "t.S"
NAMES = {
    DATA: "DATA",
    HEADERS: "HEADERS",
    PRIORITY: "PRIORITY",
    RST_STREAM: "RST_STREAM",
    SETTINGS: "SETTINGS",
    PUSH_PROMISE: "PUSH_PROMISE",
    PING: "PING",
    GOAWAY: "GOAWAY",
    WINDOW_UPDATE: "WINDOW_UPDATE",
    CONTINUATION: "CONTINUATION",
}


# -- a hand-driven HTTP/2 client -------------------------------------------------------------


@dataclass
class Frame:
    kind: int
    flags: int
    stream: int
    payload: bytes
    # On the frame that completes a header block (HEADERS or its last CONTINUATION):
    headers: list[tuple[str, str]] | None = None
    ends_stream: bool = False  # END_STREAM of the block's HEADERS frame

    def __repr__(self) -> str:
        name = NAMES.get(self.kind, str(self.kind))
        return f"Frame({name}, flags={self.flags:#x}, stream={self.stream}, {len(self.payload)}B)"


@dataclass
class Response:
    headers: list[tuple[str, str]] | None = None
    trailers: list[tuple[str, str]] | None = None
    data: bytearray = field(default_factory=bytearray)
    data_frames: list[int] = field(default_factory=list)  # DATA payload sizes
    reset: int | None = None

    @property
    def messages(self) -> list[bytes]:
        out, pos = [], 0
        while pos < len(self.data):
            compressed, length = struct.unpack_from(">BI", self.data, pos)
            assert compressed == 0
            out.append(bytes(self.data[pos + 5 : pos + 5 + length]))
            pos += 5 + length
        assert pos == len(self.data), "a partial gRPC message"
        return out

    @property
    def status(self) -> str | None:
        fields = dict(self.trailers or ())
        return fields.get("grpc-status")

    @property
    def message(self) -> str | None:
        return dict(self.trailers or ()).get("grpc-message")


def settings_payload(settings: Sequence[tuple[int, int]]) -> bytes:
    return b"".join(struct.pack(">HI", key, value) for key, value in settings)


def grpc_message(payload: bytes, compressed: int = 0) -> bytes:
    return struct.pack(">BI", compressed, len(payload)) + payload


def request_headers(
    path: str, extra: Sequence[tuple[str, str]] = (), method: str = "POST"
) -> list[tuple[str, str]]:
    return [
        (":method", method),
        (":scheme", "http"),
        (":path", path),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *extra,
    ]


class RawH2:
    """One TCP connection; frames are written as given and read one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = Decoder()
        self.received: list[Frame] = []
        self._block: tuple[int, int, bytearray] | None = None  # awaiting CONTINUATION

    @classmethod
    async def open(
        cls, port: int, settings: Sequence[tuple[int, int]] = (), *, preface: bool = True
    ) -> RawH2:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = cls(reader, writer)
        if preface:
            conn.write(PREFACE + frame(SETTINGS, 0, 0, settings_payload(settings)))
        return conn

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        self.write(frame(kind, flags, stream_id, payload))

    def request(
        self,
        stream_id: int,
        path: str,
        messages: Sequence[bytes] = (),
        *,
        extra: Sequence[tuple[str, str]] = (),
        end: bool = True,
    ) -> None:
        """HEADERS, then one DATA frame per message (the last one ending the stream)."""
        block = encode(request_headers(path, extra))
        self.send(
            HEADERS, END_HEADERS | (END_STREAM if end and not messages else 0), stream_id, block
        )
        for i, message in enumerate(messages):
            last = i == len(messages) - 1
            self.send(DATA, END_STREAM if end and last else 0, stream_id, grpc_message(message))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    async def read_frame(self) -> Frame | None:
        """The next frame, or None at a clean end of the connection.

        Header blocks are decoded as they arrive (HPACK state is per connection).
        """
        try:
            header = await asyncio.wait_for(self.reader.readexactly(9), WAIT)
        except asyncio.IncompleteReadError as exc:
            assert exc.partial == b"", f"connection closed inside a frame header: {exc.partial!r}"
            return None
        except ConnectionResetError:
            return None
        length = int.from_bytes(header[:3], "big")
        stream_id = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
        payload = await asyncio.wait_for(self.reader.readexactly(length), WAIT)
        got = Frame(header[3], header[4], stream_id, payload)
        if got.kind in (HEADERS, CONTINUATION):
            self._header_block(got)
        self.received.append(got)
        return got

    def _header_block(self, got: Frame) -> None:
        if got.kind == HEADERS:
            assert self._block is None, "HEADERS inside another header block"
            payload = got.payload
            if got.flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if got.flags & PRIORITY_FLAG:
                payload = payload[5:]
            self._block = (got.stream, got.flags, bytearray(payload))
        else:
            assert self._block is not None and self._block[0] == got.stream, "stray CONTINUATION"
            self._block[2].extend(got.payload)
        if got.flags & END_HEADERS:
            _, flags, block = self._block
            self._block = None
            got.headers = self.decoder.decode(bytes(block))
            got.ends_stream = bool(flags & END_STREAM)

    async def next(self, kind: int, stream_id: int | None = None) -> Frame:
        """Reads (keeping every frame in `received`) until one of `kind`."""
        while True:
            got = await self.read_frame()
            assert got is not None, f"connection closed while waiting for {NAMES[kind]}"
            if got.kind == kind and (stream_id is None or got.stream == stream_id):
                return got

    async def handshake(self) -> dict[int, int]:
        """Reads the server's SETTINGS (acknowledging them); returns them."""
        settings = await self.next(SETTINGS)
        assert settings.flags == 0 and settings.stream == 0
        self.send(SETTINGS, ACK, 0)
        return dict(struct.iter_unpack(">HI", settings.payload))

    async def ping(self, payload: bytes = b"barrier!") -> list[Frame]:
        """A round trip: every frame the server sent before answering, in order."""
        self.send(PING, 0, 0, payload)
        frames: list[Frame] = []
        while True:
            got = await self.read_frame()
            assert got is not None, "connection closed while waiting for a PING ACK"
            if got.kind == PING and got.flags & ACK and got.payload == payload:
                return frames
            frames.append(got)

    async def goaway(self) -> tuple[int, int, bytes]:
        """Waits for GOAWAY, then for the connection to close; (last stream, code, debug)."""
        got = await self.next(GOAWAY)
        last, code = struct.unpack_from(">II", got.payload)
        while (rest := await self.read_frame()) is not None:
            assert rest.kind in (SETTINGS, WINDOW_UPDATE, PING), f"{rest} after GOAWAY"
        return last & 0x7FFFFFFF, code, got.payload[8:]

    def data(self, stream_id: int) -> bytes:
        """All DATA received so far on a stream (padding removed)."""
        return b"".join(
            _unpad(f) for f in self.received if f.kind == DATA and f.stream == stream_id
        )

    async def response(self, stream_id: int, *, window_updates: bool = False) -> Response:
        """The stream's response: from the frames already received, then reading on
        until the stream ends (END_STREAM on a header block, or RST_STREAM).

        With `window_updates`, every DATA frame read here is handed back at once
        (connection and stream window), like a client that consumes as it reads.
        """
        response = Response()
        index = 0
        while True:
            if index == len(self.received):
                fresh = await self.read_frame()
                assert fresh is not None, f"connection closed before stream {stream_id} ended"
                if window_updates and fresh.kind == DATA and fresh.payload:
                    increment = struct.pack(">I", len(fresh.payload))
                    self.send(WINDOW_UPDATE, 0, 0, increment)
                    self.send(WINDOW_UPDATE, 0, fresh.stream, increment)
            got = self.received[index]
            index += 1
            if got.stream != stream_id:
                continue
            if got.kind == RST_STREAM:
                (response.reset,) = struct.unpack(">I", got.payload)
                return response
            if got.kind == DATA:
                assert response.headers is not None, "DATA before response headers"
                assert response.trailers is None
                assert not got.flags & END_STREAM, "gRPC responses end with trailers"
                payload = _unpad(got)
                response.data += payload
                response.data_frames.append(len(payload))
            elif got.headers is not None:
                if response.headers is None:
                    response.headers = got.headers
                    if got.ends_stream:  # trailers-only
                        response.trailers = got.headers
                        return response
                else:
                    assert got.ends_stream, "a header block in the middle of a response"
                    response.trailers = got.headers
                    return response


def _unpad(got: Frame) -> bytes:
    if got.flags & PADDED:
        return got.payload[1 : len(got.payload) - got.payload[0]]
    return got.payload


# -- the server under test -------------------------------------------------------------------


@dataclass
class Served:
    server: Server
    port: int
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[bytes] = field(default_factory=list)
    metadata: list[tuple[tuple[str, Any], ...]] = field(default_factory=list)

    def streams(self) -> int:
        return sum(len(conn.streams) for conn in self.server.connections)


@contextlib.asynccontextmanager
async def serve(options: Sequence[tuple[str, Any]] | None = None) -> AsyncIterator[Served]:
    server = Server(options)
    served = Served(server, 0)

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        served.requests.append(request)
        served.metadata.append(tuple(context.invocation_metadata()))
        return request

    async def sized(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"x" * int(request)

    async def block(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        served.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            served.cancelled.set()
            raise
        return b"never"

    async def join(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        return b"|".join([request async for request in requests])

    async def no_read(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        served.started.set()
        await asyncio.Event().wait()

    async def bad_initial(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            await context.send_initial_metadata((("x-bad", "line\nbreak"),))
        except ValueError:
            if request == b"raise":
                raise
        return b"ok"

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Sized": grpc.unary_unary_rpc_method_handler(sized),
        "Block": grpc.unary_unary_rpc_method_handler(block),
        "Join": grpc.stream_unary_rpc_method_handler(join),
        "NoRead": grpc.stream_stream_rpc_method_handler(no_read),
        "BadInitial": grpc.unary_unary_rpc_method_handler(bad_initial),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    served.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield served
    finally:
        await server.stop(None)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serve() as s:
        yield s


@pytest.fixture
async def conn(served: Served) -> AsyncIterator[RawH2]:
    raw = await RawH2.open(served.port)
    await raw.handshake()
    try:
        yield raw
    finally:
        await raw.close()


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


async def no_streams_left(served: Served) -> None:
    async def check() -> None:
        assert served.streams() == 0
        assert not served.server.calls

    await eventually(check, within=WAIT)


# -- the connection ------------------------------------------------------------------------


async def test_server_preface(served: Served) -> None:
    raw = await RawH2.open(served.port)
    try:
        first = await raw.read_frame()
        assert first is not None and first.kind == SETTINGS and first.flags == 0
        settings = dict(struct.iter_unpack(">HI", first.payload))
        assert settings[S_ENABLE_PUSH] == 0
        assert settings[S_INITIAL_WINDOW_SIZE] == 1 << 20
        assert settings[S_MAX_CONCURRENT_STREAMS] == 100_000
        update = await raw.read_frame()
        assert update is not None and (update.kind, update.stream) == (WINDOW_UPDATE, 0)
        assert struct.unpack(">I", update.payload) == ((1 << 24) - 65_535,)
        ack = await raw.read_frame()  # of our (empty) SETTINGS
        assert ack is not None and (ack.kind, ack.flags, ack.payload) == (SETTINGS, ACK, b"")
    finally:
        await raw.close()


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", id="http1"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", id="almost"),
        pytest.param(frame(SETTINGS, 0, 0), id="no-preface"),
    ],
)
async def test_bad_preface_is_a_protocol_error(served: Served, garbage: bytes) -> None:
    raw = await RawH2.open(served.port, preface=False)
    try:
        raw.write(garbage)
        last, code, _ = await raw.goaway()
        assert (last, code) == (0, PROTOCOL_ERROR)
    finally:
        await raw.close()


async def test_preface_and_request_a_byte_at_a_time(served: Served) -> None:
    raw = await RawH2.open(served.port, preface=False)
    try:
        wire = PREFACE + frame(SETTINGS, 0, 0)
        block = encode(request_headers(path("Echo")))
        wire += frame(HEADERS, END_HEADERS, 1, block)
        wire += frame(DATA, END_STREAM, 1, grpc_message(b"slowly"))
        for i in range(len(wire)):
            raw.write(wire[i : i + 1])
            await raw.writer.drain()
        response = await raw.response(1)
        assert response.messages == [b"slowly"]
        assert response.status == "0"
    finally:
        await raw.close()


async def test_ping_is_answered_with_the_same_payload(conn: RawH2) -> None:
    conn.send(PING, ACK, 0, b"ignored!")  # an ACK is not answered
    conn.send(PING, 0, 0, b"\x00\x01\x02\x03\xfc\xfd\xfe\xff")
    pong = await conn.next(PING)
    assert (pong.flags, pong.stream, pong.payload) == (ACK, 0, b"\x00\x01\x02\x03\xfc\xfd\xfe\xff")


@pytest.mark.parametrize(
    ("stream_id", "payload"),
    [pytest.param(0, b"short", id="short"), pytest.param(1, b"12345678", id="on-a-stream")],
)
async def test_malformed_ping_is_a_protocol_error(
    conn: RawH2, stream_id: int, payload: bytes
) -> None:
    conn.send(PING, 0, stream_id, payload)
    _, code, _ = await conn.goaway()
    assert code == PROTOCOL_ERROR


async def test_settings_are_acknowledged(conn: RawH2) -> None:
    conn.send(SETTINGS, 0, 0, settings_payload([(S_MAX_FRAME_SIZE, 32_768), (0x99, 7)]))
    ack = await conn.next(SETTINGS)
    assert (ack.flags, ack.stream, ack.payload) == (ACK, 0, b"")
    # Still serving.
    conn.request(1, path("Echo"), [b"after settings"])
    assert (await conn.response(1)).messages == [b"after settings"]


@pytest.mark.parametrize(
    ("payload", "stream_id", "code"),
    [
        pytest.param(b"\x00\x04\x00", 0, FRAME_SIZE_ERROR, id="length-not-multiple-of-6"),
        pytest.param(b"", 1, PROTOCOL_ERROR, id="on-a-stream"),
        pytest.param(
            settings_payload([(S_INITIAL_WINDOW_SIZE, 2**31)]), 0, FLOW_CONTROL_ERROR, id="window"
        ),
        pytest.param(
            settings_payload([(S_MAX_FRAME_SIZE, 100)]), 0, PROTOCOL_ERROR, id="max-frame-size"
        ),
        pytest.param(settings_payload([(S_ENABLE_PUSH, 2)]), 0, PROTOCOL_ERROR, id="enable-push"),
    ],
)
async def test_bad_settings_are_connection_errors(
    conn: RawH2, payload: bytes, stream_id: int, code: int
) -> None:
    conn.send(SETTINGS, 0, stream_id, payload)
    assert (await conn.goaway())[1] == code


# -- requests --------------------------------------------------------------------------------


async def test_unary_request(conn: RawH2, served: Served) -> None:
    conn.request(1, path("Echo"), [b"hello"], extra=[("x-meta", "v"), ("x-b-bin", "AAH/")])
    response = await conn.response(1)
    assert response.headers == [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-accept-encoding", "identity, deflate, gzip"),
    ]
    assert response.messages == [b"hello"]
    assert response.trailers == [("grpc-status", "0")]
    assert response.reset is None
    assert served.metadata == [(("x-meta", "v"), ("x-b-bin", b"\x00\x01\xff"))]
    await no_streams_left(served)


async def test_streams_interleave(conn: RawH2, served: Served) -> None:
    for stream_id in (1, 3, 5):
        conn.send(HEADERS, END_HEADERS, stream_id, encode(request_headers(path("Join"))))
    for part in range(3):
        for stream_id in (5, 3, 1):
            conn.send(DATA, 0, stream_id, grpc_message(b"%d-%d" % (stream_id, part)))
    # A message split across frames, and several messages in one frame.
    whole = grpc_message(b"split") + grpc_message(b"a") + grpc_message(b"b")
    for stream_id in (1, 3, 5):
        conn.send(DATA, 0, stream_id, whole[:3])
        conn.send(DATA, 0, stream_id, whole[3:9])
        conn.send(DATA, END_STREAM, stream_id, whole[9:])
    for stream_id in (1, 3, 5):
        response = await conn.response(stream_id)
        parts = b"|".join(b"%d-%d" % (stream_id, part) for part in range(3))
        assert response.messages == [parts + b"|split|a|b"]
        assert response.status == "0"
    await no_streams_left(served)


async def test_padded_headers_and_data(conn: RawH2) -> None:
    block = encode(request_headers(path("Echo")))
    pad = 17
    conn.send(HEADERS, END_HEADERS | PADDED, 1, bytes((pad,)) + block + b"\x00" * pad)
    message = grpc_message(b"padded body")
    conn.send(DATA, PADDED, 1, bytes((200,)) + message[:4] + b"\x00" * 200)
    conn.send(DATA, END_STREAM | PADDED, 1, bytes((0,)) + message[4:])
    response = await conn.response(1)
    assert response.messages == [b"padded body"]
    assert response.status == "0"
    # PADDED with PRIORITY (5 octets of dependency and weight after the pad length).
    flags = END_HEADERS | PADDED | PRIORITY_FLAG
    conn.send(HEADERS, flags, 3, b"\x03" + b"\x00\x00\x00\x01\x10" + block + b"\x00" * 3)
    conn.send(DATA, END_STREAM, 3, grpc_message(b"with priority"))
    assert (await conn.response(3)).messages == [b"with priority"]
    # An all-padding DATA frame (pad length = payload - 1) is fine too.
    conn.send(HEADERS, END_HEADERS, 5, block)
    conn.send(DATA, PADDED, 5, b"\x04" + b"\x00" * 4)
    conn.send(DATA, END_STREAM, 5, grpc_message(b"z"))
    assert (await conn.response(5)).messages == [b"z"]


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        pytest.param(DATA, b"\x05abc", id="data-pad-too-long"),
        pytest.param(DATA, b"", id="data-no-pad-length"),
        pytest.param(HEADERS, b"\xff\x82", id="headers-pad-too-long"),
    ],
)
async def test_bad_padding_is_a_protocol_error(conn: RawH2, kind: int, payload: bytes) -> None:
    if kind == DATA:
        conn.send(HEADERS, END_HEADERS, 1, encode(request_headers(path("Echo"))))
        conn.send(DATA, PADDED, 1, payload)
    else:
        conn.send(HEADERS, END_HEADERS | PADDED, 1, payload)
    assert (await conn.goaway())[1] == PROTOCOL_ERROR


async def test_headers_split_into_continuations(conn: RawH2, served: Served) -> None:
    extra = [(f"x-key-{i}", "v" * 200) for i in range(100)]  # a block of about 21 KB
    block = encode(request_headers(path("Echo"), extra))
    assert len(block) > 16_384
    cuts = [0, 5, 9000, 16_000, len(block)]
    conn.send(HEADERS, 0, 1, block[: cuts[1]])
    for i in range(1, len(cuts) - 1):
        last = i == len(cuts) - 2
        conn.send(CONTINUATION, END_HEADERS if last else 0, 1, block[cuts[i] : cuts[i + 1]])
    conn.send(DATA, END_STREAM, 1, grpc_message(b"continued"))
    response = await conn.response(1)
    assert response.messages == [b"continued"]
    assert response.status == "0"
    assert [pair for pair in served.metadata[0] if pair[0].startswith("x-key-")] == extra


async def test_headers_with_end_stream_split_into_continuation(conn: RawH2) -> None:
    """END_STREAM is on HEADERS, END_HEADERS on the CONTINUATION: an empty client stream."""
    block = encode(request_headers(path("Join")))
    conn.send(HEADERS, END_STREAM, 1, block[:3])
    conn.send(CONTINUATION, END_HEADERS, 1, block[3:])
    response = await conn.response(1)
    assert response.messages == [b""]
    assert response.status == "0"


@pytest.mark.parametrize(
    "between",
    [
        pytest.param(frame(PING, 0, 0, b"12345678"), id="ping"),
        pytest.param(frame(DATA, 0, 1, grpc_message(b"x")), id="data"),
        pytest.param(frame(CONTINUATION, END_HEADERS, 3, b"\x82"), id="other-stream"),
    ],
)
async def test_frame_inside_a_header_block_is_a_protocol_error(conn: RawH2, between: bytes) -> None:
    block = encode(request_headers(path("Echo")))
    conn.send(HEADERS, 0, 1, block[:4])
    conn.write(between)
    conn.send(CONTINUATION, END_HEADERS, 1, block[4:])
    assert (await conn.goaway())[1] == PROTOCOL_ERROR


async def test_continuation_without_headers_is_a_protocol_error(conn: RawH2) -> None:
    conn.send(CONTINUATION, END_HEADERS, 1, encode(request_headers(path("Echo"))))
    assert (await conn.goaway())[1] == PROTOCOL_ERROR


async def test_frame_over_16384_is_a_frame_size_error(conn: RawH2) -> None:
    conn.send(HEADERS, END_HEADERS, 1, encode(request_headers(path("Echo"))))
    conn.send(DATA, 0, 1, b"\x00" * 16_385)
    last, code, _ = await conn.goaway()
    assert (last, code) == (1, FRAME_SIZE_ERROR)


async def test_frame_of_exactly_16384_is_fine(conn: RawH2) -> None:
    conn.send(HEADERS, END_HEADERS, 1, encode(request_headers(path("Echo"))))
    body = b"y" * (16_384 - 5)
    conn.send(DATA, END_STREAM, 1, grpc_message(body))
    assert (await conn.response(1)).messages == [body]


async def test_headers_on_stream_0_is_a_protocol_error(conn: RawH2) -> None:
    conn.send(HEADERS, END_HEADERS, 0, encode(request_headers(path("Echo"))))
    assert (await conn.goaway())[1] == PROTOCOL_ERROR


async def test_client_trailers_are_accepted(conn: RawH2) -> None:
    conn.send(HEADERS, END_HEADERS, 1, encode(request_headers(path("Join"))))
    conn.send(DATA, 0, 1, grpc_message(b"a") + grpc_message(b"b"))
    conn.send(HEADERS, END_HEADERS | END_STREAM, 1, encode([("x-trailer", "t")]))
    response = await conn.response(1)
    assert response.messages == [b"a|b"]
    assert response.status == "0"


async def test_bad_hpack_is_a_compression_error(conn: RawH2) -> None:
    conn.send(HEADERS, END_HEADERS | END_STREAM, 1, b"\x80")  # index 0
    assert (await conn.goaway())[1] == COMPRESSION_ERROR


async def test_even_stream_id_is_a_protocol_error(conn: RawH2) -> None:
    conn.request(2, path("Echo"), [b"x"])
    conn.send(PING, 0, 0, b"barrier!")
    codes = []
    while (got := await conn.read_frame()) is not None:
        if got.kind == GOAWAY:
            codes.append(struct.unpack_from(">II", got.payload)[1])
        if got.kind == PING and got.flags & ACK:
            break
    assert codes == [PROTOCOL_ERROR]


async def test_push_promise_is_a_protocol_error(conn: RawH2) -> None:
    conn.send(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02\x82")
    assert (await conn.goaway())[1] == PROTOCOL_ERROR


async def test_unknown_frame_types_and_priority_are_ignored(conn: RawH2) -> None:
    conn.send(0xEE, 0xFF, 0, b"whatever")
    conn.send(0xEE, 0, 1, b"")
    conn.send(PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10")
    conn.request(1, path("Echo"), [b"still fine"])
    assert (await conn.response(1)).messages == [b"still fine"]


async def test_data_on_a_stream_never_opened_is_a_protocol_error(conn: RawH2) -> None:
    conn.send(DATA, END_STREAM, 7, grpc_message(b"orphan"))
    last, code, _ = await conn.goaway()
    assert (last, code) == (0, PROTOCOL_ERROR)


async def test_data_on_stream_0_is_a_protocol_error(conn: RawH2) -> None:
    conn.send(DATA, 0, 0, b"x")
    assert (await conn.goaway())[1] == PROTOCOL_ERROR


async def test_data_after_the_stream_closed(conn: RawH2) -> None:
    conn.request(1, path("Echo"), [b"one"])
    assert (await conn.response(1)).messages == [b"one"]
    conn.send(DATA, END_STREAM, 1, grpc_message(b"late"))
    frames = await conn.ping()
    assert [(f.kind, f.stream, f.payload) for f in frames] == [
        (RST_STREAM, 1, struct.pack(">I", STREAM_CLOSED))
    ]
    conn.request(3, path("Echo"), [b"two"])  # the connection is fine
    assert (await conn.response(3)).messages == [b"two"]


async def test_unknown_method_is_trailers_only(conn: RawH2, served: Served) -> None:
    conn.request(1, "/no.Such/Method", [b"x"])
    response = await conn.response(1)
    assert response.headers == [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-accept-encoding", "identity, deflate, gzip"),
        ("grpc-status", "12"),
        ("grpc-message", "Method not found!"),
    ]
    assert response.data == b""
    await no_streams_left(served)


async def test_get_is_not_a_grpc_request(conn: RawH2) -> None:
    conn.send(
        HEADERS, END_HEADERS | END_STREAM, 1, encode(request_headers(path("Echo"), method="GET"))
    )
    response = await conn.response(1)
    assert response.status == str(grpc.StatusCode.INTERNAL.value[0])


async def test_two_messages_on_a_unary_call(conn: RawH2, served: Served) -> None:
    conn.request(1, path("Echo"), [b"one", b"two"])
    response = await conn.response(1)
    assert response.status == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
    assert response.messages == []
    assert served.requests == []


async def test_no_message_on_a_unary_call(conn: RawH2, served: Served) -> None:
    conn.send(HEADERS, END_HEADERS | END_STREAM, 1, encode(request_headers(path("Echo"))))
    response = await conn.response(1)
    assert response.status == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
    assert served.requests == []


async def test_stream_ending_inside_a_message(conn: RawH2, served: Served) -> None:
    conn.send(HEADERS, END_HEADERS, 1, encode(request_headers(path("Echo"))))
    conn.send(DATA, END_STREAM, 1, grpc_message(b"truncated")[:-3])
    response = await conn.response(1)
    assert response.reset == PROTOCOL_ERROR
    assert served.requests == []
    await no_streams_left(served)


async def test_compressed_message_fails_the_call(conn: RawH2, served: Served) -> None:
    conn.send(HEADERS, END_HEADERS, 1, encode(request_headers(path("Echo"))))
    conn.send(DATA, END_STREAM, 1, grpc_message(b"pretend gzip", compressed=1))
    response = await conn.response(1)
    assert response.status == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
    assert response.message is not None and "compressed" in response.message
    assert served.requests == []
    conn.request(3, path("Echo"), [b"plain"])  # the connection survives
    assert (await conn.response(3)).messages == [b"plain"]
    await no_streams_left(served)


@pytest.mark.parametrize("request_body", [b"catch", b"raise"])
async def test_rejected_initial_metadata_keeps_the_response_well_formed(
    conn: RawH2, request_body: bytes
) -> None:
    conn.request(1, path("BadInitial"), [request_body])
    response = await conn.response(1)
    assert response.headers is not None
    assert response.headers[:2] == [(":status", "200"), ("content-type", "application/grpc")]
    if request_body == b"catch":
        assert response.messages == [b"ok"]
        assert response.status == "0"
    else:
        assert response.status == str(grpc.StatusCode.UNKNOWN.value[0])


async def test_message_over_the_receive_limit() -> None:
    async with serve(options=[("grpc.max_receive_message_length", 10)]) as served:
        raw = await RawH2.open(served.port)
        try:
            await raw.handshake()
            raw.send(HEADERS, END_HEADERS, 1, encode(request_headers(path("Echo"))))
            # Only the length prefix: the limit applies before the body arrives.
            raw.send(DATA, 0, 1, struct.pack(">BI", 0, 11))
            response = await raw.response(1)
            assert response.status == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
            assert response.message == "Received message larger than max (11 vs. 10)"
            # The client's remaining bytes for that stream are not a problem.
            raw.send(DATA, END_STREAM, 1, b"x" * 11)
            raw.request(3, path("Echo"), [b"0123456789"])
            assert (await raw.response(3)).messages == [b"0123456789"]
        finally:
            await raw.close()


# -- flow control ----------------------------------------------------------------------------


async def test_response_waits_for_the_stream_window(served: Served) -> None:
    raw = await RawH2.open(served.port, settings=[(S_INITIAL_WINDOW_SIZE, 1000)])
    try:
        await raw.handshake()
        raw.request(1, path("Sized"), [b"5000"])
        before = await raw.next(HEADERS, 1)
        assert before.flags & END_STREAM == 0
        first = await raw.next(DATA, 1)
        # Everything the server will send without more window has been sent by now.
        sent = [first, *(await raw.ping())]
        assert sum(len(f.payload) for f in sent if f.kind == DATA) == 1000
        assert [f for f in sent if f.kind == HEADERS] == []
        # 1000 more octets of window: exactly 1000 more.
        raw.send(WINDOW_UPDATE, 0, 1, struct.pack(">I", 1000))
        sent = await raw.ping()
        assert sum(len(f.payload) for f in sent if f.kind == DATA and f.stream == 1) == 1000
        assert [f for f in sent if f.kind == HEADERS] == []
        # The rest (5005 - 2000 octets) and the trailers.
        raw.send(WINDOW_UPDATE, 0, 1, struct.pack(">I", 3005))
        trailers = await raw.next(HEADERS, 1)
        assert trailers.flags & END_STREAM
        assert raw.data(1) == grpc_message(b"x" * 5000)
        assert before.headers is not None and before.headers[0] == (":status", "200")
        assert trailers.headers == [("grpc-status", "0")]
    finally:
        await raw.close()


async def test_settings_change_of_the_initial_window_releases_data(served: Served) -> None:
    raw = await RawH2.open(served.port, settings=[(S_INITIAL_WINDOW_SIZE, 1000)])
    try:
        await raw.handshake()
        raw.request(1, path("Sized"), [b"5000"])
        await raw.next(DATA, 1)
        sent = await raw.ping()
        assert sum(len(f.payload) for f in sent if f.kind == DATA) == 0  # the first had 1000
        # Raising the initial window by 4005 gives the open stream 4005 more.
        raw.send(SETTINGS, 0, 0, settings_payload([(S_INITIAL_WINDOW_SIZE, 5005)]))
        trailers = await raw.next(HEADERS, 1)
        assert trailers.flags & END_STREAM
        assert len(raw.data(1)) == 5005
        acks = [f for f in raw.received if f.kind == SETTINGS and f.flags & ACK]
        assert len(acks) == 2  # of the first and of the second SETTINGS
    finally:
        await raw.close()


async def test_settings_shrinking_the_window_below_zero(served: Served) -> None:
    """A SETTINGS change can make a stream's window negative; it must climb back first."""
    raw = await RawH2.open(served.port, settings=[(S_INITIAL_WINDOW_SIZE, 3000)])
    try:
        await raw.handshake()
        raw.request(1, path("Sized"), [b"5000"])
        await raw.next(DATA, 1)
        await raw.ping()
        raw.send(SETTINGS, 0, 0, settings_payload([(S_INITIAL_WINDOW_SIZE, 1000)]))
        raw.send(WINDOW_UPDATE, 0, 1, struct.pack(">I", 1500))  # window: -2000 + 1500
        sent = await raw.ping()
        assert sum(len(f.payload) for f in sent if f.kind == DATA) == 0
        raw.send(WINDOW_UPDATE, 0, 1, struct.pack(">I", 500 + 2005))
        await raw.next(HEADERS, 1)
        assert len(raw.data(1)) == 5005
    finally:
        await raw.close()


async def test_response_waits_for_the_connection_window(served: Served) -> None:
    raw = await RawH2.open(served.port, settings=[(S_INITIAL_WINDOW_SIZE, 2**31 - 1)])
    try:
        await raw.handshake()
        raw.request(1, path("Sized"), [b"100000"])
        await raw.next(DATA, 1)
        await raw.ping()
        data = [f for f in raw.received if f.kind == DATA]
        assert sum(len(f.payload) for f in data) == 65_535  # the default connection window
        assert max(len(f.payload) for f in data) <= 16_384
        raw.send(WINDOW_UPDATE, 0, 0, struct.pack(">I", 100_000))
        trailers = await raw.next(HEADERS, 1)
        assert trailers.flags & END_STREAM
        data = [f for f in raw.received if f.kind == DATA]
        assert sum(len(f.payload) for f in data) == 100_005
    finally:
        await raw.close()


async def test_connection_window_is_shared_between_streams(served: Served) -> None:
    raw = await RawH2.open(served.port, settings=[(S_INITIAL_WINDOW_SIZE, 2**31 - 1)])
    try:
        await raw.handshake()
        raw.request(1, path("Sized"), [b"60000"])
        raw.request(3, path("Sized"), [b"60000"])
        await raw.next(DATA)
        await raw.ping()
        sent = sum(len(f.payload) for f in raw.received if f.kind == DATA)
        assert sent == 65_535
        raw.send(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2 * 60_005 - 65_535))
        for stream_id in (1, 3):
            response = await raw.response(stream_id)
            assert response.status == "0"
            assert response.messages == [b"x" * 60_000]
    finally:
        await raw.close()


async def test_large_request_is_paced_by_server_window_updates(served: Served) -> None:
    """3 MiB up, honouring the server's windows (1 MiB per stream): the server must
    hand window back while the message is still incomplete."""
    body = bytes(range(256)) * (3 * 4096)
    wire = grpc_message(body)
    raw = await RawH2.open(served.port, settings=[(S_INITIAL_WINDOW_SIZE, 2**31 - 1)])
    try:
        settings = await raw.handshake()
        stream_window = settings[S_INITIAL_WINDOW_SIZE]
        connection_window = 65_535
        assert stream_window == 1 << 20
        raw.send(HEADERS, END_HEADERS, 1, encode(request_headers(path("Join"))))
        pos = 0
        while pos < len(wire):
            allowed = min(stream_window, connection_window, 16_384, len(wire) - pos)
            if allowed <= 0:
                got = await raw.next(WINDOW_UPDATE)
                (increment,) = struct.unpack(">I", got.payload)
                assert increment > 0
                if got.stream == 0:
                    connection_window += increment
                elif got.stream == 1:
                    stream_window += increment
                continue
            last = pos + allowed == len(wire)
            raw.send(DATA, END_STREAM if last else 0, 1, wire[pos : pos + allowed])
            stream_window -= allowed
            connection_window -= allowed
            pos += allowed
        # A stream WINDOW_UPDATE came before the last octet of the message was sent.
        updates = [f for f in raw.received if f.kind == WINDOW_UPDATE and f.stream == 1]
        assert sum(struct.unpack(">I", f.payload)[0] for f in updates) >= 2 * (1 << 20)
        response = await raw.response(1, window_updates=True)
        assert response.messages == [body]
        assert response.status == "0"
    finally:
        await raw.close()


@pytest.mark.parametrize(
    ("stream_id", "increment", "expected"),
    [
        pytest.param(0, 0, PROTOCOL_ERROR, id="zero"),
        pytest.param(0, 2**31 - 1, FLOW_CONTROL_ERROR, id="overflow"),
    ],
)
async def test_connection_window_update_errors(
    conn: RawH2, stream_id: int, increment: int, expected: int
) -> None:
    conn.send(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))
    assert (await conn.goaway())[1] == expected


async def test_malformed_window_update_is_a_frame_size_error(conn: RawH2) -> None:
    conn.send(WINDOW_UPDATE, 0, 0, b"\x00\x00\x01")
    assert (await conn.goaway())[1] == FRAME_SIZE_ERROR


@pytest.mark.parametrize(
    ("increment", "expected"),
    [
        pytest.param(0, PROTOCOL_ERROR, id="zero"),
        pytest.param(2**31 - 1, FLOW_CONTROL_ERROR, id="overflow"),
    ],
)
async def test_stream_window_update_errors_reset_the_stream(
    conn: RawH2, served: Served, increment: int, expected: int
) -> None:
    conn.request(1, path("Block"), [b""])
    await asyncio.wait_for(served.started.wait(), WAIT)
    conn.send(WINDOW_UPDATE, 0, 1, struct.pack(">I", increment))
    response = await conn.response(1)
    assert response.reset == expected
    await asyncio.wait_for(served.cancelled.wait(), WAIT)
    conn.request(3, path("Echo"), [b"alive"])
    assert (await conn.response(3)).messages == [b"alive"]
    await no_streams_left(served)


# -- cancellation, deadlines, shutdown ----------------------------------------------------------


async def test_rst_stream_cancels_the_handler(conn: RawH2, served: Served) -> None:
    conn.request(1, path("Block"), [b""])
    await asyncio.wait_for(served.started.wait(), WAIT)
    conn.send(RST_STREAM, 0, 1, struct.pack(">I", CANCEL))
    await asyncio.wait_for(served.cancelled.wait(), WAIT)
    await no_streams_left(served)
    # Nothing more is sent on the stream, and the connection is fine.
    frames = await conn.ping()
    assert [f for f in frames if f.stream == 1 and f.kind != WINDOW_UPDATE] == []
    conn.request(3, path("Echo"), [b"next"])
    assert (await conn.response(3)).messages == [b"next"]


async def test_grpc_timeout_ends_the_call(conn: RawH2, served: Served) -> None:
    conn.request(1, path("Block"), [b""], extra=[("grpc-timeout", "200m")])
    response = await conn.response(1)
    assert response.status == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert response.message == "Deadline Exceeded"
    await asyncio.wait_for(served.cancelled.wait(), WAIT)
    await no_streams_left(served)


async def test_closing_the_socket_cancels_calls(served: Served) -> None:
    raw = await RawH2.open(served.port)
    await raw.handshake()
    raw.request(1, path("Block"), [b""])
    await asyncio.wait_for(served.started.wait(), WAIT)
    await raw.close()
    await asyncio.wait_for(served.cancelled.wait(), WAIT)
    await no_streams_left(served)


async def test_stop_sends_goaway_refuses_new_streams_and_ends_calls(served: Served) -> None:
    raw = await RawH2.open(served.port)
    try:
        await raw.handshake()
        raw.request(1, path("Block"), [b""])
        await asyncio.wait_for(served.started.wait(), WAIT)
        stopping = asyncio.ensure_future(served.server.stop(grace=0.5))
        goaway = await raw.next(GOAWAY)
        assert struct.unpack_from(">II", goaway.payload) == (1, NO_ERROR)
        raw.request(3, path("Echo"), [b"too late"])
        response = await raw.response(3)
        assert response.reset == REFUSED_STREAM
        blocked = await raw.response(1)
        assert blocked.status == str(grpc.StatusCode.UNAVAILABLE.value[0])
        await asyncio.wait_for(served.cancelled.wait(), WAIT)
        await asyncio.wait_for(stopping, WAIT)
        assert await raw.read_frame() is None
    finally:
        await raw.close()


async def test_stop_grace_covers_responses_waiting_for_window(served: Served) -> None:
    raw = await RawH2.open(served.port, settings=[(S_INITIAL_WINDOW_SIZE, 1000)])
    try:
        await raw.handshake()
        raw.request(1, path("Sized"), [b"5000"])
        await raw.next(DATA, 1)
        await raw.ping()  # the handler is done; 4005 octets and the trailers wait for window
        stopping = asyncio.ensure_future(served.server.stop(grace=WAIT))
        await raw.next(GOAWAY)
        raw.send(WINDOW_UPDATE, 0, 1, struct.pack(">I", 4005))
        response = await raw.response(1)
        assert response.messages == [b"x" * 5000]
        assert response.status == "0"
        await asyncio.wait_for(stopping, WAIT)
    finally:
        await raw.close()


async def test_unread_requests_stop_the_flow_control_window(conn: RawH2, served: Served) -> None:
    conn.send(HEADERS, END_HEADERS, 1, encode(request_headers(path("NoRead"))))
    await asyncio.wait_for(served.started.wait(), WAIT)
    wire = grpc_message(b"\x01" * (1 << 20)) * 16
    stream_window, connection_window = 1 << 20, 65_535  # what the server granted
    pos = 0
    while pos < len(wire):
        allowed = min(stream_window, connection_window, 16_384, len(wire) - pos)
        if allowed > 0:
            conn.send(DATA, 0, 1, wire[pos : pos + allowed])
            pos += allowed
            stream_window -= allowed
            connection_window -= allowed
            continue
        # Out of window: whatever WINDOW_UPDATE the server sends comes before this ACK.
        updates = [f for f in await conn.ping() if f.kind == WINDOW_UPDATE]
        if not updates:
            break  # stalled: backpressure
        for update in updates:
            (increment,) = struct.unpack(">I", update.payload)
            if update.stream == 0:
                connection_window += increment
            elif update.stream == 1:
                stream_window += increment
    # Unread, the server should not take much more than its stream window plus a message.
    assert pos <= 6 * (1 << 20)


async def test_max_concurrent_streams() -> None:
    async with serve(options=[("grpc.max_concurrent_streams", 2)]) as served:
        raw = await RawH2.open(served.port)
        try:
            settings = await raw.handshake()
            assert settings[S_MAX_CONCURRENT_STREAMS] == 2
            raw.request(1, path("Block"), [b""])
            raw.request(3, path("Block"), [b""])
            raw.request(5, path("Echo"), [b"over the limit"])
            assert (await raw.response(5)).reset == REFUSED_STREAM
            raw.send(RST_STREAM, 0, 1, struct.pack(">I", CANCEL))
            await raw.ping()
            raw.request(7, path("Echo"), [b"room again"])
            assert (await raw.response(7)).messages == [b"room again"]
        finally:
            await raw.close()


# -- stream bookkeeping --------------------------------------------------------------------------


async def test_streams_are_forgotten_after_every_kind_of_ending(served: Served) -> None:
    raw = await RawH2.open(served.port, settings=[(S_INITIAL_WINDOW_SIZE, 3)])
    try:
        await raw.handshake()
        # A response that has to wait for window (its trailers are queued behind DATA).
        raw.request(1, path("Sized"), [b"100"])
        await raw.next(DATA, 1)
        raw.send(WINDOW_UPDATE, 0, 1, struct.pack(">I", 1000))
        assert (await raw.response(1)).status == "0"
        # A client stream, its answer waiting for window.
        raw.request(3, path("Join"), [b"a"])
        await raw.ping()
        raw.send(WINDOW_UPDATE, 0, 3, struct.pack(">I", 1000))
        assert (await raw.response(3)).messages == [b"a"]
        # Reset by the client, and ended by a deadline.
        raw.request(5, path("Block"), [b""])
        await asyncio.wait_for(served.started.wait(), WAIT)
        raw.send(RST_STREAM, 0, 5, struct.pack(">I", CANCEL))
        raw.request(7, path("Block"), [b""], extra=[("grpc-timeout", "1m")])
        assert (await raw.response(7)).status == "4"
        # Unknown method, and a call still sending when the answer came.
        raw.request(9, "/no.Such/Method", [b""])
        assert (await raw.response(9)).status == "12"
        raw.request(11, path("Echo"), [b"a", b"b"], end=False)
        assert (await raw.response(11)).status == "12"
        await raw.ping()
        await no_streams_left(served)
    finally:
        await raw.close()


async def test_stream_ended_by_its_headers_is_forgotten(served: Served) -> None:
    raw = await RawH2.open(served.port, settings=[(S_INITIAL_WINDOW_SIZE, 3)])
    try:
        await raw.handshake()
        # END_STREAM on HEADERS (no messages), and an answer that waits for window.
        raw.send(HEADERS, END_HEADERS | END_STREAM, 1, encode(request_headers(path("Join"))))
        await raw.ping()
        raw.send(WINDOW_UPDATE, 0, 1, struct.pack(">I", 1000))
        assert (await raw.response(1)).messages == [b""]
        await raw.ping()
        assert served.streams() == 0
    finally:
        await raw.close()


@pytest.mark.parametrize(
    "end_on_headers",
    [
        pytest.param(True, id="end-stream-on-headers"),
        pytest.param(False, id="end-stream-on-data"),
    ],
)
async def test_no_rst_stream_after_a_complete_exchange(
    served: Served, end_on_headers: bool
) -> None:
    """Once both sides ended a stream it is closed: nothing more may be sent on it
    (RFC 9113 5.1; an RST_STREAM(NO_ERROR) is only for a client still sending)."""
    raw = await RawH2.open(served.port)
    try:
        await raw.handshake()
        if end_on_headers:
            raw.send(HEADERS, END_HEADERS | END_STREAM, 1, encode(request_headers(path("Join"))))
        else:
            raw.send(HEADERS, END_HEADERS, 1, encode(request_headers(path("Join"))))
            raw.send(DATA, END_STREAM, 1, b"")
        assert (await raw.response(1)).status == "0"
        await raw.ping()
        assert [f for f in raw.received if f.kind == RST_STREAM] == []
    finally:
        await raw.close()


# -- uvloop (what the proxy and the SDK run on) ----------------------------------------------


def test_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        assert "uvloop" in type(asyncio.get_running_loop()).__module__
        async with serve() as served:
            raw = await RawH2.open(served.port, settings=[(S_INITIAL_WINDOW_SIZE, 1000)])
            try:
                await raw.handshake()
                raw.request(1, path("Echo"), [b"on uvloop"], extra=[("x-k", "v")])
                assert (await raw.response(1)).messages == [b"on uvloop"]
                raw.request(3, path("Sized"), [b"5000"])
                await raw.next(DATA, 3)
                sent = await raw.ping()
                assert sum(len(f.payload) for f in sent if f.kind == DATA) == 0
                raw.send(WINDOW_UPDATE, 0, 3, struct.pack(">I", 4005))
                assert (await raw.response(3)).messages == [b"x" * 5000]
                raw.request(5, path("Block"), [b""])
                await asyncio.wait_for(served.started.wait(), WAIT)
                raw.send(RST_STREAM, 0, 5, struct.pack(">I", CANCEL))
                await asyncio.wait_for(served.cancelled.wait(), WAIT)
                await no_streams_left(served)
            finally:
                await raw.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(), 60))


async def test_a_header_list_that_decodes_too_large_is_resource_exhausted(
    conn: RawH2, served: Served
) -> None:
    # 4 KB block, ~80 KB decoded: one large value indexed once, then referenced
    # twenty times from the dynamic table (an "HPACK bomb" in small).
    import hpack as reference

    encoder = reference.Encoder()
    block = encoder.encode(request_headers(path("Echo"), [("x-big", "v" * 4000)] * 20))
    assert len(block) < 5_000
    conn.send(HEADERS, END_HEADERS, 1, block)
    conn.send(DATA, END_STREAM, 1, grpc_message(b"x"))
    response = await conn.response(1)
    assert response.status == "8"  # RESOURCE_EXHAUSTED, before any handler ran
    assert "over the limit of 65536" in (response.message or "")
    assert served.metadata == []
    # The connection (and its HPACK state) carries on.
    conn.request(3, path("Echo"), [b"after"])
    after = await conn.response(3)
    assert after.messages == [b"after"]
    assert after.status == "0"


def _random_frames(rng: random.Random, count: int) -> bytes:
    """Frames of every type (and some unknown ones) with random flags, stream
    ids and payloads, some of them well-formed requests, some garbage."""
    out = bytearray()
    for _ in range(count):
        kind = rng.choice(
            [
                DATA,
                HEADERS,
                PRIORITY,
                RST_STREAM,
                SETTINGS,
                PUSH_PROMISE,
                PING,
                GOAWAY,
                WINDOW_UPDATE,
                CONTINUATION,
                0x0A,
                0xFF,
            ]
        )
        stream_id = rng.choice([0, 1, 2, 3, 5, 7, 2**31 - 1, rng.randrange(2**31)])
        flags = rng.randrange(256)
        roll = rng.random()
        if kind == HEADERS and roll < 0.5:
            payload = encode(request_headers(path(rng.choice(["Echo", "Block", "Nope"]))))
        elif kind == DATA and roll < 0.5:
            payload = grpc_message(rng.randbytes(rng.randrange(64)), rng.choice([0, 0, 1]))
        else:
            payload = rng.randbytes(rng.choice([0, 1, 4, 5, 6, 8, 9, 12, rng.randrange(300)]))
        out += frame(kind, flags, stream_id, payload)
    return bytes(out)


async def test_random_frames_never_hurt_the_server(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(int(os.environ.get("FRAME_FUZZ_SEED", "20261127")))
    for _ in range(int(os.environ.get("FRAME_FUZZ_CONNECTIONS", "150"))):
        raw = await RawH2.open(served.port)
        try:
            raw.write(_random_frames(rng, rng.randrange(1, 25)))
            # Read whatever comes back until the server closes the connection
            # or has answered everything before a final PING.
            raw.send(PING, 0, 0, b"lastping")
            async with asyncio.timeout(WAIT):
                while True:
                    got = await raw.read_frame()
                    if got is None or (got.kind == PING and got.payload == b"lastping"):
                        break
        finally:
            await raw.close()
    # Still serving, with no stream left behind and nothing logged as a crash.
    conn = await RawH2.open(served.port)
    try:
        await conn.handshake()
        conn.request(1, path("Echo"), [b"still here"])
        response = await conn.response(1)
        assert response.messages == [b"still here"]
    finally:
        await conn.close()
    crashes = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert crashes == [], [r.getMessage() for r in crashes]


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", lambda data: gzip.compress(data)),
        ("deflate", lambda data: zlib.compress(data)),
    ],
)
async def test_compressed_messages_in_an_announced_encoding_are_inflated(
    conn: RawH2, served: Served, encoding: str, compress: Any
) -> None:
    conn.request(1, path("Echo"), [], extra=[("grpc-encoding", encoding)], end=False)
    conn.send(DATA, END_STREAM, 1, grpc_message(compress(b"squeezed " * 100), compressed=1))
    response = await conn.response(1)
    assert response.status == "0"
    assert response.messages == [b"squeezed " * 100]  # answered uncompressed
    assert served.requests == [b"squeezed " * 100]


@pytest.mark.parametrize(
    ("encoding", "body", "code", "words"),
    [
        ("snappy", b"whatever", grpc.StatusCode.UNIMPLEMENTED, "identity, deflate, gzip"),
        ("gzip", b"not gzip at all", grpc.StatusCode.INTERNAL, "does not inflate"),
        # 8 MiB of zeros in ~8 KB: more than the 4 MiB limit once inflated.
        ("gzip", gzip.compress(bytes(8 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger"),
    ],
)
async def test_compressed_messages_that_cannot_be_inflated_fail_the_call(
    conn: RawH2, served: Served, encoding: str, body: bytes, code: grpc.StatusCode, words: str
) -> None:
    conn.request(1, path("Echo"), [], extra=[("grpc-encoding", encoding)], end=False)
    conn.send(DATA, END_STREAM, 1, grpc_message(body, compressed=1))
    response = await conn.response(1)
    assert response.status == str(code.value[0])
    assert words in (response.message or "")
    assert served.requests == []
    conn.request(3, path("Echo"), [b"plain"])  # the connection survives
    assert (await conn.response(3)).messages == [b"plain"]
