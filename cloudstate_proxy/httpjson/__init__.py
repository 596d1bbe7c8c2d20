"""HTTP/JSON transcoding of the user's services, on a port of its own.

- `HttpJsonServer` (server.py): the HTTP/1.1 server and its lifecycle;
- `HttpJsonGateway` (gateway.py): request -> command for the router -> JSON reply;
- routes.py / template.py: ``google.api.http`` rules and their path templates;
- transcode.py / fields.py: JSON, path and query <-> protobuf messages;
- status.py: the one mapping of errors to HTTP statuses;
- http1.py: the wire format; options.py: the server's settings.
"""

from __future__ import annotations

from .gateway import HttpJsonGateway
from .options import HttpJsonOptions
from .routes import Route, RouteTable, build_routes
from .server import HttpJsonServer
from .status import HTTP_STATUS, error_response
from .template import PathTemplate, TemplateError, parse_template

__all__ = [
    "HTTP_STATUS",
    "HttpJsonGateway",
    "HttpJsonOptions",
    "HttpJsonServer",
    "PathTemplate",
    "Route",
    "RouteTable",
    "TemplateError",
    "build_routes",
    "error_response",
    "parse_template",
]
