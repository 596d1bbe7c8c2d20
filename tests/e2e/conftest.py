"""End-to-end fixtures: real processes (user function, proxy) and a real Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from tools.launch import (
    ManagedProcess,
    free_port,
    start_proxy,
    start_user_function,
    wait_port,
    wait_serving,
)


@dataclass
class System:
    """One user function and one proxy in front of it, as separate processes."""

    module: str
    journal_url: str
    logs: Path
    uf_port: int = field(default_factory=free_port)
    port: int = field(default_factory=free_port)
    user_function: ManagedProcess | None = None
    proxy: ManagedProcess | None = None
    # The gRPC implementations of the proxy and of the user function's SDK.
    proxy_stack: str = "h2grpc"
    user_function_stack: str = "h2grpc"
    extra_proxy_args: tuple[str, ...] = ()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start_user_function(self) -> None:
        self.user_function = start_user_function(
            self.module, self.uf_port, self.logs, env={"GRPC_STACK": self.user_function_stack}
        )
        await asyncio.to_thread(wait_port, self.uf_port, 30.0, self.user_function)

    async def start_proxy(self) -> None:
        self.proxy = start_proxy(
            self.uf_port,
            self.port,
            self.journal_url,
            self.logs,
            extra_args=[
                "--log-level",
                "info",
                "--shutdown-timeout",
                "5s",
                "--grpc-stack",
                self.proxy_stack,
                *self.extra_proxy_args,
            ],
        )
        await asyncio.to_thread(wait_serving, self.target, 60.0, self.proxy)

    async def start(self) -> None:
        await self.start_user_function()
        await self.start_proxy()

    def stop(self) -> None:
        for process in (self.proxy, self.user_function):
            if process is not None:
                process.stop(timeout=10)


@pytest.fixture
def logs_dir(tmp_path: Path) -> Path:
    return tmp_path / "logs"


@pytest.fixture
async def cart_system(postgres_database: str, logs_dir: Path) -> AsyncIterator[System]:
    """The shopping cart behind a proxy journaling to a fresh Postgres database."""
    system = System("examples.shoppingcart", postgres_database, logs_dir)
    try:
        await system.start()
        yield system
    finally:
        system.stop()


@pytest.fixture
async def tck_system(postgres_database: str, logs_dir: Path) -> AsyncIterator[System]:
    """The TCK model user function behind a proxy journaling to a fresh database."""
    system = System("examples.tck", postgres_database, logs_dir)
    try:
        await system.start()
        yield system
    finally:
        system.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the processes' logs to a failed end-to-end test's report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    logs = getattr(item, "funcargs", {}).get("logs_dir")
    if report.failed and isinstance(logs, Path) and logs.exists():
        for log in sorted(logs.glob("*.log")):
            report.sections.append((f"log {log.name}", log.read_text(errors="replace")[-8000:]))


async def journal_rows(url: str, persistence_id: str) -> list[asyncpg.Record]:
    """Every event of ``persistence_id``, in entity and sequence order."""
    conn = await asyncpg.connect(url)
    try:
        return list(
            await conn.fetch(
                "SELECT entity_id, seq_nr, type_url, payload FROM event_journal"
                " WHERE persistence_id = $1 ORDER BY entity_id, seq_nr",
                persistence_id,
            )
        )
    finally:
        await conn.close()
