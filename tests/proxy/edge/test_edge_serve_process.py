"""``cloudstate-proxy serve`` as a real process against a fake user function."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.proxy.edge.edge_support import (
    BAD_PACKAGE,
    TCK_MODEL,
    FakeDiscovery,
    bad_file,
    entity,
    file_set,
    free_port,
    spec,
    tck_spec,
)

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[3]


async def start_proxy(*flags: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LOG_LEVEL": "info"}
    env.pop("JOURNAL_URL", None)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cloudstate_proxy",
        "serve",
        "--journal-url=memory://",
        *flags,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=REPO,
    )


async def read_until(stream: asyncio.StreamReader, fragment: str) -> list[str]:
    """Lines up to and including the first one containing ``fragment``."""
    lines: list[str] = []
    while True:
        line = await stream.readline()
        if not line:
            raise AssertionError(f"output ended before {fragment!r}: {lines}")
        lines.append(line.decode())
        if fragment in lines[-1]:
            return lines


async def test_serve_exits_non_zero_on_an_invalid_spec() -> None:
    bad = spec(file_set(bad_file()), [entity(f"{BAD_PACKAGE}.NoKey", "bad")])
    async with FakeDiscovery(bad) as fake:
        proxy = await start_proxy(f"--user-function-port={fake.port}", "--http-port=0")
        async with asyncio.timeout(40):
            _, stderr = await proxy.communicate()
    assert proxy.returncode == 1
    text = stderr.decode()
    assert f"{BAD_PACKAGE}.NoKey" in text
    assert "Lookup" in text
    assert "Traceback" not in text
    assert fake.errors and "Lookup" in fake.errors[0]


async def test_serve_starts_after_discovery_and_stops_on_sigterm() -> None:
    port = free_port()
    async with FakeDiscovery(tck_spec()) as fake:
        proxy = await start_proxy(
            f"--user-function-port={fake.port}", f"--http-port={port}", "--host=127.0.0.1"
        )
        assert proxy.stderr is not None
        try:
            async with asyncio.timeout(40):
                lines = await read_until(proxy.stderr, "serving")
                assert TCK_MODEL in lines[-1]
                assert f"127.0.0.1:{port}" in lines[-1]
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    health = health_pb2_grpc.HealthStub(channel)
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
                proxy.send_signal(signal.SIGTERM)
                _, rest = await proxy.communicate()
        finally:
            if proxy.returncode is None:
                proxy.kill()
                await proxy.wait()
    assert proxy.returncode == 0
    assert "proxy stopped" in rest.decode()
    assert "Traceback" not in rest.decode()


async def test_sigterm_while_waiting_for_the_user_function_exits_cleanly() -> None:
    proxy = await start_proxy(f"--user-function-port={free_port()}", "--http-port=0")
    assert proxy.stderr is not None
    try:
        async with asyncio.timeout(40):
            await read_until(proxy.stderr, "discovery attempt 1")
            proxy.send_signal(signal.SIGTERM)
            _, rest = await proxy.communicate()
    finally:
        if proxy.returncode is None:
            proxy.kill()
            await proxy.wait()
    assert proxy.returncode == 0
    assert "Traceback" not in rest.decode()
