"""The EventLog gRPC service over a real port, on a real Postgres journal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from cloudstate.proxy.v1 import eventlog_pb2, eventlog_pb2_grpc
from cloudstate_proxy.journal import EventData, StoredEvent
from cloudstate_proxy.journal.postgres import PostgresOptions, PostgresStore
from cloudstate_proxy.readside import EventLogService, SubscriptionOptions
from tests.readside.support import TYPE_URL, assert_exactly_once_in_order, ev
from tests.support import eventually

pytestmark = pytest.mark.timeout(60)

A = "svc.A"
B = "svc.B"
Code = grpc.StatusCode


@pytest.fixture
async def store(postgres_database: str) -> AsyncIterator[PostgresStore]:
    async with PostgresStore(postgres_database, PostgresOptions(max_pool_size=6)) as opened:
        yield opened


@pytest.fixture
async def served(store: PostgresStore) -> AsyncIterator[tuple[EventLogService, int]]:
    """The service on a real port: (service, port)."""
    # Small pages, so that catching up takes many reads.
    log_service = EventLogService(store, SubscriptionOptions(page_size=5))
    server = grpc.aio.server()
    log_service.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield log_service, port
    finally:
        log_service.close()
        await server.stop(1)


@pytest.fixture
def service(served: tuple[EventLogService, int]) -> EventLogService:
    return served[0]


@pytest.fixture
async def stub(served: tuple[EventLogService, int]) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served[1]}") as channel:
        yield eventlog_pb2_grpc.EventLogStub(channel)


def subscribe(stub: Any, **fields: Any) -> Any:
    return stub.Subscribe(eventlog_pb2.SubscribeRequest(**fields), timeout=30)


async def drain(call: Any) -> list[Any]:
    """The call's remaining responses, up to its end (read(), so that tests
    can read some responses first)."""
    responses = []
    async with asyncio.timeout(30):
        while (response := await call.read()) is not grpc.aio.EOF:
            responses.append(response)
    return responses


def as_events(responses: list[Any]) -> list[eventlog_pb2.LogEvent]:
    return [r.event for r in responses if r.WhichOneof("message") == "event"]


def log_event(event: StoredEvent) -> eventlog_pb2.LogEvent:
    written_at = timestamp_pb2.Timestamp()
    written_at.FromDatetime(event.written_at)
    return eventlog_pb2.LogEvent(
        offset=event.global_offset,
        persistence_id=event.persistence_id,
        entity_id=event.entity_id,
        sequence=event.seq_nr,
        written_at=written_at,
        payload={"type_url": event.type_url, "value": event.payload},
    )


async def next_kind(call: Any, kind: str) -> Any:
    async with asyncio.timeout(10):
        response = await call.read()
    assert response is not grpc.aio.EOF and response.WhichOneof("message") == kind, response
    return response


async def expect_status(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await drain(call)
    assert raised.value.code() == code, raised.value.details()
    return raised.value.details() or ""


# -- Subscribe -------------------------------------------------------------------


async def test_catch_up_then_caught_up_then_done(store: PostgresStore, stub: Any) -> None:
    written = []
    for i in range(12):
        written += await store.append(A if i % 3 else B, f"e{i}", 0, [ev(i)])

    responses = await drain(subscribe(stub))
    assert as_events(responses) == [log_event(e) for e in written]
    assert responses[-1].caught_up.offset == 12
    assert [r.WhichOneof("message") for r in responses].count("caught_up") == 1

    later = await drain(subscribe(stub, after_offset=10))
    assert [e.offset for e in as_events(later)] == [11, 12]


async def test_batches_group_the_events_of_each_page(store: PostgresStore, stub: Any) -> None:
    written = []
    for i in range(12):
        written += await store.append(A, f"e{i}", 0, [ev(i)])

    # Pages of 5 (see `served`), batches of at most 3: 3+2, 3+2, 2, then CaughtUp.
    responses = await drain(subscribe(stub, max_batch=3))
    kinds = [r.WhichOneof("message") for r in responses]
    assert kinds == ["events"] * 5 + ["caught_up"]
    sizes = [len(r.events.events) for r in responses[:-1]]
    assert sizes == [3, 2, 3, 2, 2]
    batched = [e for r in responses[:-1] for e in r.events.events]
    assert batched == [log_event(e) for e in written]
    assert responses[-1].caught_up.offset == 12

    # max_batch 0 and 1 keep one event per message.
    for one in (0, 1):
        singles = await drain(subscribe(stub, after_offset=9, max_batch=one))
        assert [r.WhichOneof("message") for r in singles] == ["event"] * 3 + ["caught_up"]


async def test_one_persistence_id(store: PostgresStore, stub: Any) -> None:
    for i in range(9):
        await store.append(A if i % 3 else B, f"e{i}", 0, [ev(i), ev(i)])
    responses = await drain(subscribe(stub, persistence_id=B))
    events = as_events(responses)
    assert {e.persistence_id for e in events} == {B} and len(events) == 6
    assert [e.offset for e in events] == sorted(e.offset for e in events)
    # Caught up with the whole log: resuming from here skips nothing of B.
    assert responses[-1].caught_up.offset == 18
    assert await drain(subscribe(stub, persistence_id="svc.Unknown")) == [
        eventlog_pb2.SubscribeResponse(caught_up=eventlog_pb2.CaughtUp(offset=18))
    ]


async def test_follow_hands_over_from_catch_up_to_live(store: PostgresStore, stub: Any) -> None:
    """Events are committed all along, also while the subscription catches up
    (in pages of 5) and turns live: each arrives once, in order."""
    committed: list[StoredEvent] = []

    async def write(entity: int) -> None:
        for seq in range(15):
            committed.extend(await store.append(A, f"e{entity}", seq, [ev(seq)]))

    writers = [asyncio.create_task(write(entity)) for entity in range(8)]
    await eventually(lambda: _at_least(committed, 20))
    call = subscribe(stub, follow=True)
    received: list[StoredEvent] = []
    caught_up = 0
    async with asyncio.timeout(30):
        await asyncio.gather(*writers)
        while len(received) < len(committed) or not caught_up:
            response = await call.read()
            if response.WhichOneof("message") == "caught_up":
                caught_up += 1
                continue
            received.append(_stored(response.event))
    call.cancel()
    assert caught_up == 1
    assert_exactly_once_in_order(received, committed)


async def test_follow_delivers_new_events_promptly(store: PostgresStore, stub: Any) -> None:
    call = subscribe(stub, follow=True, persistence_id=A)
    assert (await next_kind(call, "caught_up")).caught_up.offset == 0
    for n in range(3):
        await store.append(B, "other", n, [ev(n)])
        written = await store.append(A, "mine", n, [ev(n)])
        # Bounded well below the service's 5 s safety-net poll: woken by the append.
        async with asyncio.timeout(2):
            response = await next_kind(call, "event")
        assert response.event == log_event(written[0])
    call.cancel()


async def test_slow_consumer_slows_only_its_own_stream(store: PostgresStore, stub: Any) -> None:
    slow = subscribe(stub, follow=True)
    await next_kind(slow, "caught_up")  # then it stops reading for a while
    big = EventData(TYPE_URL, b"x" * 8192)
    async with asyncio.timeout(30):
        # ~16 MiB: far beyond what HTTP/2 flow control lets the server send
        # to a client that does not read.
        written = []
        for start in range(0, 2000, 100):
            batch = [store.append(A, f"e{start + i}", 0, [big]) for i in range(100)]
            written += [e for events in await asyncio.gather(*batch) for e in events]
        written.sort(key=lambda e: e.global_offset or 0)
        fast = as_events(await drain(subscribe(stub)))
        assert [e.offset for e in fast] == [e.global_offset for e in written]
        # The slow reader still gets everything, once, in order, when it reads.
        resumed = []
        while len(resumed) < len(written):
            resumed.append((await next_kind(slow, "event")).event.offset)
    assert resumed == [e.global_offset for e in written]
    slow.cancel()


async def test_closing_the_service_ends_live_subscriptions(
    store: PostgresStore, service: EventLogService, stub: Any
) -> None:
    await store.append(A, "e", 0, [ev(1), ev(2)])
    call = subscribe(stub, follow=True)
    assert (await next_kind(call, "event")).event.offset == 1
    assert (await next_kind(call, "event")).event.offset == 2
    await next_kind(call, "caught_up")
    service.close()
    details = await expect_status(call, Code.UNAVAILABLE)
    assert "resubscribe after offset 2" in details
    async with asyncio.timeout(10):
        await service.wait_closed()
    await expect_status(subscribe(stub), Code.UNAVAILABLE)


async def test_bad_subscriptions_are_invalid_arguments(stub: Any) -> None:
    details = await expect_status(subscribe(stub, after_offset=-1), Code.INVALID_ARGUMENT)
    assert "after_offset" in details
    await expect_status(subscribe(stub, persistence_id="nul\x00"), Code.INVALID_ARGUMENT)
    details = await expect_status(subscribe(stub, max_batch=-1), Code.INVALID_ARGUMENT)
    assert "max_batch" in details


async def test_store_down_is_unavailable(store: PostgresStore, stub: Any) -> None:
    await store.close()
    await expect_status(subscribe(stub, follow=True), Code.UNAVAILABLE)
    request = eventlog_pb2.ReadEntityRequest(persistence_id=A, entity_id="e")
    await expect_status(stub.ReadEntity(request, timeout=30), Code.UNAVAILABLE)


# -- ReadEntity ------------------------------------------------------------------


def read_entity(stub: Any, **fields: Any) -> Any:
    return stub.ReadEntity(eventlog_pb2.ReadEntityRequest(**fields), timeout=30)


async def test_read_entity_by_sequence(store: PostgresStore, stub: Any) -> None:
    history = await store.append(A, "e", 0, [ev(n) for n in range(1, 13)])
    await store.append(A, "other", 0, [ev(0)])
    await store.append(B, "e", 0, [ev(0)])

    async def seqs(**bounds: Any) -> list[int]:
        return [e.sequence for e in await drain(read_entity(stub, **bounds))]

    everything = await drain(read_entity(stub, persistence_id=A, entity_id="e"))
    assert everything == [log_event(e) for e in history]
    assert await seqs(persistence_id=A, entity_id="e", from_sequence=3, to_sequence=6) == [
        3,
        4,
        5,
        6,
    ]
    assert await seqs(persistence_id=A, entity_id="e", from_sequence=11) == [11, 12]
    assert await seqs(persistence_id=A, entity_id="e", to_sequence=2) == [1, 2]
    assert await seqs(persistence_id=A, entity_id="e", from_sequence=13) == []
    assert await seqs(persistence_id=A, entity_id="nobody") == []


async def test_read_entity_by_time(store: PostgresStore, stub: Any) -> None:
    first = await store.append(A, "e", 0, [ev(1), ev(2)])
    second = await store.append(A, "e", 2, [ev(3)])
    third = await store.append(A, "e", 3, [ev(4), ev(5)])
    t1, t2, t3 = (batch[0].written_at for batch in (first, second, third))
    assert t1 < t2 < t3, "one transaction per append, one time per transaction"

    async def seqs(**bounds: Any) -> list[int]:
        request = {"persistence_id": A, "entity_id": "e", **bounds}
        return [e.sequence for e in await drain(read_entity(stub, **request))]

    assert await seqs(from_time=_ts(t2), to_time=_ts(t2)) == [3]
    assert await seqs(from_time=_ts(t2)) == [3, 4, 5]
    assert await seqs(to_time=_ts(t2 - timedelta(microseconds=1))) == [1, 2]
    assert await seqs(from_time=_ts(t1), to_time=_ts(t3), from_sequence=2, to_sequence=4) == [
        2,
        3,
        4,
    ]


@pytest.mark.parametrize(
    "fields",
    [
        {"entity_id": "e"},
        {"persistence_id": A},
        {"persistence_id": A, "entity_id": "e", "from_sequence": -1},
        {"persistence_id": A, "entity_id": "e", "from_sequence": 5, "to_sequence": 4},
        {
            "persistence_id": A,
            "entity_id": "e",
            "from_time": timestamp_pb2.Timestamp(seconds=20),
            "to_time": timestamp_pb2.Timestamp(seconds=10),
        },
    ],
)
async def test_bad_entity_reads_are_invalid_arguments(stub: Any, fields: dict[str, Any]) -> None:
    await expect_status(read_entity(stub, **fields), Code.INVALID_ARGUMENT)


def _ts(moment: Any) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _stored(event: eventlog_pb2.LogEvent) -> StoredEvent:
    return StoredEvent(
        event.persistence_id,
        event.entity_id,
        event.sequence,
        event.payload.type_url,
        event.payload.value,
        event.written_at.ToDatetime(),
        event.offset,
    )


async def _at_least(events: list[StoredEvent], count: int) -> None:
    assert len(events) >= count
