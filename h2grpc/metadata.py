"""gRPC-over-HTTP/2 header conventions: metadata, timeouts, status messages."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from urllib.parse import quote, unquote

import grpc

# Re-exported: the limit `header_list_size` is checked against (HPACK lets a
# small block reference large table entries many times over, so the decoded
# size is checked too, not only the block's).
from h2grpc.frames import MAX_HEADER_LIST_SIZE as MAX_HEADER_LIST_SIZE

MetadataPairs = tuple[tuple[str, str | bytes], ...]

# Headers that belong to the transport, never to the application's metadata.
RESERVED = frozenset(
    {
        "content-type",
        "te",
        "grpc-timeout",
        "grpc-encoding",
        "grpc-accept-encoding",
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
    }
)

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def header_list_size(headers: Iterable[tuple[str, str]]) -> int:
    return sum(32 + len(name) + len(value) for name, value in headers)


def to_metadata(headers: Iterable[tuple[str, str]]) -> MetadataPairs:
    """Application metadata from decoded headers (binary values base64-decoded)."""
    out: list[tuple[str, str | bytes]] = []
    for name, value in headers:
        if name[0] == ":" or name in RESERVED:
            continue
        if name.endswith("-bin"):
            out.append((name, _b64decode(value)))
        else:
            out.append((name, value))
    return tuple(out)


def from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> list[tuple[str, str]]:
    """Header fields for application metadata; raises ValueError on a bad key or value."""
    out: list[tuple[str, str]] = []
    for key, value in metadata or ():
        name = key.lower()
        if not name or name[0] == ":" or name in RESERVED:
            raise ValueError(f"metadata key {key!r} is reserved or empty")
        if name.endswith("-bin"):
            raw = value if isinstance(value, bytes) else value.encode()
            out.append((name, base64.b64encode(raw).decode("ascii").rstrip("=")))
        elif isinstance(value, bytes):
            raise ValueError(f"metadata {key!r} needs a str value (only -bin keys take bytes)")
        else:
            if any(not 0x20 <= ord(c) <= 0x7E for c in value):
                raise ValueError(f"metadata {key!r} has characters outside printable ASCII")
            out.append((name, value))
    return out


def _b64decode(value: str) -> bytes:
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        return value.encode("latin-1")


DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024


def message_limit(option: object) -> int:
    """A ``grpc.max_*_message_length`` option's value in bytes (None: the
    default 4 MiB, negative: unlimited)."""
    if option is None:
        return DEFAULT_MAX_MESSAGE
    limit = int(option)  # type: ignore[call-overload]
    return limit if limit >= 0 else 2**31 - 1


def parse_timeout(value: str) -> float | None:
    """Seconds from a grpc-timeout value ("100m", "5S"); None if malformed."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _UNITS.get(value[-1])
    return None if unit is None else int(value[:-1]) * unit


def format_timeout(seconds: float) -> str:
    """The most precise grpc-timeout with at most eight digits."""
    seconds = max(seconds, 0.0)
    for unit, scale in (("n", 1e-9), ("u", 1e-6), ("m", 1e-3), ("S", 1.0), ("M", 60.0)):
        amount = int(seconds / scale + 0.999)
        if amount < 100_000_000:
            return f"{amount}{unit}"
    return f"{min(int(seconds / 3600.0 + 0.999), 99_999_999)}H"


def encode_message(details: str) -> str:
    """Percent-encode grpc-message (everything outside printable ASCII, and '%')."""
    return quote(
        details,
        safe=" !\"#$&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        "[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~",
    )


def decode_message(value: str) -> str:
    return unquote(value, errors="replace")


def status_code(value: str | None) -> grpc.StatusCode:
    if value is None or not value.isdigit():
        return grpc.StatusCode.UNKNOWN
    return _CODES.get(int(value), grpc.StatusCode.UNKNOWN)


def status_headers(
    code: grpc.StatusCode, details: str | None, metadata: MetadataPairs | None
) -> list[tuple[str, str]]:
    headers = [("grpc-status", str(code.value[0]))]
    if details:
        headers.append(("grpc-message", encode_message(details)))
    if metadata:
        headers.extend(from_metadata(metadata))
    return headers
