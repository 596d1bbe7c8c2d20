"""The shopping cart's read side: the most added products across all carts.

A projection over persistence id "shopping-cart" keeps the table
``shoppingcart_popular_products(product_id, name, quantity_added)``: every
``ItemAdded`` adds its quantity to the product's row (and sets the name it was
added with), exactly once, because the row update and the projection's offset
commit in one transaction. ``ItemRemoved`` does not subtract: the view ranks
what shoppers added, a demand signal, not what is in carts now (that would need
each cart's lines, since the event does not carry the removed quantity).

The same process serves the ranking over gRPC,
``com.example.shoppingcart.view.PopularProducts/Top``::

    python -m examples.shoppingcart.view --event-log localhost:9000 \\
        --database-url postgresql://postgres@localhost/carts
    python -m examples.shoppingcart.client top --limit 5

Flags and their environment variables: ``--event-log`` (EVENT_LOG_TARGET,
default 127.0.0.1:9000, the proxy), ``--database-url`` (DATABASE_URL,
required), ``--host`` (VIEW_HOST, default 0.0.0.0) and ``--port`` (VIEW_PORT,
default 8090; 0 picks a free one). Several view processes may run against one
database: one of them projects at a time, all of them answer queries.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import asyncpg
import grpc

from user_function_sdk import Projection, ProjectionContext, ProjectionFailed

from . import domain_pb2 as domain
from . import view_pb2 as view_api
from .cart import PERSISTENCE_ID

logger = logging.getLogger(__name__)

PROJECTION_NAME = "shoppingcart-popular-products"
SERVICE_NAME = "com.example.shoppingcart.view.PopularProducts"
DEFAULT_LIMIT = 10
MAX_LIMIT = 1000
_SCHEMA_LOCK_KEY = 0x73686F7070696E67  # "shopping": serializes concurrent set-ups

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS shoppingcart_popular_products (
    product_id text PRIMARY KEY,
    name text NOT NULL,
    quantity_added bigint NOT NULL
)
"""


async def apply_event(event: object, ctx: ProjectionContext) -> None:
    """The projection's handler: count an added item (in the offset's transaction)."""
    if isinstance(event, domain.ItemAdded):
        await ctx.connection.execute(
            "INSERT INTO shoppingcart_popular_products AS p (product_id, name, quantity_added)"
            " VALUES ($1, $2, $3) ON CONFLICT (product_id) DO UPDATE"
            " SET quantity_added = p.quantity_added + EXCLUDED.quantity_added,"
            " name = EXCLUDED.name",
            event.item.productId,
            event.item.name,
            event.item.quantity,
        )
    # ItemRemoved: nothing to do (see the module doc).


async def ensure_schema(connection: Any) -> None:
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
        await connection.execute(CREATE_TABLE)


async def top_products(connection: Any, limit: int) -> list[view_api.PopularProduct]:
    rows = await connection.fetch(
        "SELECT product_id, name, quantity_added FROM shoppingcart_popular_products"
        " ORDER BY quantity_added DESC, product_id LIMIT $1",
        limit,
    )
    return [
        view_api.PopularProduct(
            product_id=row["product_id"], name=row["name"], quantity_added=row["quantity_added"]
        )
        for row in rows
    ]


@dataclass(frozen=True, slots=True)
class ViewConfig:
    """Where the view reads events from, keeps its table, and serves queries."""

    event_log_target: str
    database_url: str
    host: str = "0.0.0.0"
    port: int = 8090


class PopularProductsView:
    """The projection plus the query service, as one component.

    Lifecycle: `await start()`, `close()` (idempotent), `await wait_closed()`
    (raises `ProjectionFailed` if the projection stopped on its own, after
    stopping the rest); or ``async with``.
    """

    def __init__(self, config: ViewConfig) -> None:
        self._config = config
        self._projection = Projection(
            PROJECTION_NAME,
            apply_event,
            event_log_target=config.event_log_target,
            database_url=config.database_url,
            persistence_id=PERSISTENCE_ID,
            event_types=(domain.ItemAdded, domain.ItemRemoved),
        )
        self._pool: Any = None
        self._server: Any = None
        self._stopping: asyncio.Task[None] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the view is not started")
        return self._port

    @property
    def projection(self) -> Projection:
        return self._projection

    async def start(self) -> None:
        """Create the table if absent, serve queries, start projecting.

        `OSError` when the port cannot be bound; nothing is left running then.
        """
        self._pool = await asyncpg.create_pool(self._config.database_url, min_size=1, max_size=4)
        try:
            async with self._pool.acquire() as connection:
                await ensure_schema(connection)
            server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            server.add_generic_rpc_handlers((self._handlers(),))
            address = f"{self._config.host}:{self._config.port}"
            try:
                self._port = server.add_insecure_port(address)
            except RuntimeError as exc:
                raise OSError(f"cannot bind the view to {address}: {exc}") from exc
        except BaseException:
            await self._pool.close()
            raise
        await server.start()
        self._server = server
        await self._projection.start()
        logger.info("view listening on %s:%d", self._config.host, self._port)

    def close(self) -> None:
        self._projection.close()
        if self._server is not None and self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._server.stop(1.0))

    async def wait_closed(self) -> None:
        try:
            await self._projection.wait_closed()
        finally:
            self.close()
            if self._stopping is not None:
                await self._stopping
            if self._pool is not None:
                await self._pool.close()

    async def __aenter__(self) -> PopularProductsView:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    def _handlers(self) -> Any:
        top = grpc.unary_unary_rpc_method_handler(
            self._top,
            request_deserializer=view_api.TopRequest.FromString,
            response_serializer=view_api.TopResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Top": top})

    async def _top(self, request: view_api.TopRequest, context: Any) -> view_api.TopResponse:
        if request.limit < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit must not be negative")
        limit = min(request.limit or DEFAULT_LIMIT, MAX_LIMIT)
        try:
            async with self._pool.acquire(timeout=5) as connection:
                return view_api.TopResponse(products=await top_products(connection, limit))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            logger.warning("Top failed: %s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the view's database is unavailable")
            raise  # not reached: abort raises


def parse_args(argv: Sequence[str] | None = None) -> ViewConfig:
    env = os.environ
    parser = argparse.ArgumentParser(description="Project and serve the most added products.")
    parser.add_argument(
        "--event-log",
        default=env.get("EVENT_LOG_TARGET", "127.0.0.1:9000"),
        help="the proxy's host:port (its EventLog service) [EVENT_LOG_TARGET]",
    )
    parser.add_argument(
        "--database-url",
        default=env.get("DATABASE_URL"),
        help="Postgres for the view's table and offset [DATABASE_URL]",
    )
    parser.add_argument("--host", default=env.get("VIEW_HOST", "0.0.0.0"), help="[VIEW_HOST]")
    parser.add_argument(
        "--port", type=int, default=int(env.get("VIEW_PORT", "8090")), help="[VIEW_PORT]"
    )
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("--database-url (or DATABASE_URL) is required")
    return ViewConfig(args.event_log, args.database_url, args.host, args.port)


async def serve_view(config: ViewConfig) -> None:
    """Run the view until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    async with PopularProductsView(config) as view:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, view.close)
        await view.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = parse_args(argv)
    try:
        asyncio.run(serve_view(config))
    except ProjectionFailed as exc:
        logger.error("the view stopped: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
