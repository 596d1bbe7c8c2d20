"""One HTTP/2 connection (RFC 9113) carrying gRPC calls, for either side.

A single-threaded asyncio protocol: frames are parsed from the bytes the event
loop hands over, and everything written during one loop iteration leaves in
one `transport.write`. What it implements: the connection preface, SETTINGS
(with ACK), PING, GOAWAY, RST_STREAM, WINDOW_UPDATE and flow control in both
directions, HEADERS with CONTINUATION, padding, and gRPC's length-prefixed
message framing on DATA. Server push and priorities are not used by gRPC; a
PUSH_PROMISE is a protocol error (we disable push), PRIORITY is ignored.

The gRPC call objects (server.py, client.py) sit on top as `StreamHandler`s.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

import grpc

from h2grpc import hpack
from h2grpc.compression import CompressionError, decompress
from h2grpc.frames import (
    _FRAME,
    _MESSAGE,
    _U32,
    ACK,
    CANCEL,
    COMPRESSION_ERROR,
    CONNECTION_WINDOW,
    CONTINUATION,
    DATA,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    MAX_FRAME,
    MAX_HEADER_LIST_SIZE,
    MAX_WINDOW,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    S_ENABLE_PUSH,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_CONCURRENT_STREAMS,
    S_MAX_FRAME_SIZE,
    S_MAX_HEADER_LIST_SIZE,
    SETTINGS,
    STREAM_CLOSED,
    STREAM_WINDOW,
    WINDOW_UPDATE,
    ConnectionError_,
    Stream,
    StreamHandler,
    frame,
    strip_padding,
    wake_all,
)

log = logging.getLogger("h2grpc")


class H2Connection(asyncio.Protocol):
    """The frame engine shared by `ServerConnection` and `ClientConnection`."""

    is_client = False

    def __init__(self, max_message: int) -> None:
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.max_message = max_message
        self.decoder = hpack.Decoder()
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_streams = 2**31
        # The largest header list (decoded, RFC 9113's size) we send: the
        # peer's SETTINGS_MAX_HEADER_LIST_SIZE, and never over our own limit.
        self.peer_max_header_list = MAX_HEADER_LIST_SIZE
        self.send_window = DEFAULT_WINDOW
        self.recv_unacked = 0
        self.blocked: dict[int, Stream] = {}  # streams with pending frames
        self.last_peer_stream = 0
        self.goaway_received: int | None = None
        self.goaway_sent = False
        self.closed = False
        self._inbuf = b""
        self._preface_left = 0 if self.is_client else len(PREFACE)
        self._continuation: tuple[int, int, bytearray] | None = None  # stream, flags, block
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._peername = ""
        # Why we dropped the connection ourselves, for the calls it ends.
        self.lost_reason: str | None = None

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            family = "ipv6" if ":" in str(peer[0]) else "ipv4"
            host = f"[{peer[0]}]" if family == "ipv6" else peer[0]
            self._peername = f"{family}:{host}:{peer[1]}"
        settings = [
            (S_ENABLE_PUSH, 0),
            (S_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (S_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE),
            *self.extra_settings(),
        ]
        payload = b"".join(struct.pack(">HI", key, value) for key, value in settings)
        if self.is_client:
            self.emit(PREFACE)
        self.emit(frame(SETTINGS, 0, 0, payload))
        self.emit(frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW)))

    def extra_settings(self) -> list[tuple[int, int]]:
        return []

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._inbuf:
            data = self._inbuf + data
            self._inbuf = b""
        try:
            if self._preface_left:
                data = self._take_preface(data)
            self._parse(data)
        except ConnectionError_ as exc:
            self.fail(exc.code, str(exc))
        except hpack.HPACKError as exc:
            self.fail(COMPRESSION_ERROR, str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reason = self.lost_reason or (f"connection lost: {exc}" if exc else "connection closed")
        for stream in list(self.streams.values()):
            self._drop(stream, None, reason)
        self.streams.clear()
        self._wake_drain()
        self.on_connection_lost()

    def on_connection_lost(self) -> None:
        pass

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # -- reading ----------------------------------------------------------------

    def _take_preface(self, data: bytes) -> bytes:
        want = PREFACE[len(PREFACE) - self._preface_left :]
        got = data[: len(want)]
        if not want.startswith(got):
            raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
        self._preface_left -= len(got)
        return data[len(got) :]

    def _parse(self, data: bytes) -> None:
        pos, end = 0, len(data)
        unpack = _FRAME.unpack_from
        while end - pos >= 9:
            length_kind, flags, stream_id = unpack(data, pos)
            length = length_kind >> 8
            if length > MAX_FRAME:
                raise ConnectionError_(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            if end - pos - 9 < length:
                break
            payload = data[pos + 9 : pos + 9 + length]
            pos += 9 + length
            self._frame(length_kind & 0xFF, flags, stream_id & 0x7FFFFFFF, payload)
            if self.closed:
                return
        if pos < end:
            self._inbuf = data[pos:]

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is not None and kind != CONTINUATION:
            raise ConnectionError_(PROTOCOL_ERROR, "expected CONTINUATION")
        if kind == DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._on_headers_frame(flags, stream_id, payload)
        elif kind == CONTINUATION:
            self._on_continuation(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif kind == PING:
            if stream_id or len(payload) != 8:
                raise ConnectionError_(PROTOCOL_ERROR, "malformed PING")
            if not flags & ACK:
                self.emit(frame(PING, ACK, 0, payload))
            else:
                self.on_ping_ack(payload)
        elif kind == RST_STREAM:
            if not stream_id or len(payload) != 4:
                raise ConnectionError_(PROTOCOL_ERROR, "malformed RST_STREAM")
            stream = self.streams.get(stream_id)
            if stream is not None:
                (code,) = _U32.unpack(payload)
                self._drop(stream, code, f"stream reset by peer (error code {code})")
        elif kind == GOAWAY:
            self._on_goaway(payload)
        elif kind == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "PUSH_PROMISE with push disabled")
        # PRIORITY and unknown frame types are ignored (RFC 9113 section 4.1).

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        size = len(payload)
        self.recv_unacked += size
        if self.recv_unacked >= CONNECTION_WINDOW // 2:
            self.emit(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.recv_unacked)))
            self.recv_unacked = 0
        if not stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        if flags & PADDED:
            payload = strip_padding(payload)
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            if stream_id > self.last_peer_stream and not self._is_local(stream_id):
                raise ConnectionError_(PROTOCOL_ERROR, "DATA on an idle stream")
            self.emit(frame(RST_STREAM, 0, stream_id, _U32.pack(STREAM_CLOSED)))
            return
        stream.unacked += size
        end = bool(flags & END_STREAM)
        if payload and not stream.discard:
            self._messages(stream, payload)
        if not end:
            self.window_consumed(stream)
        if end and stream.id in self.streams:
            self._remote_end(stream)

    def _messages(self, stream: Stream, payload: bytes) -> None:
        data = stream.buffer + payload if stream.buffer else payload
        pos, end = 0, len(data)
        handler = stream.handler
        while end - pos >= 5:
            compressed, length = _MESSAGE.unpack_from(data, pos)
            if length > stream.max_message:
                self._bad_message(
                    stream,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"Received message larger than max ({length} vs. {stream.max_message})",
                )
                return
            if end - pos - 5 < length:
                break
            message = data[pos + 5 : pos + 5 + length]
            pos += 5 + length
            if compressed:
                try:
                    message = decompress(message, stream.encoding, stream.max_message)
                except CompressionError as exc:
                    self._bad_message(stream, exc.code, str(exc))
                    return
            if handler is not None:
                handler.on_message(message)
            if stream.discard or stream.id not in self.streams:
                return
        stream.buffer = data[pos:] if pos < end else b""

    def window_consumed(self, stream: Stream) -> None:
        """Hand the peer back the window of what was received, unless the
        stream's reader has fallen behind (then its reads call this again):
        a reader that stops reading stops the sender within one window."""
        if stream.unacked < STREAM_WINDOW // 2 or stream.remote_closed:
            return
        handler = stream.handler
        if handler is not None and handler.backlog >= STREAM_WINDOW // 2:
            return
        if stream.id in self.streams:
            self.emit(frame(WINDOW_UPDATE, 0, stream.id, _U32.pack(stream.unacked)))
        stream.unacked = 0

    def _bad_message(self, stream: Stream, code: grpc.StatusCode, reason: str) -> None:
        """Stop reading a stream's messages; its call ends with ``code``."""
        stream.buffer = b""
        stream.discard = True
        if stream.handler is not None:
            stream.handler.on_bad_message(code, reason)

    def reset_stream(self, stream: Stream, code: int, reason: str) -> None:
        """Our side gives up on a stream (a local error); tells the peer and the handler."""
        self.emit(frame(RST_STREAM, 0, stream.id, _U32.pack(code)))
        self._drop(stream, -1, reason)

    def _on_headers_frame(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & PADDED:
            payload = strip_padding(payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if flags & END_HEADERS:
            self._headers(stream_id, flags, payload)
        else:
            self._continuation = (stream_id, flags, bytearray(payload))

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is None or self._continuation[0] != stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "unexpected CONTINUATION")
        block = self._continuation[2]
        block += payload
        if len(block) > MAX_HEADER_LIST_SIZE:
            raise ConnectionError_(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            first_flags = self._continuation[1]
            self._continuation = None
            self._headers(stream_id, first_flags, bytes(block))

    def _headers(self, stream_id: int, flags: int, block: bytes) -> None:
        headers = self.decoder.decode(block)  # always, to keep the table in step
        end_stream = bool(flags & END_STREAM)
        stream = self.streams.get(stream_id)
        if stream is None:
            if not self.is_client and stream_id % 2 == 0:
                raise ConnectionError_(PROTOCOL_ERROR, f"client stream with even id {stream_id}")
            if self._is_local(stream_id) or stream_id <= self.last_peer_stream:
                # A late frame for a stream we already closed.
                self.emit(frame(RST_STREAM, 0, stream_id, _U32.pack(STREAM_CLOSED)))
                return
            self.last_peer_stream = stream_id
            self.new_stream(stream_id, headers, end_stream)
            return
        if stream.handler is not None:
            stream.handler.on_headers(headers, end_stream)
        if end_stream and stream.id in self.streams:
            self._remote_end(stream)

    def new_stream(self, stream_id: int, headers: list[tuple[str, str]], end_stream: bool) -> None:
        """A peer-initiated stream; only servers accept them."""
        raise ConnectionError_(PROTOCOL_ERROR, "server-initiated stream")

    def _is_local(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self.is_client

    def _remote_end(self, stream: Stream) -> None:
        stream.remote_closed = True
        if stream.buffer:
            stream.buffer = b""
            self.reset_stream(stream, PROTOCOL_ERROR, "stream ended inside a message")
            return
        handler = stream.handler
        if stream.local_closed:
            self._forget(stream)
        if handler is not None:
            handler.on_end()

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "connection window overflow")
            self._unblock_all()
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if not increment:
            self.reset_stream(stream, PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self.reset_stream(stream, FLOW_CONTROL_ERROR, "stream window overflow")
            return
        if stream.pending:
            self._send_pending(stream)

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, "malformed SETTINGS")
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == S_MAX_FRAME_SIZE:
                if not MAX_FRAME <= value <= 16_777_215:
                    raise ConnectionError_(PROTOCOL_ERROR, "invalid max frame size")
                # We never send frames above 16 KiB: that is what every peer accepts.
            elif key == S_MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
            elif key == S_MAX_HEADER_LIST_SIZE:
                self.peer_max_header_list = min(value, MAX_HEADER_LIST_SIZE)
            elif key == S_ENABLE_PUSH and value > 1:
                raise ConnectionError_(PROTOCOL_ERROR, "invalid ENABLE_PUSH")
        self.emit(frame(SETTINGS, ACK, 0))
        self._unblock_all()
        self.on_settings()

    def on_settings(self) -> None:
        pass

    def _on_goaway(self, payload: bytes) -> None:
        if len(payload) < 8:
            raise ConnectionError_(FRAME_SIZE_ERROR, "malformed GOAWAY")
        last, code = struct.unpack_from(">II", payload)
        last &= 0x7FFFFFFF
        self.goaway_received = last
        debug = payload[8:].decode("utf-8", "replace")
        if code != NO_ERROR:
            # A connection error on the peer's side: nothing more will be
            # answered here, so end every call now rather than at its deadline.
            log.warning("peer %s sent GOAWAY (error code %d): %s", self._peername, code, debug)
            self.lost_reason = f"the peer ended the connection (GOAWAY {code}: {debug})"
            self.on_goaway()
            if self.transport is not None:
                self.transport.abort()
            return
        for stream in list(self.streams.values()):
            if self._is_local(stream.id) and stream.id > last:
                self._drop(stream, REFUSED_STREAM, "the peer is going away (GOAWAY)")
        self.on_goaway()

    def on_goaway(self) -> None:
        pass

    def on_ping_ack(self, payload: bytes) -> None:
        pass

    # -- writing ----------------------------------------------------------------

    def emit(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.transport is None or self.transport.is_closing():
            self._out.clear()
            return
        out = self._out
        self._out = []
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def send_headers(self, stream: Stream, block: bytes, end_stream: bool) -> None:
        """HEADERS (split into CONTINUATION frames if needed), after any queued DATA."""
        if stream.pending:
            stream.pending.append((HEADERS, block, end_stream))
            return
        self._emit_headers(stream, block, end_stream)

    def _emit_headers(self, stream: Stream, block: bytes, end_stream: bool) -> None:
        flags = END_STREAM if end_stream else 0
        if len(block) <= MAX_FRAME:
            self.emit(frame(HEADERS, flags | END_HEADERS, stream.id, block))
        else:
            chunks = [block[i : i + MAX_FRAME] for i in range(0, len(block), MAX_FRAME)]
            self.emit(frame(HEADERS, flags, stream.id, chunks[0]))
            for chunk in chunks[1:-1]:
                self.emit(frame(CONTINUATION, 0, stream.id, chunk))
            self.emit(frame(CONTINUATION, END_HEADERS, stream.id, chunks[-1]))
        if end_stream:
            self._local_end(stream)

    def send_data(self, stream: Stream, data: bytes, end_stream: bool) -> bool:
        """Queue DATA; True when it all left at once (within the flow-control windows)."""
        size = len(data)
        if (
            not stream.pending
            and size <= MAX_FRAME
            and size <= stream.send_window
            and size <= self.send_window
        ):
            stream.send_window -= size
            self.send_window -= size
            self.emit(frame(DATA, END_STREAM if end_stream else 0, stream.id, data))
            if end_stream:
                self._local_end(stream)
            return True
        stream.pending.append((DATA, data, end_stream))
        self._send_pending(stream)
        return not stream.pending

    def wait_sent(self, stream: Stream) -> asyncio.Future[None]:
        """A future done when the stream's queued frames have left (or the stream died)."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        if not stream.pending or stream.id not in self.streams:
            waiter.set_result(None)
        else:
            stream.waiters.append(waiter)
        return waiter

    def _send_pending(self, stream: Stream) -> None:
        pending = stream.pending
        while pending:
            kind, data, end_stream = pending[0]
            if kind == HEADERS:
                pending.popleft()
                self._emit_headers(stream, data, end_stream)
                continue
            allowed = min(stream.send_window, self.send_window, MAX_FRAME)
            if allowed <= 0 and data:
                self.blocked[stream.id] = stream
                return
            chunk, rest = data[:allowed], data[allowed:]
            stream.send_window -= len(chunk)
            self.send_window -= len(chunk)
            last = not rest
            self.emit(frame(DATA, END_STREAM if end_stream and last else 0, stream.id, chunk))
            if last:
                pending.popleft()
                if end_stream:
                    self._local_end(stream)
            else:
                pending[0] = (kind, rest, end_stream)
        self.blocked.pop(stream.id, None)
        waiters, stream.waiters = stream.waiters, []
        wake_all(waiters)

    def _unblock_all(self) -> None:
        for stream in list(self.blocked.values()):
            if self.send_window <= 0:
                return
            self._send_pending(stream)

    def _local_end(self, stream: Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            self._forget(stream)

    async def drain(self) -> None:
        """Wait while the transport's buffer is over its high-water mark."""
        if self._write_paused and not self.closed:
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _wake_drain(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        wake_all(waiters)

    # -- stream and connection ends ------------------------------------------------

    def open_stream(self, stream_id: int, handler: StreamHandler) -> Stream:
        stream = Stream(stream_id, self.peer_initial_window, self.max_message)
        stream.handler = handler
        self.streams[stream_id] = stream
        return stream

    def cancel_stream(self, stream: Stream, code: int = CANCEL) -> None:
        """Our side ends a stream abruptly (RST_STREAM); the handler is not told."""
        if stream.id in self.streams:
            self.emit(frame(RST_STREAM, 0, stream.id, _U32.pack(code)))
            self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        # Also drops the stream's reference to its call: call and stream would
        # otherwise form a cycle that only the garbage collector frees, and
        # collecting thousands of them at once stalls the loop.
        stream.handler = None
        self.streams.pop(stream.id, None)
        self.blocked.pop(stream.id, None)
        stream.pending.clear()
        waiters, stream.waiters = stream.waiters, []
        wake_all(waiters)

    def _drop(self, stream: Stream, code: int | None, reason: str) -> None:
        handler = stream.handler
        self._forget(stream)
        if handler is not None:
            handler.on_reset(code, reason)

    def fail(self, code: int, message: str) -> None:
        """A connection error: GOAWAY with the reason, then close."""
        log.warning("HTTP/2 connection error with %s: %s", self._peername or "peer", message)
        self.goaway(code, message)
        if self.transport is not None:
            self._flush()
            self.transport.close()
        self.closed = True

    def goaway(self, code: int = NO_ERROR, message: str = "") -> None:
        if self.goaway_sent:
            return
        self.goaway_sent = True
        payload = struct.pack(">II", self.last_peer_stream, code) + message.encode()[:256]
        self.emit(frame(GOAWAY, 0, 0, payload))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.transport.close()

    @property
    def peer(self) -> str:
        return self._peername
