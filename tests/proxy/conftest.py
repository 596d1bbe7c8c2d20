"""Fixtures shared by the proxy's test tiers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cloudstate_proxy.entity.stream import EntityStream


@dataclass
class StreamEnds:
    """How the proxy ended its `handle` streams: abandoned or half-closed."""

    cancelled: int = 0
    finished: int = 0


@pytest.fixture
def stream_ends(monkeypatch: pytest.MonkeyPatch) -> StreamEnds:
    """Counts `EntityStream.cancel` and `EntityStream.finish` calls.

    The fake user function cannot always tell a cancellation from a half-close:
    gRPC reports a client's cancellation to the server as two events (the end of
    the requests, the cancelled flag) in no fixed order, and under CPU load the
    flag may come after the fake has already ended the call. The proxy's own
    side of the decision is what these tests check.
    """
    ends = StreamEnds()
    cancel, finish = EntityStream.cancel, EntityStream.finish

    def counting_cancel(self: EntityStream) -> None:
        ends.cancelled += 1
        cancel(self)

    async def counting_finish(self: EntityStream, grace: float) -> None:
        ends.finished += 1
        await finish(self, grace)

    monkeypatch.setattr(EntityStream, "cancel", counting_cancel)
    monkeypatch.setattr(EntityStream, "finish", counting_finish)
    return ends
