"""A cluster member in a process of its own, for tests that freeze, kill or
skew the clock of one node (tests/cluster/test_cluster_process.py).

    python -m tests.cluster.member_process DSN NODE_ID PEER_ADDRESS
        [--skew-hours H] [--heartbeat S] [--lease S]

With ``--skew-hours`` the process's wall clock (``time.time``, ``time.time_ns``
and ``datetime.now``/``utcnow``/``today``) runs that many hours off, before
anything else is imported. It prints one JSON object per line on stdout:
``{"event": "clock", "time": ...}`` first, then ``{"event": "members",
"version": v, "members": [ids]}`` for each snapshot and ``{"event": "log",
"level": ..., "message": ...}`` for each log record. SIGTERM leaves the
cluster and exits 0.
"""

from __future__ import annotations

import argparse
import datetime as datetime_module
import json
import time


def skew_wall_clock(hours: float) -> None:
    offset = hours * 3600
    real_time = time.time
    shift = datetime_module.timedelta(seconds=offset)

    class SkewedDatetime(datetime_module.datetime):
        @classmethod
        def now(cls, tz: datetime_module.tzinfo | None = None) -> SkewedDatetime:
            moment = datetime_module.datetime.fromtimestamp(real_time(), tz) + shift
            return cls.combine(moment.date(), moment.timetz())

        @classmethod
        def utcnow(cls) -> SkewedDatetime:
            return cls.now(datetime_module.UTC).replace(tzinfo=None)

        @classmethod
        def today(cls) -> SkewedDatetime:
            return cls.now()

    time.time = lambda: real_time() + offset
    time.time_ns = lambda: int((real_time() + offset) * 1e9)
    datetime_module.datetime = SkewedDatetime  # type: ignore[misc]


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("node_id")
    parser.add_argument("peer_address")
    parser.add_argument("--skew-hours", type=float, default=0.0)
    parser.add_argument("--heartbeat", type=float, default=0.2)
    parser.add_argument("--lease", type=float, default=1.0)
    args = parser.parse_args()
    if args.skew_hours:
        skew_wall_clock(args.skew_hours)
    # Imported only now, so that every module sees the skewed clock.
    import asyncio

    asyncio.run(run(args))


async def run(args: argparse.Namespace) -> None:
    import asyncio
    import logging
    import signal

    from cloudstate_proxy.cluster import Member, PostgresMembership, PostgresMembershipOptions

    class Emit(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            emit("log", level=record.levelname, message=record.getMessage())

    logging.basicConfig(level=logging.INFO, handlers=[Emit()])
    from datetime import datetime

    emit("clock", time=time.time(), now=datetime.now().timestamp())
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    options = PostgresMembershipOptions(heartbeat_interval=args.heartbeat, lease_timeout=args.lease)
    membership = PostgresMembership(args.dsn, Member(args.node_id, args.peer_address), options)
    async with membership:

        async def report() -> None:
            async for snapshot in membership.watch():
                ids = [m.node_id for m in snapshot.members]
                emit("members", version=snapshot.version, members=ids)

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(report())
            await stop.wait()
            await membership.close()  # ends report()
    emit("closed")


if __name__ == "__main__":
    main()
