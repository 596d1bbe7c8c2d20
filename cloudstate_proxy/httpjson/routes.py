"""The HTTP routes of the user's services, from their ``google.api.http`` rules.

Every binding of a method's rule (the rule itself and its
``additional_bindings``) becomes a `Route`: an HTTP method, a path template,
the field the body fills (``*`` for the whole request, a field path, or none)
and the response field the reply shows (``response_body``, or the whole reply).
A method without a rule gets the generic route ``POST /<service>/<method>``
with the whole request as its JSON body.

Bindings that cannot be served (a malformed template, a variable naming a
field that does not exist or cannot be set from text, an unknown body or
response field) are logged and left out: the method stays reachable over gRPC.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

from ..registry import MethodInfo, ServiceRegistry
from .fields import is_repeated, resolve, settable_by_parameter
from .http1 import HttpError
from .template import FieldPath, PathTemplate, TemplateError, parse_template

log = logging.getLogger(__name__)

WHOLE = "*"
_PATTERNS = ("get", "put", "post", "delete", "patch")


@dataclass(frozen=True, slots=True)
class Route:
    """One HTTP binding of a method.

    ``body``: ``""`` (no body; other fields come from the query), ``"*"`` (the
    whole request message) or a field path of the request. ``response_body``:
    ``""`` (the whole reply) or a field path of the reply. ``variables`` maps
    each path variable to the fields along its path.
    """

    verb: str
    template: PathTemplate
    info: MethodInfo
    body: str = ""
    response_body: str = ""
    variables: Mapping[FieldPath, tuple[FieldDescriptor, ...]] = field(default_factory=dict)
    body_fields: tuple[FieldDescriptor, ...] = ()
    response_fields: tuple[FieldDescriptor, ...] = ()

    def __str__(self) -> str:
        return f"{self.verb} {self.template.text} -> {self.info.service}/{self.info.name}"


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    variables: Mapping[FieldPath, str]


class RouteTable:
    """Finds the route of a request: the most specific template (most literal
    segments, then without ``**``) matching the path with the request's method."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes = sorted(routes, key=lambda r: r.template.specificity)

    @property
    def routes(self) -> Sequence[Route]:
        return tuple(self._routes)

    def match(self, verb: str, path: str) -> RouteMatch:
        """The route for ``verb`` and the raw ``path``; `HttpError` 404 when no
        template matches the path, 405 (with ``Allow``) when none for this method."""
        allowed: list[str] = []
        for route in self._routes:
            variables = route.template.match(path)
            if variables is None:
                continue
            if route.verb == verb:
                return RouteMatch(route, variables)
            if route.verb not in allowed:
                allowed.append(route.verb)
        if allowed:
            raise HttpError(
                405,
                f"{verb} is not allowed on {path} (allowed: {', '.join(allowed)})",
                grpc.StatusCode.UNIMPLEMENTED,
                headers=(("Allow", ", ".join(allowed)),),
            )
        raise HttpError(404, f"no route for {verb} {path}", grpc.StatusCode.NOT_FOUND)


def build_routes(registry: ServiceRegistry) -> RouteTable:
    """The routes of every method of every entity service in ``registry``."""
    rules = dict(_http_rules(registry.file_descriptor_set))
    routes: list[Route] = []
    seen: set[tuple[str, str]] = set()
    for service in registry.services.values():
        for info in service.methods.values():
            rule = rules.get(f"{info.service}/{info.name}")
            bindings = _bindings(rule) if rule is not None else [_generic(info)]
            for binding in bindings:
                route = _route(info, binding)
                if route is None:
                    continue
                if (route.verb, route.template.text) in seen:
                    log.warning("HTTP/JSON: %s is bound twice; keeping the first", route)
                    continue
                seen.add((route.verb, route.template.text))
                routes.append(route)
    return RouteTable(routes)


def _http_rules(
    files: descriptor_pb2.FileDescriptorSet,
) -> Iterator[tuple[str, http_pb2.HttpRule]]:
    """``service/method`` and its ``google.api.http`` rule, for annotated methods."""
    for file in files.file:
        prefix = f"{file.package}." if file.package else ""
        for service in file.service:
            for method in service.method:
                # Parsed again so the extension is recognised whether or not
                # google.api.annotations was imported when the spec was read.
                options = descriptor_pb2.MethodOptions.FromString(
                    method.options.SerializeToString()
                )
                if options.HasExtension(annotations_pb2.http):
                    rule = options.Extensions[annotations_pb2.http]
                    yield f"{prefix}{service.name}/{method.name}", rule


def _bindings(rule: http_pb2.HttpRule) -> list[http_pb2.HttpRule]:
    return [rule, *rule.additional_bindings]


def _generic(info: MethodInfo) -> http_pb2.HttpRule:
    return http_pb2.HttpRule(post=f"/{info.service}/{info.name}", body=WHOLE)


def _route(info: MethodInfo, binding: http_pb2.HttpRule) -> Route | None:
    """The route of one binding, or None (logged) when it cannot be served."""
    where = f"HTTP/JSON rule of {info.service}/{info.name}"
    try:
        verb, path = _pattern(binding)
        template = parse_template(path)
        variables = {v.field_path: _variable(info, v.field_path) for v in template.variables}
        body_fields: tuple[FieldDescriptor, ...] = ()
        if binding.body and binding.body != WHOLE:
            body_fields = tuple(resolve(info.input_type, binding.body.split(".")))
        response_fields: tuple[FieldDescriptor, ...] = ()
        if binding.response_body:
            response_fields = tuple(resolve(info.output_type, binding.response_body.split(".")))
    except (TemplateError, KeyError, ValueError) as exc:
        log.warning("%s is not served: %s", where, exc.args[0] if exc.args else exc)
        return None
    return Route(
        verb,
        template,
        info,
        binding.body,
        binding.response_body,
        variables,
        body_fields,
        response_fields,
    )


def _pattern(binding: http_pb2.HttpRule) -> tuple[str, str]:
    kind = binding.WhichOneof("pattern")
    if kind in _PATTERNS:
        return kind.upper(), str(getattr(binding, kind))
    if kind == "custom" and binding.custom.kind and binding.custom.path:
        return binding.custom.kind, binding.custom.path
    raise ValueError("it has no HTTP method and path")


def _variable(info: MethodInfo, path: FieldPath) -> tuple[FieldDescriptor, ...]:
    fields = resolve(info.input_type, path)
    last = fields[-1]
    if is_repeated(last) or not settable_by_parameter(last):
        raise ValueError(
            f"path variable {'.'.join(path)} must name a singular scalar, enum or "
            "well-known string-form field"
        )
    return tuple(fields)
