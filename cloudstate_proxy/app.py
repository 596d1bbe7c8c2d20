"""The proxy as one object: `ProxyApp` wires the components together.

Start-up order: open the event store, connect to the user function, discover
its services, start the entity manager, join the cluster (unless membership is
``none``: serve the peer port, register, follow membership), and only then bind
the client port and, when enabled, the HTTP/JSON port (readiness follows
discovery). Shutdown runs the other way round: leave the cluster (deregister
and hand entities to the other members), report NOT_SERVING and stop accepting
calls on both ports, drain the in-flight ones, close
the peer port, close the entity manager, then the cluster's channels and
membership, flush and close the store, close the user-function channel.

`run` serves until SIGINT or SIGTERM and is what ``cloudstate-proxy serve`` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Iterator

import grpc

from .cluster.node import ClusterNode
from .config import ProxyConfig
from .discovery import Discovered, discover, user_function_channel
from .entity.manager import EntityManager
from .frontdoor import FrontDoor
from .httpjson import HttpJsonServer
from .journal import JournalUnavailable, Store, open_store
from .journal.common import redact_url
from .metrics import Gauge, Metrics, MetricsServer
from .readside import EventLogService
from .registry import ServiceRegistry

log = logging.getLogger(__name__)


class ProxyApp:
    """One proxy node in front of one user function.

    ``await start()`` returns once the client port serves (or raises, having
    released whatever it had opened); ``close()`` is idempotent and shuts down
    gracefully; ``wait_closed()`` returns once shutdown finished. Also an async
    context manager.
    """

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self._store: Store | None = None
        self._channel: grpc.aio.Channel | None = None
        self._discovered: Discovered | None = None
        self._manager: EntityManager | None = None
        self._cluster: ClusterNode | None = None
        self._frontdoor: FrontDoor | None = None
        self._http_json: HttpJsonServer | None = None
        # What the front door observed; served with --metrics-port.
        self.metrics = Metrics()
        self._metrics_server: MetricsServer | None = None
        self._event_log: EventLogService | None = None
        self._started = False
        self._closing: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    @property
    def port(self) -> int:
        """The bound client port (the real one when the config asked for port 0)."""
        if self._frontdoor is None:
            raise RuntimeError("the proxy is not serving")
        return self._frontdoor.port

    @property
    def metrics_port(self) -> int:
        """The bound metrics port; only with ``--metrics-port``."""
        if self._metrics_server is None:
            raise RuntimeError("the proxy does not serve metrics")
        return self._metrics_server.port

    def _gauges(self) -> list[Gauge]:
        manager, store = self._manager, self._store
        assert manager is not None and store is not None
        gauges = [
            Gauge(
                "cloudstate_proxy_live_entities",
                "Entity instances alive on this node.",
                lambda: manager.active_count,
            ),
            Gauge(
                "cloudstate_proxy_running_effects",
                "Forwards and side effects still running.",
                lambda: manager.running_effects,
            ),
        ]
        committer = getattr(store, "committer", None)
        if committer is not None:
            gauges += [
                Gauge(
                    "cloudstate_proxy_journal_appends_total",
                    "Appends (one command's events each) the journal wrote.",
                    lambda: committer.appends_written,
                    "counter",
                ),
                Gauge(
                    "cloudstate_proxy_journal_batches_total",
                    "Transactions the journal wrote them in (group commit).",
                    lambda: committer.batches_written,
                    "counter",
                ),
            ]
        return gauges

    @property
    def http_json_port(self) -> int:
        """The bound HTTP/JSON port; only with ``--http-json-port``."""
        if self._http_json is None:
            raise RuntimeError("the proxy does not serve HTTP/JSON")
        return self._http_json.port

    @property
    def peer_port(self) -> int:
        """The bound peer port (cluster forwarding); only with a membership."""
        if self._cluster is None:
            raise RuntimeError("the proxy is not a cluster member")
        return self._cluster.peer_port

    @property
    def registry(self) -> ServiceRegistry:
        """The user function's services, known once discovery succeeded."""
        if self._discovered is None:
            raise RuntimeError("the user function is not discovered yet")
        return self._discovered.registry

    async def start(self) -> None:
        """Start every component in order. Raises `SpecError` or `DiscoveryError`
        (discovery), `OSError` (the client port) or the store's errors."""
        if self._started:
            raise RuntimeError("ProxyApp.start() called twice")
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        config = self.config
        self._store = open_store(config.journal_url)
        await start_store(
            self._store,
            config.journal_url,
            config.journal_start_timeout,
            config.discovery.max_backoff,
        )
        self._channel = user_function_channel(
            config.user_function,
            config.discovery,
            config.server.max_message_size,
            config.server.grpc_stack,
        )
        self._discovered = await discover(
            self._channel,
            config.discovery,
            address=config.user_function.address,
            default_passivation=config.entities.passivation_timeout,
        )
        registry = self._discovered.registry
        if config.membership_mode != "none":
            self._cluster = ClusterNode(config, registry)
        router = self._cluster.router if self._cluster is not None else None
        self._manager = EntityManager(
            registry,
            self._store,
            self._store,
            self._channel,
            config.entity_settings(),
            router,
            shutdown_grace=config.server.shutdown_timeout,
        )
        await self._manager.start()
        if self._cluster is not None:
            # Before the client port opens: commands need to know their owners.
            await self._cluster.start(self._manager)
        # The read side (cloudstate.proxy.v1.EventLog) shares the client port.
        self._event_log = EventLogService(self._store)
        self._frontdoor = FrontDoor(
            registry,
            router if router is not None else self._manager,
            config.server,
            services=[self._event_log],
            # Counted only when served: nothing added to the command path otherwise.
            metrics=self.metrics if config.metrics_port is not None else None,
        )
        http_json = config.http_json_options()
        if http_json is not None:
            # The same router: HTTP/JSON requests route exactly like gRPC calls.
            # Bound first, so that gRPC health SERVING means both ports serve.
            self._http_json = HttpJsonServer(
                registry, router if router is not None else self._manager, http_json
            )
            await self._http_json.start()
            log.info("serving HTTP/JSON on %s", self._http_json.address)
        await self._frontdoor.start()
        if config.metrics_port is not None:
            self._metrics_server = MetricsServer(
                self.metrics, config.server.host, config.metrics_port
            )
            self.metrics.add_gauges(self._gauges())
            await self._metrics_server.start()
            log.info("serving metrics on port %d", self._metrics_server.port)
        log.info(
            "serving %s on %s (user function at %s, journal %s, gRPC on %s)",
            ", ".join(sorted(registry.services)),
            self._frontdoor.address,
            config.user_function.address,
            redact_url(config.journal_url),
            config.server.grpc_stack,
        )

    async def close(self) -> None:
        """Shut down gracefully (see the module docstring). Idempotent; safe
        after a failed or partial start."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._shutdown(), name="proxy-shutdown")
        await asyncio.shield(self._closing)

    async def wait_closed(self) -> None:
        await self._closed.wait()
        if self._closing is not None:
            await self._closing

    async def __aenter__(self) -> ProxyApp:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _shutdown(self) -> None:
        # Each step runs even when an earlier one failed: a shutdown must finish.
        try:
            if self._cluster is not None:
                await _step("leave the cluster", self._cluster.leave())
            if self._metrics_server is not None:
                self._metrics_server.close()
                await _step("close the metrics port", self._metrics_server.wait_closed())
            if self._event_log is not None:
                # Live subscriptions never finish by themselves: end them now
                # rather than let them hold the front door's drain to its timeout.
                self._event_log.close()
            # Both doors drain their in-flight requests at the same time.
            doors = []
            if self._frontdoor is not None:
                doors.append(_step("stop the front door", self._frontdoor.close()))
            if self._http_json is not None:
                doors.append(_step("stop the HTTP/JSON server", self._http_json.close()))
            await asyncio.gather(*doors)
            if self._cluster is not None:
                await _step("close the peer port", self._cluster.stop_serving())
            if self._manager is not None:
                await _step("close the entity manager", _close_and_wait(self._manager))
            if self._cluster is not None:
                await _step("close the cluster membership", self._cluster.close())
            if self._store is not None:
                await _step("close the event store", _close_and_wait(self._store))
            if self._channel is not None:
                await _step("close the user-function channel", self._channel.close())
        finally:
            self._closed.set()
        log.info("proxy stopped")


async def _close_and_wait(component: EntityManager | Store) -> None:
    await component.close()
    await component.wait_closed()


async def _step(what: str, action: Awaitable[None]) -> None:
    try:
        await action
    except Exception:
        log.exception("shutdown: failed to %s", what)


async def run(config: ProxyConfig) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully.

    A signal during start-up (e.g. while waiting for the user function) aborts
    it. Start-up errors propagate.
    """
    stop = asyncio.Event()
    with _stop_on_signals(stop):
        app = ProxyApp(config)
        try:
            if await _unless_stopped(app.start(), stop):
                _steady_state_gc()
                await stop.wait()
        finally:
            await app.close()


