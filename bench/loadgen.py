"""An asyncio gRPC load generator: N concurrent clients over M entities for D seconds.

Each client loops: pick the next entity, send one unary call, wait for the
reply, record the latency. Requests are pre-serialized bytes, so the generator
spends no time in protobuf and measures the same work against any server (the
proxy, or the bare echo server that gives the transport ceiling).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import grpc

import h2grpc
from bench.cpu import CpuMeter


@dataclass(frozen=True)
class LoadResult:
    name: str
    clients: int
    entities: int
    seconds: float
    ok: int
    errors: dict[str, int]
    per_second: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    # Microseconds of CPU per successful call, by process (see bench/cpu.py);
    # "machine" is the busy time of all cores, whoever used it.
    cpu_us_per_call: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def client_stack() -> str:
    """The generator's gRPC client: ``h2grpc`` (default: the cheapest per call,
    so the machine's cores go to what is measured) or ``grpcio`` (grpc.aio),
    chosen with BENCH_CLIENT."""
    stack = os.environ.get("BENCH_CLIENT", "h2grpc")
    if stack not in ("h2grpc", "grpcio"):
        raise SystemExit(f"BENCH_CLIENT must be h2grpc or grpcio, not {stack!r}")
    return stack


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


async def run_load(
    name: str,
    target: str,
    method: str,
    requests: Sequence[bytes],
    clients: int,
    seconds: float,
    warmup: float = 1.0,
    call_timeout: float = 10.0,
    meter: CpuMeter | None = None,
) -> LoadResult:
    """Drive ``method`` at ``target`` with ``clients`` concurrent loops.

    Client i sends requests[i], requests[i + clients], ... in turn, so with
    len(requests) entities every entity gets traffic and no two clients share
    an entity's turn at once more than the spread allows. Calls that start
    during ``warmup`` are not counted; ``meter`` measures CPU over the same window.
    """
    options = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]
    if client_stack() == "grpcio":
        channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(4)]
    else:
        channels = [h2grpc.insecure_channel(target, options=options) for _ in range(4)]
    try:
        calls = [
            ch.unary_unary(method, request_serializer=None, response_deserializer=None)
            for ch in channels
        ]
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + seconds
        if meter is not None:
            loop = asyncio.get_running_loop()
            loop.call_later(warmup, meter.start)
            loop.call_later(warmup + seconds, meter.stop)

        async def client(index: int) -> None:
            call: Callable[..., object] = calls[index % len(calls)]
            position = index
            while True:
                request = requests[position % len(requests)]
                position += clients
                began = time.perf_counter()
                if began >= stop_at:
                    return
                try:
                    await call(request, timeout=call_timeout)  # type: ignore[misc]
                    status = None
                except grpc.aio.AioRpcError as exc:
                    status = exc.code().name
                if began >= measure_from:
                    if status is None:
                        latencies.append(time.perf_counter() - began)
                    else:
                        errors[status] += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
        latencies.sort()
        cpu = meter.seconds() if meter is not None else {}
        return LoadResult(
            name=name,
            clients=clients,
            entities=len(requests),
            seconds=seconds,
            ok=len(latencies),
            errors=dict(errors),
            per_second=len(latencies) / seconds,
            p50_ms=percentile(latencies, 0.50) * 1000,
            p99_ms=percentile(latencies, 0.99) * 1000,
            p999_ms=percentile(latencies, 0.999) * 1000,
            cpu_us_per_call={k: v / len(latencies) * 1e6 for k, v in cpu.items() if latencies},
        )
    finally:
        for ch in channels:
            await ch.close()
