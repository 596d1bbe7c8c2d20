"""`make bench-cluster`: the shopping cart on one proxy node and on three.

Measures, with the load generator of `make bench` (bench/loadgen.py):
  1. one node     - AddItem from N clients over M carts against a single proxy
                    (with its user function) on Postgres;
  2. three nodes  - the same load, clients spread evenly over three proxies
                    (each with its own user function) sharing one Postgres; a
                    command reaching a node that does not own its cart is
                    forwarded to the owner (about two in three);
  3. the hop      - latency at low load (BENCH_HOP_CLIENTS clients) of calls to
                    one node for carts it owns, then for carts another node owns.
Writes bench/results/cluster-<timestamp>.json and the table in the "Cluster"
section of bench/README.md. Environment: DATABASE_URL (default
postgresql://postgres@127.0.0.1:5432/test), BENCH_CLIENTS (64), BENCH_ENTITIES
(1000), BENCH_SECONDS (15), BENCH_HOP_CLIENTS (4).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.loadgen import LoadResult, run_load
from bench.run import ADD_ITEM, BENCH, cart_requests, fresh_database, machine
from cloudstate_proxy.cluster import HashRing, Member
from examples.shoppingcart import shoppingcart_pb2
from tools.launch import ManagedProcess, free_port
from tools.run_cluster import NodeSpec, start_node

CART_PID = "shopping-cart"
START, END = "<!-- cluster-results:start -->", "<!-- cluster-results:end -->"


def node_specs(count: int) -> list[NodeSpec]:
    return [
        NodeSpec(f"node-{chr(ord('a') + i)}", free_port(), free_port(), free_port())
        for i in range(count)
    ]


async def start_cluster(specs: Sequence[NodeSpec], journal_url: str) -> list[ManagedProcess]:
    logs = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    started: list[ManagedProcess] = []
    try:
        for spec in specs:
            await asyncio.to_thread(
                start_node, spec, journal_url, logs, started, ["--log-level", "warning"]
            )
    except BaseException:
        stop(started)
        raise
    return started


def stop(processes: Sequence[ManagedProcess]) -> None:
    for process in processes:
        process.stop()


def combine(name: str, parts: Sequence[LoadResult]) -> LoadResult:
    """One row for concurrent runs against several nodes: counts add up; the
    percentiles are the worst node's (the raw latencies are not kept)."""
    errors: dict[str, int] = {}
    for part in parts:
        for key, value in part.errors.items():
            errors[key] = errors.get(key, 0) + value
    return LoadResult(
        name=name,
        clients=sum(p.clients for p in parts),
        entities=sum(p.entities for p in parts),
        seconds=parts[0].seconds,
        ok=sum(p.ok for p in parts),
        errors=errors,
        per_second=sum(p.per_second for p in parts),
        p50_ms=max(p.p50_ms for p in parts),
        p99_ms=max(p.p99_ms for p in parts),
        p999_ms=max(p.p999_ms for p in parts),
    )


async def one_node(
    admin_url: str, requests: list[bytes], clients: int, seconds: float
) -> LoadResult:
    [spec] = node_specs(1)
    processes = await start_cluster([spec], await fresh_database(admin_url))
    try:
        return await run_load(
            "1 node", f"127.0.0.1:{spec.client_port}", ADD_ITEM, requests, clients, seconds
        )
    finally:
        stop(processes)


async def three_nodes(
    admin_url: str, entities: int, clients: int, seconds: float, hop_clients: int
) -> list[LoadResult]:
    specs = node_specs(3)
    processes = await start_cluster(specs, await fresh_database(admin_url))
    try:
        # Client i of node k sends carts k, k+3, k+6, ...: the carts split evenly
        # and every node receives carts that other nodes own.
        parts = await asyncio.gather(
            *(
                run_load(
                    spec.node_id,
                    f"127.0.0.1:{spec.client_port}",
                    ADD_ITEM,
                    cart_requests_of(range(k, entities, 3)),
                    clients // 3 + (k < clients % 3),
                    seconds,
                )
                for k, spec in enumerate(specs)
            )
        )
        spread = combine("3 nodes, clients spread over all", parts)
        return [spread, *await hop_latency(specs, entities, hop_clients, seconds)]
    finally:
        stop(processes)


async def hop_latency(
    specs: Sequence[NodeSpec], entities: int, clients: int, seconds: float
) -> list[LoadResult]:
    """Calls to the first node for carts it owns, then for carts others own."""
    ring = HashRing([Member(s.node_id, f"127.0.0.1:{s.peer_port}") for s in specs])
    first = specs[0]
    carts = range(entities)
    own = [n for n in carts if ring.owner(CART_PID, f"cart-{n}").node_id == first.node_id]
    other = [n for n in carts if ring.owner(CART_PID, f"cart-{n}").node_id != first.node_id]
    target = f"127.0.0.1:{first.client_port}"
    local = await run_load(
        "hop: keys the node owns", target, ADD_ITEM, cart_requests_of(own), clients, seconds
    )
    forwarded = await run_load(
        "hop: keys another node owns", target, ADD_ITEM, cart_requests_of(other), clients, seconds
    )
    return [local, forwarded]


def cart_requests_of(numbers: Sequence[int] | range) -> list[bytes]:
    return [
        shoppingcart_pb2.AddLineItem(
            user_id=f"cart-{n}", product_id="p1", name="Product", quantity=1
        ).SerializeToString()
        for n in numbers
    ]


def table(results: Sequence[LoadResult]) -> str:
    rows = [
        "| run | clients | entities | ok/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "0"
        rows.append(
            f"| {r.name} | {r.clients} | {r.entities} | {r.per_second:,.0f} | {r.p50_ms:.1f} |"
            f" {r.p99_ms:.1f} | {errors} |"
        )
    return "\n".join(rows)


def write_readme(text: str) -> None:
    readme = BENCH / "README.md"
    content = readme.read_text()
    before, _, rest = content.partition(START)
    _, _, after = rest.partition(END)
    readme.write_text(f"{before}{START}\n{text}\n{END}{after}")


async def main() -> None:
    admin_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    clients = int(os.environ.get("BENCH_CLIENTS", "64"))
    entities = int(os.environ.get("BENCH_ENTITIES", "1000"))
    seconds = float(os.environ.get("BENCH_SECONDS", "15"))
    hop_clients = int(os.environ.get("BENCH_HOP_CLIENTS", "4"))
    single = await one_node(admin_url, cart_requests(entities), clients, seconds)
    print(single)
    cluster = await three_nodes(admin_url, entities, clients, seconds, hop_clients)
    for result in cluster:
        print(result)
    results = [single, *cluster]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    m = machine()
    record = {"when": stamp, "machine": m, "results": [r.as_dict() for r in results]}
    out = BENCH / "results" / f"cluster-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    text = (
        f"Run {stamp} on {m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}: the "
        f"three proxies, three user functions, Postgres and the generator all share these "
        f"{m['cpus']} cores. Raw data: `bench/results/{out.name}`.\n\n{table(results)}"
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
