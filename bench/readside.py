"""`make bench-readside`: the read side on Postgres - live lag and catch-up rate.

1. lag     - writer stores standing for proxies (BENCH_READSIDE_WRITERS, 2) append
             one event per append at a steady total rate (BENCH_READSIDE_RATES
             events/s, "500,2000") to 1000 entities, in a separate process, for
             BENCH_READSIDE_SECONDS (10). A subscriber follows the log live
             through the EventLog gRPC service of a third store (as a proxy
             serving it would) and notes when each event arrives. Lag = arrival
             minus the moment the writer's append returned (its commit was
             acknowledged); both on CLOCK_MONOTONIC, shared by the processes.
2. catch-up - BENCH_READSIDE_EVENTS (200000) events already in the log, read
             from offset 0 to CaughtUp through Subscribe, and with `read_log`
             directly (pages of 1000).
Writes bench/results/readside-<timestamp>.json and the "Read side" table in
bench/README.md. DATABASE_URL as for `make bench`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import grpc

import h2grpc
from bench.loadgen import percentile
from bench.run import event_size, fresh_database, machine
from cloudstate.proxy.v1 import eventlog_pb2, eventlog_pb2_grpc
from cloudstate_proxy.journal import EventData, PostgresOptions, PostgresStore
from cloudstate_proxy.readside import EventLogService

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
P = "bench.Cart"
TYPE_URL = "type.googleapis.com/com.example.shoppingcart.ItemAdded"
ENTITIES = 1000


# -- the writer process --------------------------------------------------------------


async def write_steadily(url: str, rate: float, seconds: float, writers: int) -> dict[str, Any]:
    """Append one event at a time at ``rate`` events/s in total; every entity
    belongs to one store (as to one proxy) and has one append in flight at most."""
    stores = [PostgresStore(url, PostgresOptions(max_pool_size=4)) for _ in range(writers)]
    for store in stores:
        await store.start()
    payload = EventData(TYPE_URL, b"x" * event_size())
    idle = deque(range(ENTITIES))
    seqs = [0] * ENTITIES
    acks: list[tuple[int, int, float]] = []
    skipped = 0

    async def append(entity: int) -> None:
        store = stores[entity % writers]
        await store.append(P, f"cart-{entity}", seqs[entity], [payload])
        acks.append((entity, seqs[entity] + 1, time.monotonic()))
        seqs[entity] += 1
        idle.append(entity)

    tasks: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    issued = 0
    while (now := time.monotonic()) < started + seconds:
        for _ in range(int((now - started) * rate) - issued):
            issued += 1
            if not idle:  # every entity busy: the store cannot keep up with the rate
                skipped += 1
                continue
            task = asyncio.create_task(append(idle.popleft()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(0.002)  # pacing of the generator, not synchronisation
    await asyncio.gather(*tasks)
    for store in stores:
        await store.close()
    return {"acks": acks, "skipped": skipped}


# -- the subscriber side -----------------------------------------------------------


class Subscriber:
    """Follows the log through the EventLog service and notes arrival times."""

    def __init__(self, stub: Any, after_offset: int) -> None:
        self.arrivals: dict[tuple[int, int], float] = {}
        self.caught_up = asyncio.Event()
        self._expected: int | None = None
        self._complete = asyncio.Event()
        self._call = stub.Subscribe(
            eventlog_pb2.SubscribeRequest(after_offset=after_offset, follow=True)
        )
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for response in self._call:
            now = time.monotonic()
            if response.WhichOneof("message") == "caught_up":
                self.caught_up.set()
                continue
            entity = int(response.event.entity_id.removeprefix("cart-"))
            self.arrivals[(entity, response.event.sequence)] = now
            if self._expected is not None and len(self.arrivals) >= self._expected:
                self._complete.set()

    async def all_arrived(self, expected: int, within: float) -> None:
        """Until ``expected`` events arrived, or ``within`` seconds passed."""
        self._expected = expected
        if len(self.arrivals) >= expected:
            return
        try:
            await asyncio.wait_for(self._complete.wait(), within)
        except TimeoutError:
            pass  # reported as missing

    async def close(self) -> None:
        self._call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def serve_event_log(store: PostgresStore) -> tuple[grpc.aio.Server, int]:
    server = h2grpc.server()
    EventLogService(store).add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def lag_run(url: str, rate: float, seconds: float, writers: int) -> dict[str, Any]:
    async with PostgresStore(url) as store:
        server, port = await serve_event_log(store)
        head = (await store.read_log(0, limit=1)).end_offset
        async with h2grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            subscriber = Subscriber(eventlog_pb2_grpc.EventLogStub(channel), head)
            await asyncio.wait_for(subscriber.caught_up.wait(), 30)
            result = await run_writer(url, rate, seconds, writers)
            acks = {(e, s): t for e, s, t in result["acks"]}
            await subscriber.all_arrived(len(acks), within=30)
            await subscriber.close()
        await server.stop(1)
    lags = sorted(subscriber.arrivals[k] - t for k, t in acks.items() if k in subscriber.arrivals)
    return {
        "name": f"live lag, {rate:,.0f} events/s from {writers} writer stores",
        "target_rate": rate,
        "events": len(acks),
        "achieved_rate": len(acks) / seconds,
        "skipped": result["skipped"],
        "missing": len(acks) - len(lags),
        "p50_ms": percentile(lags, 0.5) * 1000,
        "p99_ms": percentile(lags, 0.99) * 1000,
        "max_ms": (lags[-1] if lags else float("nan")) * 1000,
    }


async def run_writer(url: str, rate: float, seconds: float, writers: int) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.readside",
        "writer",
        url,
        str(rate),
        str(seconds),
        str(writers),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"writer process failed with status {process.returncode}")
    result: dict[str, Any] = json.loads(out)
    return result


async def catch_up_run(url: str, total: int) -> list[dict[str, Any]]:
    payload = EventData(TYPE_URL, b"x" * event_size())
    async with PostgresStore(url, PostgresOptions(max_pool_size=8)) as store:
        per_entity = 1000
        for start in range(0, total // per_entity, 50):
            await asyncio.gather(
                *(
                    store.append(P, f"bulk-{e}", 0, [payload] * per_entity)
                    for e in range(start, min(start + 50, total // per_entity))
                )
            )
        server, port = await serve_event_log(store)
        through_grpc = []
        async with h2grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = eventlog_pb2_grpc.EventLogStub(channel)
            for max_batch in (1, 256):
                began = time.perf_counter()
                count = 0
                request = eventlog_pb2.SubscribeRequest(max_batch=max_batch)
                async for response in stub.Subscribe(request):
                    kind = response.WhichOneof("message")
                    count += len(response.events.events) if kind == "events" else kind == "event"
                through_grpc.append((max_batch, count, time.perf_counter() - began))
        await server.stop(1)
        began = time.perf_counter()
        direct, cursor, full = 0, 0, True
        while full:
            page = await store.read_log(cursor, limit=1000)
            direct += len(page.events)
            cursor, full = page.end_offset, page.full
        direct_seconds = time.perf_counter() - began
    return [
        *(
            {
                "name": f"catch-up through Subscribe (gRPC), {per} event(s) per message",
                "events": count,
                "seconds": seconds,
            }
            for per, count, seconds in through_grpc
        ),
        {"name": "catch-up with read_log (store)", "events": direct, "seconds": direct_seconds},
    ]


# -- report ----------------------------------------------------------------------------


def tables(lag: list[dict[str, Any]], catch_up: list[dict[str, Any]]) -> str:
    rows = [
        "| run | events | achieved/s | p50 ms | p99 ms | max ms | missing |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in lag:
        rows.append(
            f"| {r['name']} | {r['events']:,} | {r['achieved_rate']:,.0f} | {r['p50_ms']:.1f} |"
            f" {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['missing']} |"
        )
    rows += ["", "| catch-up | events | seconds | events/s |", "|---|---|---|---|"]
    for r in catch_up:
        rate = r["events"] / r["seconds"]
        rows.append(f"| {r['name']} | {r['events']:,} | {r['seconds']:.2f} | {rate:,.0f} |")
    return "\n".join(rows)


def write_readme(text: str) -> None:
    readme = BENCH / "README.md"
    content = readme.read_text()
    start, end = "<!-- readside:start -->", "<!-- readside:end -->"
    if start not in content:
        content += f"\n{start}\n{end}\n"
    before, _, rest = content.partition(start)
    _, _, after = rest.partition(end)
    readme.write_text(f"{before}{start}\n{text}\n{end}{after}")


async def main() -> None:
    admin_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    rates = [float(r) for r in os.environ.get("BENCH_READSIDE_RATES", "500,2000").split(",")]
    seconds = float(os.environ.get("BENCH_READSIDE_SECONDS", "10"))
    writers = int(os.environ.get("BENCH_READSIDE_WRITERS", "2"))
    total = int(os.environ.get("BENCH_READSIDE_EVENTS", "200000"))
    lag = []
    for rate in rates:
        lag.append(await lag_run(await fresh_database(admin_url), rate, seconds, writers))
        print(lag[-1])
    catch_up = await catch_up_run(await fresh_database(admin_url), total)
    print(catch_up)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    m = machine()
    record = {"when": stamp, "machine": m, "lag": lag, "catch_up": catch_up}
    out = BENCH / "results" / f"readside-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    text = (
        f"Run {stamp} on {m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}; "
        f"writers, subscriber and Postgres on the same machine. "
        f"Raw data: `bench/results/{out.name}`.\n\n{tables(lag, catch_up)}"
    )
    write_readme(text)
    print(text)


def _writer_main(url: str, rate: str, seconds: str, writers: str) -> None:
    result = asyncio.run(write_steadily(url, float(rate), float(seconds), int(writers)))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if sys.argv[1:2] == ["writer"]:
        _writer_main(*sys.argv[2:6])
    else:
        asyncio.run(main())
