"""Prometheus metrics of the proxy, served as text on ``--metrics-port``.

`Metrics` counts what the front door answers (by service, method and gRPC
status) and how long it took; gauges (live entities, running side effects,
journal batching) are read from their components when scraped. `MetricsServer`
answers ``GET /metrics`` in the Prometheus text format (version 0.0.4) from a
small HTTP/1.1 server on its own port, so scrapes never compete with clients.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the command latency histogram's buckets.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Gauge:
    """A value read at scrape time."""

    name: str
    help: str
    read: Callable[[], float]
    kind: str = "gauge"  # or "counter", for totals kept by other components


class _Histogram:
    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0


class Metrics:
    """What the front door observed. Cheap to update: a few dict operations."""

    def __init__(self) -> None:
        self._commands: dict[tuple[str, str, str], int] = {}
        self._latency: dict[tuple[str, str], _Histogram] = {}
        self._gauges: list[Gauge] = []

    def command_finished(self, service: str, method: str, status: str, seconds: float) -> None:
        key = (service, method, status)
        self._commands[key] = self._commands.get(key, 0) + 1
        histogram = self._latency.get((service, method))
        if histogram is None:
            histogram = self._latency[(service, method)] = _Histogram()
        histogram.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        histogram.count += 1
        histogram.sum += seconds

    def add_gauges(self, gauges: Iterable[Gauge]) -> None:
        self._gauges.extend(gauges)

    def commands(self, service: str, method: str, status: str) -> int:
        return self._commands.get((service, method, status), 0)

    def render(self) -> str:
        lines = [
            "# HELP cloudstate_proxy_commands_total Commands answered, by gRPC status.",
            "# TYPE cloudstate_proxy_commands_total counter",
        ]
        for (service, method, status), count in sorted(self._commands.items()):
            labels = _labels(service=service, method=method, status=status)
            lines.append(f"cloudstate_proxy_commands_total{labels} {count}")
        lines += [
            "# HELP cloudstate_proxy_command_seconds Time from a command's arrival to its answer.",
            "# TYPE cloudstate_proxy_command_seconds histogram",
        ]
        for (service, method), histogram in sorted(self._latency.items()):
            cumulative = 0
            for bound, count in zip((*BUCKETS, None), histogram.counts, strict=True):
                cumulative += count
                le = "+Inf" if bound is None else f"{bound:g}"
                labels = _labels(service=service, method=method, le=le)
                lines.append(f"cloudstate_proxy_command_seconds_bucket{labels} {cumulative}")
            labels = _labels(service=service, method=method)
            lines.append(f"cloudstate_proxy_command_seconds_sum{labels} {histogram.sum:.6f}")
            lines.append(f"cloudstate_proxy_command_seconds_count{labels} {histogram.count}")
        for gauge in self._gauges:
            try:
                value = float(gauge.read())
            except Exception:  # a component that is gone: leave the gauge out
                log.debug("metric %s could not be read", gauge.name, exc_info=True)
                continue
            lines += [
                f"# HELP {gauge.name} {gauge.help}",
                f"# TYPE {gauge.name} {gauge.kind}",
                f"{gauge.name} {value:g}",
            ]
        return "\n".join(lines) + "\n"


def _labels(**labels: str) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{key}="{escape(value)}"' for key, value in labels.items()) + "}"


class MetricsServer:
    """``GET /metrics`` on ``host:port``. Lifecycle: `start`, `close`, `wait_closed`."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._metrics = metrics
        self._host = host
        self._requested_port = port
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        """Bind and serve; `OSError` when the port cannot be bound."""
        self._server = await asyncio.start_server(self._serve, self._host, self._requested_port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, _, rest = request_line.partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            if method != "GET":
                writer.write(_response(405, "text/plain", "only GET\n"))
            elif path != "/metrics":
                writer.write(_response(404, "text/plain", "see /metrics\n"))
            else:
                writer.write(_response(200, CONTENT_TYPE, self._metrics.render()))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except TimeoutError:
            pass
        finally:
            writer.close()


def _response(status: int, content_type: str, body: str) -> bytes:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
    data = body.encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + data
