"""The HTTP/JSON API of the user's services: requests in, commands to the
router, replies out.

Each request is matched to a route, its message built from JSON, path and
query (`transcode`), and sent to the same `Router` as the gRPC front door's
calls (the entity manager, or the cluster router): keys, routing, forwarding,
deadlines and errors behave exactly as over gRPC. Only the time-travel
headers (``cloudstate-as-of-seq`` / ``cloudstate-as-of-time``) become command
metadata; ``X-Request-Timeout: <seconds>`` sets the deadline (none by default,
as a gRPC call without one). The reply's metadata comes back as response
headers (``-bin`` values base64-encoded).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import re

import grpc

from ..entity.asof import AS_OF_SEQ, AS_OF_TIME, split_as_of
from ..entity.model import CommandReply, EntityCommand, Metadata, Payload, Router
from ..errors import Internal, InvalidArgument, ProxyError
from ..registry import MethodInfo, ServiceRegistry
from .http1 import Headers, HttpError, Request, Response
from .routes import RouteTable, build_routes
from .status import JSON, error_response
from .transcode import build_request, render_reply

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-request-timeout"
_HEADER_NAME = re.compile(r"[0-9a-z!#$%&'*+\-.^_`|~]+")
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")
# Reply metadata never overrides the response's own framing headers.
_RESERVED = frozenset(
    {
        "content-type",
        "content-length",
        "connection",
        "date",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "host",
        "allow",
    }
)


class HttpJsonGateway:
    """Serves HTTP requests for the routes of ``registry`` through ``router``."""

    def __init__(self, registry: ServiceRegistry, router: Router) -> None:
        self._routes = build_routes(registry)
        self._pool = registry.pool
        self._router = router

    @property
    def routes(self) -> RouteTable:
        return self._routes

    async def handle(self, request: Request) -> Response:
        """The response to ``request``; every failure becomes an error
        response (see `status.error_response`), none escapes."""
        try:
            return await self._call(request)
        except Exception as exc:
            _log_failure(request, exc)
            return error_response(exc)

    async def _call(self, request: Request) -> Response:
        head = request.head
        match = self._routes.match(head.method, head.path)
        route = match.route
        data = build_request(route, match.variables, head.query, request.body, self._pool)
        info = route.info
        # The as-of headers make the call a read-only query of a past state.
        metadata, as_of = split_as_of(_as_of_metadata(head.headers))
        command = EntityCommand(
            service=info.service,
            method=info.name,
            entity_id=info.entity_id(data),
            payload=Payload(info.input_type_url, data),
            metadata=metadata,
            deadline=_deadline(head.get(TIMEOUT_HEADER)),
            as_of=as_of,
        )
        reply = await self._router.route(command)
        _check_reply_type(info, reply)
        body = render_reply(route, reply.payload.value, self._pool)
        return Response(200, body, JSON, _reply_headers(reply.metadata))


def _as_of_metadata(headers: Headers) -> Metadata:
    return tuple((key, value) for key, value in headers if key in (AS_OF_SEQ, AS_OF_TIME))


def _deadline(text: str | None) -> float | None:
    """The loop-clock deadline of an ``X-Request-Timeout`` in seconds, or None."""
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise InvalidArgument(
            f"X-Request-Timeout must be a positive number of seconds, got {text!r}"
        )
    return asyncio.get_running_loop().time() + seconds


def _check_reply_type(info: MethodInfo, reply: CommandReply) -> None:
    """The reply must be the method's output type (an empty payload is its
    default value); anything else would be rendered as the wrong message."""
    type_url = reply.payload.type_url
    if type_url.rpartition("/")[2] == info.output_type.full_name:
        return
    if not type_url and not reply.payload.value:
        return
    raise Internal(
        f"the user function replied to {info.service}/{info.name} with {type_url or 'no type'}, "
        f"but the method returns {info.output_type.full_name}"
    )


def _reply_headers(metadata: Metadata) -> Headers:
    """Reply metadata that can travel as response headers; the rest is
    dropped with a warning."""
    headers: list[tuple[str, str]] = []
    for key, value in metadata:
        name = key.lower()
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        if (
            not _HEADER_NAME.fullmatch(name)
            or name in _RESERVED
            or not _HEADER_VALUE.fullmatch(value)
        ):
            log.warning("dropping reply metadata %r: not a valid response header", key)
            continue
        headers.append((name, value))
    return tuple(headers)


def _log_failure(request: Request, error: Exception) -> None:
    what = f"{request.head.method} {request.head.path}"
    if isinstance(error, HttpError):
        log.debug("%s: %d %s", what, error.status, error.message)
    elif not isinstance(error, ProxyError):
        log.error("unexpected error serving %s", what, exc_info=error)
    elif error.code == grpc.StatusCode.INTERNAL:
        log.error("internal error serving %s: %s", what, error.message)
    else:
        log.debug("%s: %s: %s", what, error.code.name, error.message)
