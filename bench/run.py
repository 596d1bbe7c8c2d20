"""`make bench`: the proxy under load beside this machine's ceilings, in one run.

Measures, with the same generator and in the same run:
  1. echo      - a bare grpc.aio server (the transport ceiling), and the same
                 on h2grpc (what the built-in stack costs);
  2. storage   - a raw asyncpg loop inserting one event row per transaction
                 (the storage ceiling for per-command commits);
  3. protocol  - bench/protocol_ceiling.py in front of the cart user function:
                 one handle stream per entity, no journal, no logic (what any
                 proxy speaking this protocol through h2grpc could reach);
  4. proxy     - the shopping cart behind `cloudstate-proxy serve` on Postgres:
                 AddItem commands from N clients over M carts.
Each run also measures the CPU time every process spends per call (bench/cpu.py).
Writes bench/results/<timestamp>.json and the tables in bench/README.md.
Environment: DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test),
BENCH_CLIENTS (64), BENCH_ENTITIES (1000), BENCH_SECONDS (15), BENCH_CLIENT
(the generator's gRPC client: h2grpc or grpcio), BENCH_PROXY_LOG (the proxy's
log level, WARNING).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from bench.cpu import MACHINE, CpuMeter, pids_named
from bench.loadgen import LoadResult, percentile, run_load
from examples.shoppingcart import domain_pb2, shoppingcart_pb2
from tools.launch import (
    ManagedProcess,
    free_port,
    start_proxy,
    start_user_function,
    wait_port,
    wait_serving,
)

BENCH = Path(__file__).resolve().parent
# The proxy's log level in the proxy run: BENCH_PROXY_LOG=INFO shows, for one,
# how well the journal grouped appends (logged when the proxy stops).
_PROXY_LOG_LEVEL = os.environ.get("BENCH_PROXY_LOG", "WARNING")
ADD_ITEM = "/com.example.shoppingcart.ShoppingCart/AddItem"


def cart_requests(entities: int) -> list[bytes]:
    return [
        shoppingcart_pb2.AddLineItem(
            user_id=f"cart-{i}", product_id="p1", name="Product", quantity=1
        ).SerializeToString()
        for i in range(entities)
    ]


def event_size() -> int:
    event = domain_pb2.ItemAdded(
        item=domain_pb2.LineItem(productId="p1", name="Product", quantity=1)
    )
    return len(event.SerializeToString())


async def fresh_database(admin_url: str) -> str:
    """Create an empty database beside ``admin_url``'s and return its URL."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return urlsplit(admin_url)._replace(path=f"/{name}").geturl()


async def storage_ceiling(url: str, clients: int, seconds: float) -> LoadResult:
    """One INSERT per transaction from ``clients`` concurrent workers."""
    payload = b"x" * event_size()
    pool = await asyncpg.create_pool(url, min_size=10, max_size=10)
    assert pool is not None
    await pool.execute(
        "CREATE TABLE bench_events (pid text, eid text, seq bigint, type_url text,"
        " payload bytea, written_at timestamptz DEFAULT now(), PRIMARY KEY (pid, eid, seq))"
    )
    latencies: list[float] = []
    meter = CpuMeter({"generator": _this_process, "postgres": _postgres})
    meter.start()
    stop_at = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        seq = 0
        while time.perf_counter() < stop_at:
            seq += 1
            began = time.perf_counter()
            await pool.execute(
                "INSERT INTO bench_events (pid, eid, seq, type_url, payload)"
                " VALUES ($1, $2, $3, $4, $5)",
                "bench",
                f"e{index}",
                seq,
                "type.googleapis.com/x.ItemAdded",
                payload,
            )
            latencies.append(time.perf_counter() - began)

    try:
        await asyncio.gather(*(worker(i) for i in range(clients)))
        meter.stop()
    finally:
        await pool.close()
    latencies.sort()
    cpu = meter.seconds()
    return LoadResult(
        name="storage ceiling (asyncpg, 1 insert/tx)",
        clients=clients,
        entities=clients,
        seconds=seconds,
        ok=len(latencies),
        errors={},
        per_second=len(latencies) / seconds,
        p50_ms=percentile(latencies, 0.5) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        p999_ms=percentile(latencies, 0.999) * 1000,
        cpu_us_per_call={k: v / len(latencies) * 1e6 for k, v in cpu.items() if latencies},
    )


def _this_process() -> list[int]:
    return [os.getpid()]


def _postgres() -> list[int]:
    # Every process of a Postgres server on this machine (none when it runs
    # elsewhere); other databases' work in the window counts too.
    return pids_named("postgres")


async def echo_ceiling(
    requests: list[bytes], clients: int, seconds: float, stack: str = "grpcio"
) -> LoadResult:
    port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="bench-"))
    server = ManagedProcess(
        "echo",
        [sys.executable, "-m", "bench.echo_server", str(port), stack],
        logs / "echo.log",
    ).start()
    try:
        wait_port(port, process=server)
        name = "bare grpc.aio echo" if stack == "grpcio" else "bare h2grpc echo"
        return await run_load(
            f"transport ceiling ({name})",
            f"127.0.0.1:{port}",
            ADD_ITEM,
            requests,
            clients,
            seconds,
            meter=CpuMeter({"generator": _this_process, "server": lambda: [server.pid]}),
        )
    finally:
        server.stop()


