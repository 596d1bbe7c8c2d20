"""The whole proxy (`ProxyApp`) with --http-json-port, in front of a scripted
fake user function: HTTP/JSON requests reach the entity streams like gRPC calls."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from cloudstate_proxy.app import ProxyApp
from cloudstate_proxy.config import HttpJsonConfig
from examples.tck import eventsourced_pb2 as tck
from tests.proxy.asof.asof_helpers import app_config
from tests.proxy.edge.edge_support import tck_spec
from tests.proxy.httpjson.httpjson_support import closed_by_server, read_response, request
from tests.support.fake_user_function import FakeUserFunction

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def fake() -> AsyncIterator[FakeUserFunction]:
    async with FakeUserFunction(tck_spec()) as user_function:
        yield user_function


@pytest.fixture
async def app(fake: FakeUserFunction, tmp_path: Path) -> AsyncIterator[ProxyApp]:
    config = replace(app_config(fake.port, tmp_path / "journal.db"), http_json=HttpJsonConfig(0))
    proxy = ProxyApp(config)
    async with asyncio.timeout(10):
        await proxy.start()
    try:
        yield proxy
    finally:
        async with asyncio.timeout(15):
            await proxy.close()


async def test_http_request_runs_the_command_and_shutdown_drains_it(
    app: ProxyApp, fake: FakeUserFunction
) -> None:
    body = json.dumps({"actions": [{"emit": {"value": "a"}}]})
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", app.http_json_port)
    try:
        writer.write(request("POST", "/tck/model/eventsourced/e1", body))
        stream = await fake.next_stream()
        init = await stream.expect_init()
        assert (init.service_name, init.entity_id) == (
            "cloudstate.tck.model.EventSourcedTckModel",
            "e1",
        )
        command = await stream.expect_command()
        sent = tck.Request.FromString(command.payload.value)
        assert (command.name, sent.id, sent.actions[0].emit.value) == ("Process", "e1", "a")
        stream.reply(command.id, tck.Response(message="a"), events=[tck.Persisted(value="a")])
        response = await read_response(reader)
        assert (response.status, response.json()) == (200, {"message": "a"})

        # In flight while the proxy shuts down: answered, then the connection closes
        # (with Connection: close, or as an idle one, depending on who is first).
        writer.write(request("POST", "/tck/model/eventsourced/e1", body))
        command = await stream.expect_command()
        closing = asyncio.create_task(app.close())
        stream.reply(command.id, tck.Response(message="aa"), events=[tck.Persisted(value="a")])
        response = await read_response(reader)
        assert (response.status, response.json()) == (200, {"message": "aa"})
        assert await closed_by_server(reader)
        await asyncio.wait_for(closing, 15)
    finally:
        writer.close()
