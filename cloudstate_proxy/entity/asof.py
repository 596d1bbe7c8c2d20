"""Time travel: run a read-only command against an entity's past state.

A client asks for the state as of a point in the entity's history by sending
one of two gRPC metadata entries with an ordinary call of the user's own API:

- ``cloudstate-as-of-seq: N``: the state after the events with sequence
  numbers up to ``N`` (0 is the initial state; beyond the entity's highest
  sequence number it is the current state).
- ``cloudstate-as-of-time: <RFC 3339>``: the state after the longest prefix of
  the entity's events written at or before that time (e.g.
  ``2026-11-27T13:45:00Z``, ``2026-11-27T14:45:00.25+01:00``; digits past
  microseconds are truncated, which keeps "at or before"). A time before the
  first event is the initial state, a future time the current state.

The command runs on a *transient* `handle` stream opened for this query alone,
so the user function sees an ordinary init/events/command stream and any
Cloudstate SDK serves it: init with the newest snapshot at or before the point,
the events after that snapshot up to the point, then the command as id 1. The
stream keeps the real entity id (SDKs keep state per stream, so the live
stream's state is untouched) and is half-closed as soon as the reply is in.
The live instance, its stream, queue and sequence number are never involved:
the query needs none, runs beside live commands, and creates no instance.

Read-only is enforced, never trusted: a reply carrying events fails with
FAILED_PRECONDITION and nothing is persisted. So does a reply with a forward
or side effects, because those would run commands against the *present*
(possibly writing) on behalf of a query about the past. A user failure is
UNKNOWN as for any command. The reply carries the response header
``cloudstate-state-seq``: the sequence number of the last event the state
includes (useful with a time, or a sequence number past the end).

Invalid metadata (both entries, either one twice, a sequence number that is
not a non-negative 64-bit integer, a time that is not RFC 3339 with an offset)
fails with INVALID_ARGUMENT before anything runs. `split_as_of` also strips
the entries, so they never reach the user function.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

from ..errors import (
    DeadlineExceeded,
    EntityFailed,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    UserFailure,
)
from ..journal.base import Journal, SnapshotStore, StoredEvent, StoredSnapshot
from ..registry import ServiceRegistry
from .model import AsOf, CommandReply, EntityCommand, EntitySettings, Metadata, Payload
from .outcome import CommandOutcome, FailureAction, ForwardAction, StreamFailure
from .pending import MethodRoute
from .stream import EntityStream, StreamBroken, StreamOpener

log = logging.getLogger(__name__)

AS_OF_SEQ = "cloudstate-as-of-seq"
AS_OF_TIME = "cloudstate-as-of-time"
# Response header: the sequence number of the last event the state includes.
STATE_SEQ = "cloudstate-state-seq"

_MAX_SEQ_NR = 2**63 - 1  # the protocol's sequence numbers are int64
_DIGITS = re.compile(r"[0-9]+")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


# -- the request metadata ------------------------------------------------------------


def split_as_of(metadata: Metadata) -> tuple[Metadata, AsOf | None]:
    """The client's metadata without the as-of entries, and the point they name
    (None for an ordinary command). Raises `InvalidArgument` for invalid entries."""
    rest: list[tuple[str, str | bytes]] = []
    found: dict[str, str | bytes] = {}
    for key, value in metadata:
        if key not in (AS_OF_SEQ, AS_OF_TIME):
            rest.append((key, value))
        elif key in found:
            raise InvalidArgument(f"metadata {key} was given more than once")
        else:
            found[key] = value
    if len(found) > 1:
        raise InvalidArgument(f"give either {AS_OF_SEQ} or {AS_OF_TIME}, not both")
    if AS_OF_SEQ in found:
        return tuple(rest), AsOf(seq_nr=parse_seq_nr(_text(AS_OF_SEQ, found[AS_OF_SEQ])))
    if AS_OF_TIME in found:
        return tuple(rest), AsOf(time=parse_time(_text(AS_OF_TIME, found[AS_OF_TIME])))
    return metadata, None


def _text(key: str, value: str | bytes) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def parse_seq_nr(text: str) -> int:
    """A sequence number in decimal ASCII digits, 0 to 2^63-1; else `InvalidArgument`."""
    text = text.strip()
    if not _DIGITS.fullmatch(text) or int(text) > _MAX_SEQ_NR:
        raise InvalidArgument(
            f"{AS_OF_SEQ} must be a non-negative integer sequence number "
            f"(at most {_MAX_SEQ_NR}), got {text!r}"
        )
    return int(text)


def parse_time(text: str) -> datetime:
    """An RFC 3339 date-time with its offset, as an aware UTC datetime; else
    `InvalidArgument`. Fractions past microseconds are truncated; a leap second
    (:60) is taken as the last microsecond of its minute."""
    text = text.strip()
    match = _RFC3339.fullmatch(text)
    try:
        if match is None:
            raise ValueError("not RFC 3339")
        return _to_datetime(match)
    except ValueError:
        raise InvalidArgument(
            f"{AS_OF_TIME} must be an RFC 3339 date-time with an offset, "
            f"e.g. 2026-11-27T13:45:00Z or 2026-11-27T14:45:00.5+01:00; got {text!r}"
        ) from None


def _to_datetime(match: re.Match[str]) -> datetime:
    year, month, day, hour, minute, second = (int(g) for g in match.group(1, 2, 3, 4, 5, 6))
    micros = int((match.group(7) or "0")[:6].ljust(6, "0"))
    if second == 60:
        second, micros = 59, 999_999
    if match.group(8):
        zone = UTC
    else:
        offset = timedelta(hours=int(match.group(10)), minutes=int(match.group(11)))
        zone = timezone(-offset if match.group(9) == "-" else offset)
    moment = datetime(year, month, day, hour, minute, second, micros, tzinfo=zone)
    return moment.astimezone(UTC)


# -- running a query -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Query:
    """One as-of query: which entity, which point, which method."""

    command: EntityCommand
    as_of: AsOf
    route: MethodRoute
    persistence_id: str

    def __str__(self) -> str:
        as_of = self.as_of
        point = f"seq {as_of.seq_nr}" if as_of.time is None else as_of.time.isoformat()
        return f"{self.command.service}/{self.command.entity_id} as of {point}"


class AsOfQueries:
    """Runs as-of queries for one entity manager, each on its own transient stream.

    A query runs in its caller's task; the only tasks this object owns are those
    ending finished transient streams (half-close, then at most ``finish_grace``
    seconds for the user function to end its side), so that the client's reply
    never waits for them. `close()` waits for those.
    """

    def __init__(
        self,
        registry: ServiceRegistry,
        journal: Journal,
        snapshots: SnapshotStore,
        streams: StreamOpener,
        settings: EntitySettings,
        *,
        command_timeout: float,
        finish_grace: float,
    ) -> None:
        self._registry = registry
        self._journal = journal
        self._snapshots = snapshots
        self._streams = streams
        self._settings = settings
        self._command_timeout = command_timeout
        self._finish_grace = finish_grace
        self._finishing: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def finishing(self) -> int:
        """Transient streams still being ended."""
        return len(self._finishing)

    async def run(self, command: EntityCommand, route: MethodRoute) -> CommandReply:
        """Run ``command`` (whose ``as_of`` is set) against the entity's state at
        that point and return the reply.

        Raises `FailedPrecondition` (the reply emitted events, forwarded or asked
        for side effects), `UserFailure`, `DeadlineExceeded` (the command's
        deadline), `Unavailable`/`EntityFailed` (journal or user function).
        """
        assert command.as_of is not None
        persistence_id = self._registry.service(command.service).persistence_id
        query = _Query(command, command.as_of, route, persistence_id)
        try:
            async with asyncio.timeout_at(command.deadline):
                return await self._run(query)
        except TimeoutError:
            raise DeadlineExceeded(f"deadline exceeded for the query of {query}") from None

    async def _run(self, query: _Query) -> CommandReply:
        stream = self._streams.open()
        finished = False
        try:
            seq_nr = await self._replay(stream, query)
            outcome = await self._exchange(stream, query)
            finished = True
        finally:
            if finished:
                self._finish(stream)
            else:
                stream.cancel()  # failed or cancelled midway: nothing to be polite about
        return _answer(query, outcome, seq_nr)

    async def _replay(self, stream: EntityStream, query: _Query) -> int:
        """Init and events up to the query's point, within the recovery timeout;
        returns the sequence number of the last event the state includes."""
        timeout = self._settings.recovery_timeout
        try:
            async with asyncio.timeout(timeout):
                return await self._send_history(stream, query)
        except TimeoutError:
            raise Unavailable(f"replaying {query} took longer than {timeout}s") from None
        except StreamBroken as exc:
            raise Unavailable(f"the user function is unavailable for {query}: {exc}") from None

    async def _send_history(self, stream: EntityStream, query: _Query) -> int:
        as_of = query.as_of
        snapshot = await self._snapshots.load_snapshot(
            query.persistence_id,
            query.command.entity_id,
            max_seq_nr=as_of.seq_nr,
            max_written_at=as_of.time,
        )
        await stream.send_init(query.command.service, query.command.entity_id, snapshot)
        seq_nr = snapshot.seq_nr if snapshot is not None else 0
        async with contextlib.aclosing(self._events(query, snapshot)) as events:
            async for event in events:
                await stream.send_event(event.seq_nr, event.type_url, event.payload)
                seq_nr = event.seq_nr
        return seq_nr

    async def _events(
        self, query: _Query, snapshot: StoredSnapshot | None
    ) -> AsyncGenerator[StoredEvent, None]:
        """The events after ``snapshot`` up to the query's point. By time, the
        prefix stops at the first event written after it: sequence order is the
        history, so a later event never counts without the ones before it."""
        as_of = query.as_of
        after = snapshot.seq_nr if snapshot is not None else 0
        if as_of.seq_nr is not None and as_of.seq_nr <= after:
            return
        read = self._journal.read_events(
            query.persistence_id, query.command.entity_id, after + 1, as_of.seq_nr
        )
        try:
            async for event in read:
                if as_of.time is not None and event.written_at > as_of.time:
                    return
                yield event
        finally:
            if isinstance(read, AsyncGenerator):
                await read.aclose()  # stopped early: release what the backend holds

    async def _exchange(self, stream: EntityStream, query: _Query) -> CommandOutcome:
        """Send the command as id 1 and read its reply within the command timeout."""
        route = query.route
        limit = self._command_timeout
        try:
            await stream.send_command(
                query.command.entity_id,
                1,
                route.name,
                route.input_type_url,
                query.command.payload.value,
            )
            async with asyncio.timeout(limit):
                received = await stream.receive()
        except StreamBroken as exc:
            raise EntityFailed(f"the query of {query} failed: {exc}") from None
        except TimeoutError:
            message = f"the user function did not answer the query of {query} in {limit:.1f}s"
            raise EntityFailed(message) from None
        if isinstance(received, StreamFailure):
            raise EntityFailed(f"the user function failed {query}: {received.description}")
        if received.command_id != 1:
            message = f"protocol error on {query}: reply for command {received.command_id}"
            raise EntityFailed(message + ", expected 1")
        return received

    def _finish(self, stream: EntityStream) -> None:
        if self._closed:
            stream.cancel()  # a query that outlived close(): no task may start now
            return
        task = asyncio.get_running_loop().create_task(
            stream.finish(self._finish_grace), name="as-of stream finish"
        )
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def close(self) -> None:
        """Wait for the transient streams being ended (each is bounded by the
        finish grace, after which it is cancelled). Idempotent."""
        self._closed = True
        while self._finishing:
            await asyncio.wait(set(self._finishing))


def _answer(query: _Query, outcome: CommandOutcome, seq_nr: int) -> CommandReply:
    """The client's reply, or the error when the reply is not a plain read."""
    action = outcome.action
    if isinstance(action, FailureAction):
        # As for any command: a failed reply's events and effects are dropped.
        raise UserFailure(action.description)
    what = f"{query.command.service}/{query.command.method}"
    if outcome.events:
        raise FailedPrecondition(
            f"{what} emitted {len(outcome.events)} event(s) in a query as of a past state: "
            "as-of queries are read-only, so nothing was persisted"
        )
    if isinstance(action, ForwardAction):
        raise FailedPrecondition(
            f"{what} forwarded to {action.service}/{action.method} in a query as of a past "
            "state: as-of queries are read-only, so nothing was forwarded"
        )
    if outcome.side_effects:
        raise FailedPrecondition(
            f"{what} asked for {len(outcome.side_effects)} side effect(s) in a query as of a "
            "past state: as-of queries are read-only, so none was run"
        )
    payload = action.payload or Payload(query.route.output_type_url, b"")
    return CommandReply(payload, (*action.metadata, (STATE_SEQ, str(seq_nr))))
