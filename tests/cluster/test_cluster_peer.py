"""The peer protocol on its own: `PeerServer` and `PeerClient` on loopback, the
message codec, and the one mapping from peer statuses back to error classes."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from cloudstate_proxy.cluster import Member
from cloudstate_proxy.cluster.peer import (
    NOT_RUN_KEY,
    PEER_NODE_KEY,
    NotRun,
    PeerClient,
    PeerClientSettings,
    PeerServer,
    PeerUnreachable,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    error_from_status,
)
from cloudstate_proxy.entity.model import AsOf, CommandReply, EntityCommand, Payload
from cloudstate_proxy.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ProxyError,
    Unavailable,
    UserFailure,
)
from tools.launch import ManagedProcess, free_port, wait_port

pytestmark = pytest.mark.timeout(30)

COMMAND = EntityCommand(
    "com.example.Cart",
    "Add",
    "alice",
    Payload("type.googleapis.com/com.example.Add", b"\x0a\x05alice"),
    metadata=(("x-text", "hi"), ("x-data-bin", b"\x00\x01")),
    hops=2,
    user_forwards=5,
)
REPLY = CommandReply(Payload("type.googleapis.com/com.example.Cart", b"\x08\x01"), (("k", "v"),))
OWNER = Member("owner", "127.0.0.1:1")


def test_a_request_and_a_reply_survive_the_wire_unchanged() -> None:
    command, origin = decode_request(encode_request(COMMAND, "a"), deadline=12.5)
    assert command == replace(COMMAND, deadline=12.5)
    assert origin == "a"
    assert decode_reply(encode_reply(REPLY)) == REPLY


def test_as_of_queries_are_never_encoded_for_forwarding() -> None:
    with pytest.raises(Internal):
        encode_request(replace(COMMAND, as_of=AsOf(seq_nr=1)), "a")


def test_an_undecodable_request_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        decode_request(b"\xff\xff\xff", None)


@pytest.mark.parametrize(
    ("code", "trailers", "expected"),
    [
        (grpc.StatusCode.UNKNOWN, ((PEER_NODE_KEY, "b"),), UserFailure),
        (grpc.StatusCode.UNAVAILABLE, ((PEER_NODE_KEY, "b"),), Unavailable),
        (grpc.StatusCode.UNAVAILABLE, ((PEER_NODE_KEY, "b"), (NOT_RUN_KEY, "1")), NotRun),
        (grpc.StatusCode.DATA_LOSS, ((PEER_NODE_KEY, "b"),), Internal),
        # No peer trailer: the transport failed, the command may have run.
        (grpc.StatusCode.UNAVAILABLE, (), Unavailable),
        (grpc.StatusCode.UNAVAILABLE, ((NOT_RUN_KEY, "1"),), Unavailable),
        (grpc.StatusCode.CANCELLED, (), Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, (), DeadlineExceeded),
        (grpc.StatusCode.UNIMPLEMENTED, (), Internal),
    ],
)
def test_statuses_map_back_to_error_classes(
    code: grpc.StatusCode, trailers: tuple[tuple[str, str], ...], expected: type[ProxyError]
) -> None:
    error = error_from_status(code, "details", trailers, OWNER)
    assert type(error) is expected


class Recorder:
    def __init__(self) -> None:
        self.commands: list[EntityCommand] = []
        self.error: Exception | None = None

    async def __call__(self, command: EntityCommand) -> CommandReply:
        self.commands.append(command)
        if self.error is not None:
            raise self.error
        return REPLY


@pytest.fixture
async def served() -> AsyncIterator[tuple[Recorder, PeerServer, PeerClient]]:
    recorder = Recorder()
    server = PeerServer(recorder, "127.0.0.1", 0, node_id="owner", shutdown_timeout=1.0)
    client = PeerClient("origin", PeerClientSettings(connect_timeout=0.5))
    await server.start()
    try:
        yield recorder, server, client
    finally:
        await asyncio.wait_for(client.close(), 10)
        await asyncio.wait_for(server.close(), 10)


async def test_a_forward_runs_the_command_on_the_server_and_returns_its_reply(
    served: tuple[Recorder, PeerServer, PeerClient],
) -> None:
    recorder, server, client = served
    member = Member("owner", server.address)
    assert await client.forward(member, COMMAND) == REPLY
    [arrived] = recorder.commands
    assert arrived.metadata == COMMAND.metadata and arrived.hops == 2


async def test_the_servers_errors_come_back_with_their_class_and_message(
    served: tuple[Recorder, PeerServer, PeerClient],
) -> None:
    recorder, server, client = served
    member = Member("owner", server.address)
    for error in (UserFailure("no"), NotRun("not routed"), Unavailable("journal down")):
        recorder.error = error
        with pytest.raises(ProxyError) as raised:
            await client.forward(member, COMMAND)
        assert (type(raised.value), raised.value.message) == (type(error), error.message)
    recorder.error = RuntimeError("a bug")
    with pytest.raises(Internal):
        await client.forward(member, COMMAND)


async def test_an_address_nobody_listens_on_is_unreachable_quickly(
    served: tuple[Recorder, PeerServer, PeerClient],
) -> None:
    _, _, client = served
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(PeerUnreachable):
        await client.forward(Member("gone", f"127.0.0.1:{free_port()}"), COMMAND)
    assert loop.time() - began < 1.0


async def test_a_passed_deadline_fails_before_anything_is_sent(
    served: tuple[Recorder, PeerServer, PeerClient],
) -> None:
    recorder, server, client = served
    late = replace(COMMAND, deadline=asyncio.get_running_loop().time() - 0.1)
    with pytest.raises(DeadlineExceeded):
        await client.forward(Member("owner", server.address), late)
    assert recorder.commands == []


async def test_retain_drops_the_channels_of_members_that_left_or_moved(
    served: tuple[Recorder, PeerServer, PeerClient],
) -> None:
    _, server, client = served
    member = Member("owner", server.address)
    await client.forward(member, COMMAND)
    client.retain([])
    assert await client.forward(member, COMMAND) == REPLY  # a fresh channel
    moved = Member("owner", f"127.0.0.1:{free_port()}")
    client.retain([moved])
    with pytest.raises(PeerUnreachable):
        await client.forward(moved, COMMAND)


async def test_a_closed_client_forwards_nothing(
    served: tuple[Recorder, PeerServer, PeerClient],
) -> None:
    _, server, client = served
    await client.close()
    with pytest.raises(PeerUnreachable):
        await client.forward(Member("owner", server.address), COMMAND)


async def test_a_peer_port_in_use_fails_to_start(
    served: tuple[Recorder, PeerServer, PeerClient],
) -> None:
    recorder, server, _ = served
    other = PeerServer(recorder, "127.0.0.1", server.port, node_id="other")
    with pytest.raises(OSError, match="peer port"):
        await other.start()
    await other.close()


# A peer server in its own process whose handler never answers.
_HANGING_PEER = """
import asyncio, sys
from cloudstate_proxy.cluster.peer import PeerServer

