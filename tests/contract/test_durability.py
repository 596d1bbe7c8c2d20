"""Nothing acknowledged is lost when the process is killed (DESIGN invariant 4).

A child process appends to many entities concurrently and prints each append
once the store has acknowledged it; the test kills it with SIGKILL mid-stream
and checks, in a fresh store, that every acknowledged event is there and that
each history has no gap.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

from cloudstate_proxy.journal import Store, open_store

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
ENTITIES = 20

WRITER = f"""
import asyncio, sys
from cloudstate_proxy.journal import EventData, open_store

async def entity(store, name):
    seq_nr = await store.highest_seq_nr("p", name)
    while True:
        await store.append("p", name, seq_nr, [EventData("t", str(seq_nr + 1).encode())])
        seq_nr += 1
        print(name, seq_nr, flush=True)

async def main(url):
    async with open_store(url) as store:
        await asyncio.gather(*(entity(store, f"e{{i}}") for i in range({ENTITIES})))

asyncio.run(main(sys.argv[1]))
"""


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/journal.db"
    url: str = request.getfixturevalue("postgres_database")
    return url


async def test_kill_9_loses_no_acknowledged_append(store_url: str) -> None:
    acked = await _run_and_kill(store_url, acks_before_kill=300)
    assert sum(acked.values()) >= 300
    store = open_store(store_url)
    async with store:
        for name, last_acked in acked.items():
            await _assert_history_complete(store, name, last_acked)


async def _run_and_kill(url: str, acks_before_kill: int) -> dict[str, int]:
    """Run the writer until it acknowledged enough appends, SIGKILL it, and
    return the highest acknowledged sequence number per entity."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, url, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    acked: dict[str, int] = {}
    try:
        async with asyncio.timeout(60):
            while sum(acked.values()) < acks_before_kill:
                line = await child.stdout.readline()
                assert line, "the writer exited early"
                name, seq_nr = line.decode().split()
                acked[name] = int(seq_nr)
        child.send_signal(signal.SIGKILL)
        # Acknowledgements printed before the kill still count.
        rest, _ = await asyncio.wait_for(child.communicate(), 30)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    # Only whole lines: the kill can cut the writer off in the middle of one
    # (what follows the last newline), and a cut line proves nothing.
    for text in rest.decode().split("\n")[:-1]:
        name, seq_nr = text.split()
        acked[name] = int(seq_nr)
    return acked


async def _assert_history_complete(store: Store, name: str, last_acked: int) -> None:
    events = [e async for e in store.read_events("p", name)]
    assert len(events) >= last_acked, f"{name}: acknowledged {last_acked}, found {len(events)}"
    assert [e.seq_nr for e in events] == list(range(1, len(events) + 1))
    assert [e.payload for e in events] == [str(e.seq_nr).encode() for e in events]
