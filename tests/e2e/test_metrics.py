"""The Prometheus endpoint of a real proxy process (``--metrics-port``)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import pytest

from examples.shoppingcart import shoppingcart_pb2 as api
from tests.e2e.conftest import System
from tests.e2e.test_cart import add, cart_stub
from tools.launch import free_port

SERVICE = "com.example.shoppingcart.ShoppingCart"


async def scrape(port: int, path: str = "/metrics") -> tuple[str, str]:
    """(status line, body) of one GET."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return head.split("\r\n")[0], body


def sample(body: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = rf"^{re.escape(name)}(\{{{re.escape(wanted)}\}})? (\S+)$"
    found = [m.group(2) for m in re.finditer(pattern, body, re.MULTILINE)]
    assert len(found) == 1, f"{name}{{{wanted}}} not in:\n{body}"
    return float(found[0])


async def test_metrics_count_commands_by_status(postgres_database: str, logs_dir: Path) -> None:
    port = free_port()
    system = System(
        "examples.shoppingcart",
        postgres_database,
        logs_dir,
        extra_proxy_args=("--metrics-port", str(port)),
    )
    try:
        await system.start()
        async with grpc.aio.insecure_channel(system.target) as channel:
            cart = cart_stub(channel)
            await cart.AddItem(add("m", "apple", 1), timeout=10)
            await cart.AddItem(add("m", "pear", 2), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError):
                await cart.AddItem(add("m", "plum", -1), timeout=10)  # UNKNOWN
            with pytest.raises(grpc.aio.AioRpcError):
                await cart.GetCart(api.GetShoppingCart(user_id=""), timeout=10)
        status, body = await scrape(port)
        assert status == "HTTP/1.1 200 OK"
        ok = sample(
            body, "cloudstate_proxy_commands_total", service=SERVICE, method="AddItem", status="OK"
        )
        assert ok == 2
        failed = sample(
            body,
            "cloudstate_proxy_commands_total",
            service=SERVICE,
            method="AddItem",
            status="UNKNOWN",
        )
        assert failed == 1
        invalid = sample(
            body,
            "cloudstate_proxy_commands_total",
            service=SERVICE,
            method="GetCart",
            status="INVALID_ARGUMENT",
        )
        assert invalid == 1
        count = sample(
            body, "cloudstate_proxy_command_seconds_count", service=SERVICE, method="AddItem"
        )
        assert count == 3
        every = sample(
            body,
            "cloudstate_proxy_command_seconds_bucket",
            service=SERVICE,
            method="AddItem",
            le="+Inf",
        )
        assert every == 3
        assert sample(body, "cloudstate_proxy_live_entities") == 1
        assert sample(body, "cloudstate_proxy_journal_appends_total") == 2
        assert 1 <= sample(body, "cloudstate_proxy_journal_batches_total") <= 2
        assert (await scrape(port, "/other"))[0] == "HTTP/1.1 404 Not Found"
    finally:
        system.stop()
