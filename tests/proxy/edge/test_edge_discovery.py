"""Discovery against a fake user function: retries, conversion, invalid specs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2

import cloudstate_proxy
from cloudstate_proxy.config import DiscoveryConfig, UserFunctionConfig
from cloudstate_proxy.discovery import (
    Discovered,
    DiscoveryError,
    backoff_delays,
    discover,
    user_function_channel,
)
from cloudstate_proxy.registry import EVENT_SOURCED, SpecError
from examples.shoppingcart import shoppingcart_pb2
from tests.proxy.edge.edge_support import (
    BAD_PACKAGE,
    CART_SERVICE,
    TCK_CONFIGURED,
    TCK_MODEL,
    TCK_TWO,
    FakeDiscovery,
    bad_file,
    entity,
    file_set,
    free_port,
    spec,
    tck_spec,
)

pytestmark = pytest.mark.timeout(30)

FAST = DiscoveryConfig(proxy_name="edge-proxy", initial_backoff=0.01, max_backoff=0.05)


async def run_discovery(port: int, config: DiscoveryConfig = FAST) -> Discovered:
    target = UserFunctionConfig("127.0.0.1", port)
    async with user_function_channel(target, config, 4 * 1024 * 1024) as channel:
        async with asyncio.timeout(20):
            return await discover(channel, config, address=target.address, default_passivation=42.0)


@pytest.fixture
async def tck_user_function() -> AsyncIterator[FakeDiscovery]:
    async with FakeDiscovery(tck_spec()) as fake:
        yield fake


def test_backoff_doubles_up_to_the_maximum() -> None:
    delays = backoff_delays(1.0, 10.0)
    assert [next(delays) for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


async def test_discovers_the_tck_services(tck_user_function: FakeDiscovery) -> None:
    discovered = await run_discovery(tck_user_function.port)
    services = discovered.registry.services
    assert set(services) == {TCK_MODEL, TCK_TWO, TCK_CONFIGURED}
    assert services[TCK_MODEL].persistence_id == "event-sourced-tck-model"
    assert services[TCK_MODEL].passivation_timeout == 42.0  # the proxy default
    assert services[TCK_CONFIGURED].passivation_timeout == pytest.approx(0.1)
    assert set(services[TCK_MODEL].methods) == {"Process"}
    assert discovered.user_function.support_library_name == "fake-sdk"


async def test_sends_proxy_info(tck_user_function: FakeDiscovery) -> None:
    await run_discovery(tck_user_function.port)
    (info,) = tck_user_function.proxy_infos
    assert (info.protocol_major_version, info.protocol_minor_version) == (0, 2)
    assert info.proxy_name == "edge-proxy"
    assert info.proxy_version == cloudstate_proxy.__version__
    assert list(info.supported_entity_types) == [EVENT_SOURCED]


class _AttemptCounter(logging.Handler):
    """Sets ``reached`` once ``target`` discovery attempts were logged."""

    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target
        self.messages: list[str] = []
        self.reached = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "discovery attempt" in message:
            self.messages.append(message)
            if len(self.messages) >= self.target:
                self.reached.set()


async def test_retries_until_the_user_function_is_up() -> None:
    port = free_port()
    counter = _AttemptCounter(target=3)
    logger = logging.getLogger("cloudstate_proxy.discovery")
    logger.addHandler(counter)
    fake = FakeDiscovery(tck_spec())
    try:
        task = asyncio.create_task(run_discovery(port))
        async with asyncio.timeout(10):
            await counter.reached.wait()
        assert not task.done()
        await fake.start(port)
        discovered = await asyncio.wait_for(task, 10)
    finally:
        logger.removeHandler(counter)
        await fake.stop()
    assert TCK_MODEL in discovered.registry.services
    assert all(f"127.0.0.1:{port}" in m for m in counter.messages)
    assert "discovery attempt 1:" in counter.messages[0]
    assert "discovery attempt 2:" in counter.messages[1]


async def test_protocol_0_0_is_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    async with FakeDiscovery(tck_spec(protocol=(0, 0))) as fake:
        discovered = await run_discovery(fake.port)
    assert TCK_MODEL in discovered.registry.services
    assert any("protocol 0.0" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


async def test_other_major_versions_are_rejected_and_reported() -> None:
    async with FakeDiscovery(tck_spec(protocol=(1, 0))) as fake:
        with pytest.raises(SpecError, match=r"protocol 1\.0"):
            await run_discovery(fake.port)
    assert len(fake.errors) == 1
    assert "protocol 1.0" in fake.errors[0]


def _bad_spec(service: str, entity_type: str = EVENT_SOURCED) -> object:
    return spec(
        file_set(bad_file()),
        [entity(f"{BAD_PACKAGE}.Fine", "fine"), entity(service, "bad", entity_type=entity_type)],
    )


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        pytest.param(
            _bad_spec(f"{BAD_PACKAGE}.Missing"),
            [f"{BAD_PACKAGE}.Missing", "not in the spec"],
            id="service-not-in-descriptors",
        ),
        pytest.param(
            _bad_spec(f"{BAD_PACKAGE}.NoKey"),
            [f"{BAD_PACKAGE}.NoKey", "Lookup", "entity_key"],
            id="input-without-entity-key",
        ),
        pytest.param(
            _bad_spec(f"{BAD_PACKAGE}.Streamed"),
            [f"{BAD_PACKAGE}.Streamed", "Watch", "stream"],
            id="streamed-method",
        ),
        pytest.param(
            _bad_spec(f"{BAD_PACKAGE}.Fine", entity_type="cloudstate.crdt.Crdt"),
            [f"{BAD_PACKAGE}.Fine", "cloudstate.crdt.Crdt", "not supported"],
            id="unsupported-entity-type",
        ),
        pytest.param(
            spec(file_set(bad_file()), []),
            ["no entities"],
            id="no-entities",
        ),
        pytest.param(
            spec(b"\xff\xff garbage", [entity(f"{BAD_PACKAGE}.Fine", "fine")]),
            ["descriptor set"],
            id="undecodable-descriptors",
        ),
    ],
)
async def test_invalid_spec_is_reported_and_raised(
    bad: object, expected: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeDiscovery(bad) as fake:  # type: ignore[arg-type]
        with pytest.raises(SpecError) as raised:
            await run_discovery(fake.port)
    assert len(fake.errors) == 1
    for fragment in expected:
        assert fragment in fake.errors[0]
        assert fragment in str(raised.value)
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(expected[0] in m for m in logged)


async def test_a_server_without_discovery_fails_without_retrying() -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with pytest.raises(DiscoveryError, match=f"127.0.0.1:{port}.*UNIMPLEMENTED"):
            await run_discovery(port)
    finally:
        await server.stop(None)


async def test_dependencies_may_come_in_any_order() -> None:
    files = descriptor_pb2.FileDescriptorSet.FromString(file_set(shoppingcart_pb2.DESCRIPTOR))
    reordered = descriptor_pb2.FileDescriptorSet(file=list(reversed(files.file)))
    assert reordered.file[0].name != files.file[0].name
    cart = spec(reordered.SerializeToString(), [entity(CART_SERVICE, "cart")])
    async with FakeDiscovery(cart) as fake:
        discovered = await run_discovery(fake.port)
    assert CART_SERVICE in discovered.registry.services
