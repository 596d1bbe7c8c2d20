"""HTTP/1.1 on asyncio streams: reading requests, encoding responses.

Only what a JSON API needs: request heads up to a size limit, bodies framed by
``Content-Length`` or ``Transfer-Encoding: chunked`` up to a size limit,
``Expect: 100-continue``, keep-alive (HTTP/1.1 by default, HTTP/1.0 on
request). Anything malformed raises `HttpError` with the status to answer;
``close`` tells the server the connection cannot be reused because the
request's framing is broken.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import urlsplit

import grpc

Headers = tuple[tuple[str, str], ...]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/(\d)\.(\d)")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_HEX = re.compile(r"[0-9A-Fa-f]{1,15}")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_MAX_TRAILERS = 100


class HttpError(Exception):
    """A request answered with ``status`` and ``message`` instead of being handled.

    ``code`` is the gRPC status of the same meaning (for the JSON error body);
    ``close`` means the connection must close after the response.
    """

    def __init__(
        self,
        status: int,
        message: str,
        code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
        *,
        headers: Headers = (),
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers
        self.close = close


def _malformed(message: str) -> HttpError:
    return HttpError(400, message, close=True)


@dataclass(frozen=True, slots=True)
class RequestHead:
    """Request line and headers; header names are lower case, in arrival order."""

    method: str
    target: str
    version: str
    headers: Headers

    def get(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    @property
    def path(self) -> str:
        """The raw (still percent-encoded) path of the target."""
        if self.target.startswith("/"):
            return self.target.partition("?")[0]
        return urlsplit(self.target).path or "/"

    @property
    def query(self) -> str:
        if self.target.startswith("/"):
            return self.target.partition("?")[2]
        return urlsplit(self.target).query

    @property
    def keep_alive(self) -> bool:
        """Whether the client lets the connection serve another request."""
        tokens = {t.strip().lower() for v in self.get_all("connection") for t in v.split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


@dataclass(frozen=True, slots=True)
class Request:
    head: RequestHead
    body: bytes


@dataclass(frozen=True, slots=True)
class Response:
    """What the server writes back; ``close`` ends the connection after it."""

    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: Headers = ()
    close: bool = False


async def read_head(reader: asyncio.StreamReader) -> RequestHead | None:
    """The next request head, or None when the client closed the connection
    between requests. The reader's limit bounds the head's size (431 beyond)."""
    while True:
        try:
            data = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None  # closed between requests, or gone half-way: nobody to answer
        except asyncio.LimitOverrunError:
            raise HttpError(
                431,
                "the request line and headers are too large",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                close=True,
            ) from None
        # Empty lines before a request line are to be ignored (RFC 9112, 2.2).
        text = data.decode("latin-1").lstrip("\r\n")
        if text:
            return _parse_head(text[:-4].split("\r\n"))


def _parse_head(lines: list[str]) -> RequestHead:
    method, target, version = _request_line(lines[0])
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            raise _malformed("obsolete header line folding is not accepted")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise _malformed(f"malformed header line {line[:100]!r}")
        value = value.strip(" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise _malformed(f"header {name} has control characters in its value")
        headers.append((name.lower(), value))
    return RequestHead(method, target, version, tuple(headers))


def _request_line(line: str) -> tuple[str, str, str]:
    parts = line.split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise _malformed(f"malformed request line {line[:100]!r}")
    method, target, version = parts
    match = _VERSION.fullmatch(version)
    if match is None:
        raise _malformed(f"malformed request line {line[:100]!r}")
    if match.group(1) != "1":
        raise HttpError(
            505, f"{version} is not supported", grpc.StatusCode.UNIMPLEMENTED, close=True
        )
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in target):
        raise _malformed("the request target has control characters")
    return method, target, "HTTP/1.0" if match.group(2) == "0" else "HTTP/1.1"


async def read_body(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    head: RequestHead,
    max_size: int,
) -> bytes:
    """The request's body (empty when it has none), at most ``max_size`` bytes
    (413 beyond). Sends ``100 Continue`` first when the client waits for it."""
    codings = [t.strip().lower() for v in head.get_all("transfer-encoding") for t in v.split(",")]
    lengths = {t.strip() for v in head.get_all("content-length") for t in v.split(",")}
    if codings and lengths:
        raise _malformed("a request cannot have both Content-Length and Transfer-Encoding")
    if codings:
        if codings != ["chunked"]:
            raise HttpError(
                501,
                f"transfer coding {', '.join(codings)} is not supported (only chunked)",
                grpc.StatusCode.UNIMPLEMENTED,
                close=True,
            )
        await _send_continue(writer, head)
        return await _read_chunked(reader, max_size)
    if not lengths:
        return b""
    length = lengths.pop()
    if lengths or not length.isdigit() or len(length) > 18:
        raise _malformed("invalid Content-Length")
    if int(length) > max_size:
        raise _too_large(max_size)
    if int(length) == 0:
        return b""
    await _send_continue(writer, head)
    return await reader.readexactly(int(length))


def _too_large(max_size: int) -> HttpError:
    return HttpError(
        413,
        f"the request body is larger than {max_size} bytes",
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        close=True,
    )


async def _send_continue(writer: asyncio.StreamWriter, head: RequestHead) -> None:
    expect = (head.get("expect") or "").strip().lower()
    if expect == "100-continue" and head.version == "HTTP/1.1":
        writer.write(_CONTINUE)
        await writer.drain()


async def _read_chunked(reader: asyncio.StreamReader, max_size: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        size_text = (await _line(reader)).split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size_text.decode("latin-1")):
            raise _malformed("invalid chunk size")
        size = int(size_text, 16)
        if size == 0:
            break
        total += size
        if total > max_size:
            raise _too_large(max_size)
        chunks.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise _malformed("a chunk does not end with CRLF")
    for _ in range(_MAX_TRAILERS + 1):  # trailer fields: read and ignored
        if not await _line(reader):
            return b"".join(chunks)
    raise _malformed("too many trailer fields")


async def _line(reader: asyncio.StreamReader) -> bytes:
    """One CRLF-terminated line without its CRLF, bounded by the reader's limit."""
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError:
        raise _malformed("a chunk line is too long") from None
    return line[:-2]


def encode_response(response: Response, head: RequestHead | None, keep_alive: bool) -> bytes:
    """Status line, headers and body. ``keep_alive`` False adds
    ``Connection: close``; an HTTP/1.0 client that asked to keep the
    connection gets ``Connection: keep-alive``."""
    lines = [
        f"HTTP/1.1 {response.status} {_phrase(response.status)}",
        f"Date: {formatdate(usegmt=True)}",
    ]
    if response.content_type is not None:
        lines.append(f"Content-Type: {response.content_type}")
    lines.append(f"Content-Length: {len(response.body)}")
    if not keep_alive:
        lines.append("Connection: close")
    elif head is not None and head.version == "HTTP/1.0":
        lines.append("Connection: keep-alive")
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
