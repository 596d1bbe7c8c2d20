"""The TCK model user function behind the proxy: emit, forward, effects, failures."""

from __future__ import annotations

import grpc
import pytest

from examples.tck import eventsourced_pb2 as tck
from examples.tck import eventsourced_pb2_grpc as tck_grpc
from tests.e2e.conftest import System, journal_rows

pytestmark = pytest.mark.timeout(180)


def request(entity: str, *actions: tck.RequestAction) -> tck.Request:
    return tck.Request(id=entity, actions=list(actions))


def emit(value: str) -> tck.RequestAction:
    return tck.RequestAction(emit=tck.Emit(value=value))


async def test_tck_model_through_the_proxy(tck_system: System) -> None:
    async with grpc.aio.insecure_channel(tck_system.target) as channel:
        model = tck_grpc.EventSourcedTckModelStub(channel)
        reply = await model.Process(request("e1", emit("A"), emit("B")), timeout=10)
        assert reply.message == "AB"
        # Seven events: a snapshot at 5 on the way; state keeps growing correctly.
        for value in "CDEFG":
            reply = await model.Process(request("e1", emit(value)), timeout=10)
        assert reply.message == "ABCDEFG"

        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await model.Process(
                request("e1", emit("X"), tck.RequestAction(fail=tck.Fail(message="no"))),
                timeout=10,
            )
        assert failed.value.code() == grpc.StatusCode.UNKNOWN
        assert failed.value.details() == "no"

        forward = tck.RequestAction(forward=tck.Forward(id="other"))
        reply = await model.Process(request("e1", emit("H"), forward), timeout=10)
        assert reply == tck.Response()  # EventSourcedTwo's empty reply

        effect = tck.RequestAction(effect=tck.Effect(id="other", synchronous=True))
        reply = await model.Process(request("e1", effect), timeout=10)
        assert reply.message == "ABCDEFGH"

        configured = tck_grpc.EventSourcedConfiguredStub(channel)
        assert await configured.Call(request("c1"), timeout=10) == tck.Response()

    rows = await journal_rows(tck_system.journal_url, "event-sourced-tck-model")
    assert [(r["entity_id"], r["seq_nr"]) for r in rows] == [("e1", n) for n in range(1, 9)]
    values = [tck.Persisted.FromString(r["payload"]).value for r in rows]
    assert "".join(values) == "ABCDEFGH"  # the failed command's "X" was never persisted
