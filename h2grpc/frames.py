"""HTTP/2 (RFC 9113) frame types, flags, error codes and settings, the frame
and gRPC message encodings, and the per-stream state a connection keeps."""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from typing import Protocol

import grpc

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0, 1, 2, 3, 4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 5, 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 5, 6, 7, 8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 9, 11

S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
# What we let the peer send before it must wait for our WINDOW_UPDATE.
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 1 << 24
# Frames we send, and the largest we accept (no peer may assume more).
MAX_FRAME = 16_384
# The most a header list may decode to (RFC 9113's size: name + value + 32
# per field), as announced in SETTINGS_MAX_HEADER_LIST_SIZE; also the most a
# header block (HEADERS and its CONTINUATIONs) may take before decoding.
MAX_HEADER_LIST_SIZE = 1 << 16

_FRAME = struct.Struct(">IBI")  # (length << 8 | type, flags, stream id)
_U32 = struct.Struct(">I")
_MESSAGE = struct.Struct(">BI")  # gRPC: compressed flag, length


class ConnectionError_(Exception):
    """A connection-level protocol violation: answered with GOAWAY."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamHandler(Protocol):
    """What a call needs to hear from its stream."""

    def on_headers(self, headers: list[tuple[str, str]], end_stream: bool) -> None: ...
    def on_message(self, message: bytes) -> None: ...
    def on_end(self) -> None: ...
    def on_reset(self, code: int | None, reason: str) -> None: ...
    def on_bad_message(self, code: grpc.StatusCode, reason: str) -> None: ...
    @property
    def backlog(self) -> int:
        """Bytes of received messages not yet read by the application."""
        ...


class Stream:
    __slots__ = (
        "buffer",
        "discard",
        "encoding",
        "handler",
        "id",
        "local_closed",
        "max_message",
        "pending",
        "remote_closed",
        "send_window",
        "unacked",
        "waiters",
    )

    def __init__(self, stream_id: int, send_window: int, max_message: int) -> None:
        self.id = stream_id
        self.handler: StreamHandler | None = None
        self.send_window = send_window
        # Frames waiting for flow-control window: (kind, payload, end_stream).
        self.pending: deque[tuple[int, bytes, bool]] = deque()
        self.waiters: list[asyncio.Future[None]] = []
        self.buffer = b""  # a partial gRPC message
        self.unacked = 0  # bytes received but not yet returned by WINDOW_UPDATE
        self.remote_closed = False
        self.local_closed = False
        self.max_message = max_message
        # The peer's grpc-encoding: how its compressed messages are compressed.
        self.encoding = "identity"
        self.discard = False  # a bad message arrived: ignore the rest


def wake_all(waiters: list[asyncio.Future[None]]) -> None:
    """Resolve every waiter not yet done (a cancelled one is left as it is)."""
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _FRAME.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def grpc_message(payload: bytes) -> bytes:
    return _MESSAGE.pack(0, len(payload)) + payload


def strip_padding(payload: bytes) -> bytes:
    if not payload:
        raise ConnectionError_(PROTOCOL_ERROR, "padded frame without pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ConnectionError_(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - pad]