async def protocol_ceiling(requests: list[bytes], clients: int, seconds: float) -> LoadResult:
    uf_port, port = free_port(), free_port()
    logs = Path(tempfile.mkdtemp(prefix="bench-"))
    user_function = start_user_function("examples.shoppingcart", uf_port, logs)
    args = [sys.executable, "-m", "bench.protocol_ceiling", str(port), str(uf_port)]
    server = ManagedProcess("protocol ceiling", args, logs / "protocol-ceiling.log")
    try:
        wait_port(uf_port, process=user_function)
        server.start()
        wait_port(port, process=server)
        groups = {
            "generator": _this_process,
            "server": lambda: [server.pid],
            "user function": lambda: [user_function.pid],
        }
        return await run_load(
            "protocol ceiling (handle streams, no journal, no logic)",
            f"127.0.0.1:{port}",
            ADD_ITEM,
            requests,
            clients,
            seconds,
            meter=CpuMeter(groups),
        )
    finally:
        server.stop()
        user_function.stop()


async def proxy_load(
    journal_url: str, requests: list[bytes], clients: int, seconds: float
) -> LoadResult:
    uf_port, port = free_port(), free_port()
    logs = Path(tempfile.mkdtemp(prefix="bench-"))
    user_function = start_user_function("examples.shoppingcart", uf_port, logs)
    proxy = None
    try:
        wait_port(uf_port, process=user_function)
        proxy = start_proxy(
            uf_port, port, journal_url, logs, extra_args=["--log-level", _PROXY_LOG_LEVEL]
        )
        wait_serving(f"127.0.0.1:{port}", process=proxy)
        groups = {
            "generator": _this_process,
            "server": lambda: [proxy.pid] if proxy is not None else [],
            "user function": lambda: [user_function.pid],
            "postgres": _postgres,
        }
        return await run_load(
            "proxy: shopping cart AddItem on Postgres",
            f"127.0.0.1:{port}",
            ADD_ITEM,
            requests,
            clients,
            seconds,
            meter=CpuMeter(groups),
        )
    finally:
        if proxy is not None:
            proxy.stop()
        user_function.stop()


def machine() -> dict[str, object]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version()}


def table(results: list[LoadResult], echo: LoadResult) -> str:
    rows = [
        "| run | clients | entities | ok/s | p50 ms | p99 ms | p99.9 ms | errors | of echo |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "0"
        rows.append(
            f"| {r.name} | {r.clients} | {r.entities} | {r.per_second:,.0f} | {r.p50_ms:.1f} |"
            f" {r.p99_ms:.1f} | {r.p999_ms:.1f} | {errors} | {r.per_second / echo.per_second:.2f} |"
        )
    return "\n".join(rows)


_CPU_COLUMNS = ("generator", "server", "user function", "postgres")


def cpu_table(results: list[LoadResult]) -> str:
    """Microseconds of CPU per call by process; "everything else" is the rest of
    the machine's busy time in the window (other work on a shared machine)."""
    rows = [
        "| run | generator | server (echo or proxy) | user function | postgres"
        " | everything else | machine busy (cores) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cpu = r.cpu_us_per_call
        cells = [f"{cpu[k]:.0f}" if k in cpu else "-" for k in _CPU_COLUMNS]
        machine_us = cpu.get(MACHINE)
        if machine_us is None:
            rest = cores = "-"
        else:
            rest = f"{machine_us - sum(cpu.get(k, 0.0) for k in _CPU_COLUMNS):.0f}"
            cores = f"{machine_us * r.per_second / 1e6:.2f}"
        rows.append(f"| {r.name} | {' | '.join(cells)} | {rest} | {cores} |")
    return "\n".join(rows)


def write_readme(text: str) -> None:
    readme = BENCH / "README.md"
    content = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    before, _, rest = content.partition(start)
    _, _, after = rest.partition(end)
    readme.write_text(f"{before}{start}\n{text}\n{end}{after}")


async def main() -> None:
    admin_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    clients = int(os.environ.get("BENCH_CLIENTS", "64"))
    entities = int(os.environ.get("BENCH_ENTITIES", "1000"))
    seconds = float(os.environ.get("BENCH_SECONDS", "15"))
    requests = cart_requests(entities)
    # The generator's own collector settings, as the servers it drives use.
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)
    echo = await echo_ceiling(requests, clients, seconds)
    print(echo)
    own_echo = await echo_ceiling(requests, clients, seconds, stack="h2grpc")
    print(own_echo)
    storage = await storage_ceiling(await fresh_database(admin_url), clients, seconds)
    print(storage)
    protocol = await protocol_ceiling(requests, clients, seconds)
    print(protocol)
    proxy = await proxy_load(await fresh_database(admin_url), requests, clients, seconds)
    print(proxy)
    results = [echo, own_echo, storage, protocol, proxy]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    record = {
        "when": stamp,
        "machine": machine(),
        "results": [r.as_dict() for r in results],
    }
    out = BENCH / "results" / f"{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    m = machine()
    text = (
        f"Run {stamp} on {m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}; "
        f"proxy, user function, Postgres and generator on the same machine; "
        f"{seconds:g} s timed per run after 1 s of warm-up. "
        f"Raw data: `bench/results/{out.name}`.\n\n{table(results, echo)}\n\n"
        f"CPU time per call (µs) by process, in the same windows:\n\n{cpu_table(results)}"
    )
    write_readme(text)
    print(text)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
