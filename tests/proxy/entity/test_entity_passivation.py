"""Protocol tier: idle passivation, commands during passivation, the LRU cap."""

from __future__ import annotations

import asyncio

import pytest

from cloudstate_proxy.entity.instance import Phase
from examples.tck.eventsourced_pb2 import Persisted, Response
from tests.proxy.entity.helpers import (
    CONFIGURED,
    TCK,
    Harness,
    echo_autopilot,
    emit,
    persisted,
    result,
    tck_request,
    until,
)

pytestmark = pytest.mark.timeout(30)


async def test_idle_entity_is_passivated_and_recovers_with_replay(harness: Harness) -> None:
    manager = await harness.manager()
    loop = asyncio.get_running_loop()
    call = harness.call(manager, "c1", service=CONFIGURED, method="Call")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.reply(1, Response(), events=[Persisted(value="a")])
    await result(call)
    answered = loop.time()

    await stream.expect_half_close()  # the spec's 100 ms idle timeout
    assert loop.time() - answered >= 0.09
    await stream.wait_closed()
    assert not stream.cancelled  # the fake ended its side: a clean passivation
    await until(lambda: manager.active_count == 0)

    call = harness.call(manager, "c1", service=CONFIGURED, method="Call")
    fresh = await harness.fake.next_stream()
    init = await fresh.expect_init()
    assert (init.service_name, init.entity_id) == (CONFIGURED, "c1")
    event = await fresh.expect_event()
    assert (event.sequence, event.payload.value) == (1, persisted("a"))
    assert (await fresh.expect_command()).id == 1
    fresh.reply(1, Response())
    await result(call)


async def test_default_passivation_applies_without_a_service_timeout(harness: Harness) -> None:
    from dataclasses import replace

    services = dict(harness.registry.services)
    services[TCK] = replace(services[TCK], passivation_timeout=None)
    harness.registry = replace(harness.registry, services=services)
    manager = await harness.manager(default_passivation=0.05)
    call = harness.call(manager, "e1")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.reply(1, Response())
    await result(call)
    await stream.expect_half_close()


async def test_command_during_passivation_goes_to_a_fresh_instance(harness: Harness) -> None:
    harness.fake.end_on_half_close = False
    manager = await harness.manager()
    call = harness.call(manager, "c1", service=CONFIGURED, method="Call")
    stream = await harness.fake.next_stream()
    await stream.expect_init()
    await stream.expect_command()
    stream.reply(1, Response(), events=[Persisted(value="a")])
    await result(call)
    await stream.expect_half_close()
    instance = manager.instance(CONFIGURED, "c1")
    assert instance is not None and instance.phase is Phase.PASSIVATING

    late = harness.call(manager, "c1", emit("late"), service=CONFIGURED, method="Call")
    await until(lambda: instance.queued == 1)
    # Only after the old stream is over does a new one start.
    harness.fake.assert_no_new_stream()
    stream.end()
    fresh = await harness.fake.next_stream()
    await fresh.expect_init()
    assert (await fresh.expect_event()).sequence == 1
    command = await fresh.expect_command()
    assert (command.id, command.payload.value) == (1, tck_request("c1", emit("late")))
    fresh.reply(1, Response(message="late"))
    await result(late)
    replacement = manager.instance(CONFIGURED, "c1")
    assert replacement is not None and replacement is not instance


async def test_cap_passivates_the_least_recently_used_idle_instance(harness: Harness) -> None:
    harness.fake.autopilot = echo_autopilot
    manager = await harness.manager(max_instances=2)
    await result(harness.call(manager, "e1"))
    await result(harness.call(manager, "e2"))
    await result(harness.call(manager, "e1"))  # e2 is now the least recently used
    await result(harness.call(manager, "e3"))

    await harness.stream_for("e2").wait_closed()
    assert harness.stream_for("e2").half_closed.is_set()
    await until(lambda: manager.instance(TCK, "e2") is None)
    assert manager.active_count == 2
    assert not harness.stream_for("e1").half_closed.is_set()
    assert not harness.stream_for("e3").half_closed.is_set()


async def test_cap_is_soft_when_every_instance_is_busy(harness: Harness) -> None:
    manager = await harness.manager(max_instances=1)
    busy = harness.call(manager, "e1")
    first = await harness.fake.next_stream()
    await first.expect_init()
    await first.expect_command()

    other = harness.call(manager, "e2")
    second = await harness.fake.next_stream()
    await second.expect_init()
    await second.expect_command()
    second.reply(1, Response())
    await result(other)
    assert manager.active_count == 2
    first.reply(1, Response())
    await result(busy)
    assert not first.half_closed.is_set()
