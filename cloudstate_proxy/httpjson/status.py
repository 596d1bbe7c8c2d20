"""How failures reach HTTP/JSON clients: `error_response` is the one place
where errors become HTTP statuses.

gRPC codes map as in Google's HTTP APIs and grpc-gateway, with one Cloudstate
rule: a user failure (UNKNOWN) is ``500`` with the failure's description as a
``text/plain`` body, exactly as a Cloudstate proxy answers it. Every other
error has a JSON body ``{"code": <HTTP status>, "status": "<gRPC code
name>", "message": "..."}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import grpc

from ..errors import ProxyError
from .http1 import Headers, HttpError, Response

_C = grpc.StatusCode
HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    _C.OK: 200,
    _C.CANCELLED: 499,
    _C.UNKNOWN: 500,
    _C.INVALID_ARGUMENT: 400,
    _C.DEADLINE_EXCEEDED: 504,
    _C.NOT_FOUND: 404,
    _C.ALREADY_EXISTS: 409,
    _C.PERMISSION_DENIED: 403,
    _C.RESOURCE_EXHAUSTED: 429,
    # As Google's APIs and grpc-gateway do; 412 is about HTTP conditional headers.
    _C.FAILED_PRECONDITION: 400,
    _C.ABORTED: 409,
    _C.OUT_OF_RANGE: 400,
    _C.UNIMPLEMENTED: 501,
    _C.INTERNAL: 500,
    _C.UNAVAILABLE: 503,
    _C.DATA_LOSS: 500,
    _C.UNAUTHENTICATED: 401,
}
INTERNAL_MESSAGE = "internal error in the proxy (see the proxy's log)"
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


def error_response(error: BaseException) -> Response:
    """The response for ``error``: an `HttpError` (the HTTP layer's own: bad
    framing, no route, bad JSON), a `ProxyError` (its gRPC code mapped by
    `HTTP_STATUS`), or anything else (a bug: 500 without details)."""
    headers: Headers = ()
    close = False
    if isinstance(error, HttpError):
        status, code, message = error.status, error.code, error.message
        headers, close = error.headers, error.close
    elif isinstance(error, ProxyError):
        code, message = error.code, error.message
        status = HTTP_STATUS.get(code, 500)
    else:
        status, code, message = 500, _C.INTERNAL, INTERNAL_MESSAGE
    if code == _C.UNKNOWN:
        return Response(status, message.encode(), TEXT, headers, close)
    body = {"code": status, "status": code.name, "message": message}
    return Response(status, json.dumps(body).encode(), JSON, headers, close)
