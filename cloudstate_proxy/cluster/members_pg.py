"""Membership in the shared Postgres: a table of heartbeats (`PostgresMembership`).

Each node owns one row of ``cluster_members`` (cluster, node id) and renews it
every ``heartbeat_interval``. A row is live while its ``heartbeat_at`` is newer
than ``lease_timeout``; the live rows are the members. Every timestamp is the
DATABASE's ``now()``, written and compared inside SQL: the nodes' own clocks
never enter the decision, so clock skew between nodes cannot make a healthy
node look dead (or a dead one alive). The local clock only measures, on each
node, how long ago its own last renewal was sent.

- JOIN (`start`): claim the row - insert it, or take it over if it is ours,
  or if its previous holder's lease has lapsed. A row held by another live
  process (same node id) is never taken: `start` waits up to one lease for it
  to lapse, then raises `NodeIdInUse`. Then NOTIFY, so the others re-read at
  once instead of at their next heartbeat.
- HEARTBEAT: the same claim statement, which in the same round trip reads the
  live rows; this node's lease is renewed and its view refreshed together.
- FAILURE DETECTION: a node that stops renewing (crashed, frozen, cut off from
  Postgres) drops out of everyone's view once its lease lapses.
- LEAVE (`close`): delete the row and NOTIFY; the others drop this node at once.

Own lease. A renewal sent at local time ``t`` (a clock that keeps counting
while the machine is suspended) sets ``heartbeat_at`` to the database's time
of the statement, which is no earlier than ``t``; the others keep this node
until ``heartbeat_at + lease_timeout``. So the node is surely a member until
``t + lease_timeout`` and `self_lease_valid` says so only until then. A node
that was frozen (SIGSTOP, a VM pause) or partitioned from Postgres thus knows
on waking that the others may have dropped it; its next successful renewal
makes it a member again. (The argument needs the database clock to advance at
the rate of real time, as NTP's slewing keeps it; a step of the database
clock can briefly drop live nodes or keep dead ones, which the journal's
fencing still makes safe.)

Failures never end the heartbeat task: a failing round is logged once (and
its recovery once), the connection is reopened, and the next round retries.
Membership uses its own connection, not the journal's pool, so heartbeats
never queue behind journal load. The ``cluster`` name separates the proxies of
different services sharing one database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Self, TypeVar

import asyncpg

from ..journal.common import redact_url
from . import members_schema as schema
from .member import Member, check_name
from .membership import MembershipSnapshot, MembershipUnavailable, NodeIdInUse, SnapshotPublisher

T = TypeVar("T")
log = logging.getLogger(__name__)

_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes TimeoutError
    asyncpg.InterfaceError,
    asyncpg.PostgresError,
    asyncpg.exceptions.InternalClientError,
)


def lease_clock() -> float:
    """Seconds on a local clock that never jumps and keeps counting while the
    machine is suspended (CLOCK_BOOTTIME where available, else monotonic)."""
    if _BOOTTIME is not None:
        return time.clock_gettime(_BOOTTIME)
    return time.monotonic()


_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


@dataclass(frozen=True, slots=True)
class PostgresMembershipOptions:
    """Tuning of a `PostgresMembership`; times in seconds.

    ``lease_timeout`` must be at least twice ``heartbeat_interval`` so that one
    slow or lost heartbeat does not drop a healthy node. A round (renewal plus
    read, reconnecting if needed) may take at most half the lease.
    """

    # Nodes of one cluster see each other; other clusters in the database are ignored.
    cluster: str = "default"
    heartbeat_interval: float = 1.0
    lease_timeout: float = 5.0
    # Opening the connection and preparing the schema at start.
    connect_timeout: float = 5.0
    # Leaving the cluster at close.
    close_timeout: float = 5.0
    application_name: str = "cloudstate-proxy-membership"

    def __post_init__(self) -> None:
        check_name("cluster name", self.cluster)
        for name in ("heartbeat_interval", "connect_timeout", "close_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if not self.lease_timeout >= 2 * self.heartbeat_interval:
            raise ValueError(
                f"lease_timeout ({self.lease_timeout}s) must be at least twice "
                f"heartbeat_interval ({self.heartbeat_interval}s)"
            )

    @property
    def round_timeout(self) -> float:
        return self.lease_timeout / 2


class PostgresMembership:
    """`Membership` backed by the ``cluster_members`` table (see module doc).

    ``dsn`` is a plain asyncpg URL (for the journal's URL, drop its tuning
    parameters first: ``PostgresOptions.split_url(url)[0]``).
    """

    def __init__(
        self, dsn: str, self_member: Member, options: PostgresMembershipOptions | None = None
    ) -> None:
        self._dsn = dsn
        self._self = self_member
        self.options = options or PostgresMembershipOptions()
        self.incarnation = secrets.token_hex(8)
        self._publisher = SnapshotPublisher()
        self._conn: Any = None
        self._lock = asyncio.Lock()  # one round (one use of the connection) at a time
        self._wake = asyncio.Event()  # a peer joined or left: re-read now
        self._task: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._joined = False
        self._close_started = False
        self._closed = asyncio.Event()
        # Lease bookkeeping (times on `lease_clock`).
        self._lease_expires = -math.inf
        # Rounds are numbered as they begin; a refresh waits for one that
        # began after it was called.
        self._rounds_begun = 0
        self._rounds_finished = 0
        self._last_error: MembershipUnavailable | None = None
        # Last logged states, so each change is logged once.
        self._failing = False
        self._refused = False
        self._lease_was_valid = False
        self._bad_rows: set[str] = set()

    @property
    def self_member(self) -> Member:
        return self._self

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Prepare the schema, join, and start heartbeating. Idempotent.

        Raises `MembershipUnavailable` if Postgres cannot be reached (start
        may be called again), `NodeIdInUse` if another live process keeps
        this node id for longer than one lease.
        """
        async with self._start_lock:
            if self._close_started:
                raise MembershipUnavailable("cluster membership is closed")
            if self._joined:
                return
            try:
                await self._prepare()
                await self._join()
            except BaseException:
                await self._close_connection()
                raise
            self._joined = True
            self._lease_was_valid = True
            self._task = asyncio.get_running_loop().create_task(
                self._heartbeat(), name=f"cluster membership heartbeat ({self._self.node_id})"
            )

    async def close(self) -> None:
        """Stop heartbeating, delete this node's row (others drop it at once),
        close the connection; `watch` iterators end. Idempotent."""
        if self._close_started:
            await self._closed.wait()
            return
        self._close_started = True
        self._lease_expires = -math.inf
        try:
            # A start in progress gives up at its next step (bounded by its
            # timeouts); waiting for it means a join cannot outlive close.
            async with self._start_lock:
                if self._task is not None:
                    self._task.cancel()
                    await asyncio.wait([self._task])
                if self._joined:
                    await self._leave()
        finally:
            await self._close_connection()
            self._publisher.close()
            self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
        await self.wait_closed()

    # -- the view --------------------------------------------------------------

    def snapshot(self) -> MembershipSnapshot:
        return self._publisher.current

    def members(self) -> tuple[Member, ...]:
        """The live members as of the last successful round. This node is among
        them while its lease holds; if another live process holds this node's
        id, that process is listed instead."""
        return self._publisher.current.members

    def watch(self) -> AsyncIterator[MembershipSnapshot]:
        return self._publisher.watch()

    async def refresh(self) -> MembershipSnapshot:
        """Renew and re-read now; see `Membership.refresh`. Bounded by
        ``round_timeout`` (plus the wait for a round already running)."""
        if not self._running():
            raise MembershipUnavailable("cluster membership is not running")
        wanted = self._rounds_begun + 1
        async with self._lock:
            # A round that began after this call may have finished while we
            # waited for the lock: its result is fresh enough to share.
            if self._rounds_finished < wanted:
                await self._round()
        error = self._last_error
        if error is not None:
            raise MembershipUnavailable(error.message) from error.__cause__
        return self._publisher.current

    def self_lease_valid(self) -> bool:
        return self.self_lease_remaining() > 0

    def self_lease_remaining(self) -> float:
        """Seconds until this node's lease may lapse (0 once it may have)."""
        if not self._running():
            return 0.0
        return max(0.0, self._lease_expires - lease_clock())

    def _running(self) -> bool:
        return self._joined and not self._close_started

    # -- joining and leaving ---------------------------------------------------

    async def _prepare(self) -> None:
        cluster = self.options.cluster

        async def prepare(conn: Any) -> None:
            await schema.migrate(conn)
            await conn.execute(schema.FORGET, cluster, schema.FORGET_AFTER)

        async with self._lock:
            await self._call("preparing the schema", self.options.connect_timeout, prepare)

    async def _join(self) -> None:
        opts = self.options
        loop = asyncio.get_running_loop()
        deadline = loop.time() + opts.lease_timeout + opts.heartbeat_interval
        while True:
            if self._close_started:
                raise MembershipUnavailable("cluster membership was closed while joining")
            async with self._lock:
                claimed, members = await self._renew("joining")
                if claimed:
                    self._publisher.publish(members)
                    log.info(
                        "node %s joined cluster %r (%d members)",
                        self._self.node_id,
                        opts.cluster,
                        len(members),
                    )
                    return
                if loop.time() >= deadline:
                    raise NodeIdInUse(await self._describe_holder())
            # The previous holder of this id may be a crashed incarnation
            # whose lease has not lapsed yet: try again until it must have.
            await asyncio.sleep(opts.heartbeat_interval)

    async def _describe_holder(self) -> str:
        opts = self.options
        lease = timedelta(seconds=opts.lease_timeout)
        row = await self._call(
            "reading the node id's holder",
            opts.round_timeout,
            lambda conn: conn.fetchrow(schema.HOLDER, opts.cluster, self._self.node_id, lease),
        )
        holder = "" if row is None else f" (peer address {row[1]}, renewed {row[2]:.1f}s ago)"
        return (
            f"node id {self._self.node_id!r} of cluster {opts.cluster!r} is held by another "
            f"live process{holder}: two proxies must not share a node id"
        )

    async def _leave(self) -> None:
        opts = self.options

        args = (opts.cluster, self._self.node_id, self.incarnation, schema.NOTIFY_CHANNEL)

        def leave(conn: Any) -> Awaitable[str]:
            done: Awaitable[str] = conn.execute(schema.LEAVE, *args)
            return done

        try:
            async with asyncio.timeout(opts.close_timeout), self._lock:
                await self._call("leaving", opts.close_timeout, leave)
        except (MembershipUnavailable, TimeoutError) as exc:
            log.warning(
                "node %s could not leave cluster %r cleanly (%s); the others drop it "
                "when its lease lapses, within %.1fs",
                self._self.node_id,
                opts.cluster,
                exc,
                opts.lease_timeout,
            )
        else:
            log.info("node %s left cluster %r", self._self.node_id, opts.cluster)

    # -- heartbeats --------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Owned by this object (cancelled and awaited by `close`)."""
        loop = asyncio.get_running_loop()
        while True:
            await self._sleep_until(loop.time() + self.options.heartbeat_interval)
            # Checked before the round as well: a node resumed after a freeze
            # notes that its lease may have lapsed before renewing it.
            self._note_lease()
            try:
                async with self._lock:
                    await self._round()
            except Exception:
                # A bug, not a database failure (those are handled in
                # _round); stopping would silently drop this node from the
                # cluster, so log it and keep heartbeating.
                log.exception("cluster membership heartbeat failed unexpectedly")
            self._note_lease()

    async def _sleep_until(self, when: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(when):
                await self._wake.wait()
        self._wake.clear()

    async def _round(self) -> None:
        """Renew and read once, publish the result; never raises for database
        failures (they are kept in ``_last_error``). Caller holds ``_lock``."""
        self._rounds_begun += 1
        try:
            claimed, members = await self._renew("heartbeat")
        except MembershipUnavailable as exc:
            self._last_error = exc
            if not self._failing:
                self._failing = True
                log.warning(
                    "%s; retrying every %.1fs", exc.message, self.options.heartbeat_interval
                )
        else:
            self._last_error = None
            if self._failing:
                self._failing = False
                log.info("cluster membership heartbeat of node %s works again", self._self.node_id)
            self._note_claim(claimed)
            self._publisher.publish(members)
        finally:
            self._rounds_finished = self._rounds_begun

    async def _renew(self, action: str) -> tuple[bool, list[Member]]:
        """One claim-and-read round trip: whether this node holds its row, and
        the live members. Caller holds ``_lock``."""
        opts = self.options
        me = self._self
        lease = timedelta(seconds=opts.lease_timeout)
        sent_at = -math.inf

        def renew(conn: Any) -> Awaitable[list[Any]]:
            nonlocal sent_at
            sent_at = lease_clock()
            args = (opts.cluster, me.node_id, self.incarnation, me.peer_address, me.client_address)
            result: Awaitable[list[Any]] = conn.fetch(schema.ROUND, *args, lease)
            return result

        rows = await self._call(action, opts.round_timeout, renew)
        claimed = any(row["mine"] for row in rows)
        if not claimed:
            self._lease_expires = -math.inf
        elif not self._close_started:
            self._lease_expires = sent_at + opts.lease_timeout
        if any(row["joined"] for row in rows):
            await self._announce()
        members = [me if row["mine"] else self._member(row) for row in rows]
        return claimed, [member for member in members if member is not None]

    async def _announce(self) -> None:
        """Tell the other nodes to re-read now (best effort: they re-read at
        their next heartbeat anyway). Caller holds ``_lock``."""
        cluster = self.options.cluster
        try:
            await self._call(
                "announcing the join",
                self.options.round_timeout,
                lambda conn: conn.execute(schema.ANNOUNCE, schema.NOTIFY_CHANNEL, cluster),
            )
        except MembershipUnavailable as exc:
            log.debug("%s", exc.message)

    def _member(self, row: Any) -> Member | None:
        try:
            return Member(row["node_id"], row["peer_address"], row["client_address"])
        except ValueError as exc:
            # Written by a misconfigured or newer node: leave it out of the
            # ring rather than fail every round.
            if row["node_id"] not in self._bad_rows:
                self._bad_rows.add(row["node_id"])
                log.warning("ignoring cluster member row %r: %s", row["node_id"], exc)
            return None

    def _note_claim(self, claimed: bool) -> None:
        if claimed == (not self._refused):
            return
        self._refused = not claimed
        if claimed:
            log.info("node %s holds its cluster membership again", self._self.node_id)
        else:
            log.error(
                "node id %s is now held by another live process: this node is not a "
                "cluster member (two proxies must not share a node id)",
                self._self.node_id,
            )

    def _note_lease(self) -> None:
        valid = self.self_lease_valid()
        if valid == self._lease_was_valid or self._close_started:
            return
        self._lease_was_valid = valid
        if valid:
            log.info("membership lease of node %s renewed: a member again", self._self.node_id)
        else:
            log.warning(
                "membership lease of node %s may have lapsed (no renewal for %.1fs): the "
                "others may have dropped it and given its entities to new owners",
                self._self.node_id,
                self.options.lease_timeout,
            )

    # -- the connection ----------------------------------------------------------

    async def _call(self, action: str, within: float, work: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``work`` on the connection (opened if needed) within ``within`` seconds.

        Translates every driver failure into `MembershipUnavailable` and drops
        the connection then (its state is unknown). Caller holds ``_lock``.
        """
        try:
            async with asyncio.timeout(within):
                return await work(await self._connection())
        except asyncio.CancelledError:
            self._drop_connection()
            raise
        except _DB_ERRORS as exc:
            self._drop_connection()
            detail = str(exc) or type(exc).__name__
            raise MembershipUnavailable(
                f"cluster membership of node {self._self.node_id}: {action} failed: {detail}"
            ) from exc

    async def _connection(self) -> Any:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._conn = None
        conn = await asyncpg.connect(
            self._dsn,
            timeout=self.options.connect_timeout,
            server_settings={"application_name": self.options.application_name},
        )
        try:
            await conn.add_listener(schema.NOTIFY_CHANNEL, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        return conn

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if payload == self.options.cluster and pid != conn.get_server_pid():
            self._wake.set()

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await conn.close(timeout=self.options.close_timeout)
        except Exception as exc:
            log.debug("closing the membership connection failed (%r); terminating it", exc)
            conn.terminate()

    def __repr__(self) -> str:
        return (
            f"PostgresMembership({redact_url(self._dsn)!r}, {self._self.node_id!r}, "
            f"cluster={self.options.cluster!r})"
        )