def _steady_state_gc() -> None:
    """Collect cyclic garbage less often once serving (a process-wide setting).

    What start-up built (descriptors, registry, channels, pools) lives as long
    as the process: frozen, no collection traverses it again. Commands allocate
    hundreds of short-lived objects each, so the default thresholds ran a
    collection every few commands and, under load, full collections over every
    live entity instance that paused the loop for ~50 ms (bench/README.md).
    """
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)


async def _unless_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Run ``work`` unless ``stop`` is set first, which cancels it. True when
    ``work`` completed; its exception, if any, propagates."""
    work_task = asyncio.ensure_future(work)
    stop_task = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({work_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work_task, stop_task):
            task.cancel()
        await asyncio.gather(work_task, stop_task, return_exceptions=True)
    if work_task.cancelled():
        return False
    work_task.result()
    return True


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []

    def on_signal(received: signal.Signals) -> None:
        log.info("received %s, shutting down", received.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or a platform without signal support
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def start_store(store: Store, url: str, retry_for: float, max_backoff: float) -> None:
    """Start ``store``, retrying with backoff for up to ``retry_for`` seconds
    while its database cannot be reached (one log line per attempt); then
    raise the last `JournalUnavailable`. A proxy started beside its database
    (docker compose, a Kubernetes pod) need not win the race."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + retry_for
    delay, attempt = 0.5, 1
    while True:
        try:
            await store.start()
            if attempt > 1:
                log.info("journal %s reachable after %d attempts", redact_url(url), attempt)
            return
        except JournalUnavailable as exc:
            left = give_up - loop.time()
            if left <= 0:
                raise
            pause = min(delay, left)
            log.warning(
                "journal %s not reachable (attempt %d), retrying in %.1fs: %s",
                redact_url(url),
                attempt,
                pause,
                exc,
            )
        await asyncio.sleep(pause)
        delay, attempt = min(delay * 2, max_backoff), attempt + 1