async def hang(command):
    await asyncio.Event().wait()

async def main():
    server = PeerServer(hang, "127.0.0.1", int(sys.argv[1]), node_id="frozen")
    await server.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_frozen_peer_fails_the_calls_in_flight_instead_of_hanging(tmp_path: Path) -> None:
    port = free_port()
    peer = ManagedProcess(
        "hanging peer", [sys.executable, "-c", _HANGING_PEER, str(port)], tmp_path / "peer.log"
    ).start()
    client = PeerClient("origin", PeerClientSettings(keepalive_time=1.0, keepalive_timeout=1.0))
    try:
        await asyncio.to_thread(wait_port, port, 30.0, peer)
        call = asyncio.create_task(client.forward(Member("frozen", f"127.0.0.1:{port}"), COMMAND))
        done, _ = await asyncio.wait([call], timeout=1.5)
        assert not done, "the handler never answers: the call must still wait"
        peer.signal(signal.SIGSTOP)  # no deadline on the command: only keepalive ends it
        loop = asyncio.get_running_loop()
        frozen_at = loop.time()
        with pytest.raises(Unavailable) as raised:
            await asyncio.wait_for(call, 10)
        assert not isinstance(raised.value, NotRun)
        assert loop.time() - frozen_at < 4.0  # keepalive time + timeout, with slack
    finally:
        peer.signal(signal.SIGCONT)
        peer.kill()
        await asyncio.wait_for(client.close(), 10)
