"""Time travel end to end: the shopping cart (real processes) over Postgres,
queried as of sequence numbers and journal times before and after its snapshots."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import grpc
import pytest

from cloudstate_proxy.entity.asof import AS_OF_SEQ, AS_OF_TIME, STATE_SEQ
from examples.shoppingcart import shoppingcart_pb2 as api
from examples.shoppingcart import shoppingcart_pb2_grpc as api_grpc
from tests.e2e.conftest import System

pytestmark = pytest.mark.timeout(180)

USER = "alice"
# The cart's history, one event each; the cart snapshots at 5 and 10.
HISTORY: list[tuple[str, str, int]] = [
    ("add", "apple", 1),
    ("add", "pear", 2),
    ("add", "apple", 3),
    ("add", "plum", 1),
    ("remove", "pear", 0),
    ("add", "kiwi", 1),
    ("add", "apple", 1),
    ("remove", "plum", 0),
    ("add", "fig", 2),
    ("add", "pear", 1),
    ("add", "kiwi", 2),
    ("remove", "apple", 0),
]
Lines = list[tuple[str, int]]


def expected(events: int) -> Lines:
    """The cart after the first ``events`` events of HISTORY."""
    lines: dict[str, int] = {}
    for op, product, quantity in HISTORY[:events]:
        if op == "add":
            lines[product] = lines.get(product, 0) + quantity
        else:
            del lines[product]
    return list(lines.items())


def add(product: str, quantity: int) -> api.AddLineItem:
    return api.AddLineItem(user_id=USER, product_id=product, name=product, quantity=quantity)


async def run_history(cart: api_grpc.ShoppingCartStub) -> None:
    for op, product, quantity in HISTORY:
        if op == "add":
            await cart.AddItem(add(product, quantity), timeout=10)
        else:
            await cart.RemoveItem(api.RemoveLineItem(user_id=USER, product_id=product), timeout=10)


async def get_cart(
    cart: api_grpc.ShoppingCartStub, header: tuple[str, str] | None = None
) -> tuple[Lines, str | None]:
    """The cart's lines and the state-seq response header (None without one)."""
    call = cart.GetCart(
        api.GetShoppingCart(user_id=USER), timeout=10, metadata=(header,) if header else None
    )
    reply = await call
    headers = dict(await call.initial_metadata())
    seq = headers.get(STATE_SEQ)
    return [(i.product_id, i.quantity) for i in reply.items], str(seq) if seq else None


async def journal(url: str) -> tuple[list[tuple[int, datetime]], list[int]]:
    """The cart's (seq_nr, written_at) rows and its snapshots' sequence numbers."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT seq_nr, written_at FROM event_journal"
            " WHERE persistence_id = 'shopping-cart' AND entity_id = $1 ORDER BY seq_nr",
            USER,
        )
        snapshots = await conn.fetch(
            "SELECT seq_nr FROM snapshots"
            " WHERE persistence_id = 'shopping-cart' AND entity_id = $1 ORDER BY seq_nr",
            USER,
        )
    finally:
        await conn.close()
    return [(r["seq_nr"], r["written_at"]) for r in rows], [r["seq_nr"] for r in snapshots]


def rfc3339(moment: datetime, *, offset_hours: int = 0) -> str:
    """``moment`` as RFC 3339: with Z, or with an offset."""
    if offset_hours == 0:
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.astimezone(timezone(timedelta(hours=offset_hours))).isoformat()


async def test_cart_as_of_seq_and_time(cart_system: System) -> None:
    async with grpc.aio.insecure_channel(cart_system.target) as channel:
        cart = api_grpc.ShoppingCartStub(channel)
        await run_history(cart)
        rows, snapshots = await journal(cart_system.journal_url)
        assert [seq for seq, _ in rows] == list(range(1, 13))
        assert snapshots == [5, 10]

        # By sequence number, before, at and after each snapshot; past the end
        # it is the current state.
        for seq in (0, 1, 4, 5, 6, 9, 10, 11, 12, 40):
            lines, state_seq = await get_cart(cart, (AS_OF_SEQ, str(seq)))
            assert lines == expected(min(seq, 12)), f"as of seq {seq}"
            assert state_seq == str(min(seq, 12))

        # By time, taken from the journal: at an event's written_at it counts,
        # a microsecond before it does not.
        written = dict(rows)
        tick = timedelta(microseconds=1)
        for seq in (1, 4, 5, 6, 10, 11, 12):
            at = rfc3339(written[seq], offset_hours=seq % 3)
            assert await get_cart(cart, (AS_OF_TIME, at)) == (expected(seq), str(seq))
            just_before = rfc3339(written[seq] - tick)
            assert await get_cart(cart, (AS_OF_TIME, just_before)) == (
                expected(seq - 1),
                str(seq - 1),
            )
        future = rfc3339(datetime.now(UTC) + timedelta(days=1))
        assert await get_cart(cart, (AS_OF_TIME, future)) == (expected(12), "12")


async def test_cart_as_of_is_read_only_and_leaves_the_live_cart_alone(
    cart_system: System,
) -> None:
    async with grpc.aio.insecure_channel(cart_system.target) as channel:
        cart = api_grpc.ShoppingCartStub(channel)
        await run_history(cart)
        before = await journal(cart_system.journal_url)

        for header in ((AS_OF_SEQ, "3"), (AS_OF_TIME, rfc3339(before[0][2][1]))):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await cart.AddItem(add("melon", 1), timeout=10, metadata=(header,))
            assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "as-of queries are read-only" in (failed.value.details() or "")
        assert await journal(cart_system.journal_url) == before

        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await get_cart(cart, (AS_OF_SEQ, "-3"))
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # A query beside a live command: each sees its own state.
        (past, _), _ = await asyncio.gather(
            get_cart(cart, (AS_OF_SEQ, "6")), cart.AddItem(add("melon", 4), timeout=10)
        )
        assert past == expected(6)
        assert await get_cart(cart) == ([*expected(12), ("melon", 4)], None)
        rows, snapshots = await journal(cart_system.journal_url)
        assert [seq for seq, _ in rows] == list(range(1, 14))
        assert snapshots == [5, 10]
