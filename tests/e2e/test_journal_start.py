"""A proxy started before its database: it retries, then serves; or gives up clearly."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc

from examples.shoppingcart import shoppingcart_pb2 as api
from tests.e2e.conftest import System
from tests.e2e.test_cart import add, cart_stub
from tests.support.postgres import TcpProxy
from tools.launch import free_port, start_proxy


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def wait_for_log(path: Path, fragment: str, within: float = 30.0) -> str:
    deadline = time.monotonic() + within
    while True:
        text = read_log(path)
        if fragment in text:
            return text
        assert time.monotonic() < deadline, f"{fragment!r} never logged:\n{text[-2000:]}"
        await asyncio.sleep(0.05)


async def test_the_proxy_waits_for_its_database(postgres_database: str, logs_dir: Path) -> None:
    async with TcpProxy.for_url(postgres_database) as link:
        link.set_mode("down")  # Postgres "not up yet": connections are reset
        system = System("examples.shoppingcart", link.url_through(postgres_database), logs_dir)
        try:
            await system.start_user_function()
            starting = asyncio.create_task(system.start_proxy())
            await wait_for_log(logs_dir / f"proxy-{system.port}.log", "not reachable (attempt 2)")
            assert not starting.done()  # not serving without its journal
            link.set_mode("up")
            await asyncio.wait_for(starting, 60)
            await wait_for_log(logs_dir / f"proxy-{system.port}.log", "reachable after")
            async with grpc.aio.insecure_channel(system.target) as channel:
                cart = cart_stub(channel)
                await cart.AddItem(add("late", "apple", 2), timeout=10)
                reply = await cart.GetCart(api.GetShoppingCart(user_id="late"), timeout=10)
            assert [(i.product_id, i.quantity) for i in reply.items] == [("apple", 2)]
        finally:
            system.stop()


async def test_the_proxy_gives_up_after_the_journal_start_timeout(logs_dir: Path) -> None:
    nothing_there = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    started = time.monotonic()
    proxy = start_proxy(
        free_port(),
        free_port(),
        nothing_there,
        logs_dir,
        extra_args=["--journal-start-timeout", "1.5s"],
    )
    try:
        code = await asyncio.to_thread(proxy.popen.wait, 60) if proxy.popen else None
    finally:
        proxy.stop()
    assert code == 1
    assert time.monotonic() - started < 30
    log = read_log(proxy.log_path)
    assert "not reachable (attempt 1)" in log
    assert "cannot start" in log
    assert "Traceback" not in log
