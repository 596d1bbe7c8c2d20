"""gRPC message compression, receiving side: ``gzip`` and ``deflate``.

h2grpc never compresses what it sends (identity is always acceptable), but
it accepts compressed messages from peers that announce the encoding in
``grpc-encoding``, as gRPC clients configured with compression do. The
inflated size is bounded by the same limit as any message, so a small
compressed message cannot inflate without limit.
"""

from __future__ import annotations

import zlib

import grpc

# What we tell peers (grpc-accept-encoding) and accept from them.
ACCEPTED = ("identity", "deflate", "gzip")
ACCEPT_ENCODING = ", ".join(ACCEPTED)

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class CompressionError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def decompress(message: bytes, encoding: str, limit: int) -> bytes:
    """``message`` inflated; `CompressionError` for an unknown encoding, bad
    data, or more than ``limit`` bytes."""
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise CompressionError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"Received a message compressed with {encoding!r}; "
            f"supported encodings: {ACCEPT_ENCODING}",
        )
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(message, limit + 1)
    except zlib.error as exc:
        raise CompressionError(
            grpc.StatusCode.INTERNAL, f"Received a message that does not inflate: {exc}"
        ) from None
    if len(data) > limit:
        raise CompressionError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"Received message larger than max (over {limit} bytes once inflated)",
        )
    return data
