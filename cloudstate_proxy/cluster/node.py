"""This proxy as a cluster member: the peer port, membership and router, wired from config.

`ClusterNode` is what the app runs when membership is not ``none``:

- start (after the entity manager started, before the client port opens):
  bind the peer port, join the cluster (Postgres heartbeats or a static
  list), then follow membership changes;
- `leave` (first step of a graceful shutdown, Postgres membership only):
  deregister, so the others stop routing here at once, and hand every entity
  to the remaining members; commands still arriving are forwarded to them.
  A static member does not hand off: the others keep routing to it until it
  is gone, and then get UNAVAILABLE until it is back;
- `stop_serving` once the front door has drained: close the peer port,
  letting in-flight forwards finish;
- `close` after the entity manager closed (its last commands may still be
  forwarded): close the peer channels and the membership.
"""

from __future__ import annotations

import logging
import secrets
import socket

from ..config import ProxyConfig
from ..journal.postgres_options import PostgresOptions
from ..registry import ServiceRegistry
from .member import Member, parse_address
from .members_pg import PostgresMembership, PostgresMembershipOptions
from .membership import Membership, StaticMembership
from .peer import PeerClient, PeerClientSettings, PeerServer
from .router import ClusterRouter, LocalEntities, RouterSettings

log = logging.getLogger(__name__)

_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def default_node_id(client_port: int) -> str:
    """``<host name>-<client port>``: unique on a host, and the same after a
    restart on the same port; a random suffix when the port is picked freely."""
    suffix = str(client_port) if client_port else secrets.token_hex(4)
    return f"{socket.gethostname() or 'node'}-{suffix}"


class ClusterNode:
    """The cluster side of one proxy (see the module docstring for the order
    of `start`, `leave`, `stop_serving` and `close`). ``router`` is the
    `Router` for the front door and the entity manager."""

    def __init__(self, config: ProxyConfig, registry: ServiceRegistry) -> None:
        self._config = config
        cluster = config.cluster
        self.node_id = cluster.node_id or default_node_id(config.server.port)
        self._peers = PeerClient(
            self.node_id, PeerClientSettings(max_message_size=config.server.max_message_size)
        )
        # A command without a client deadline waits long enough for a dead
        # owner to be dropped (one lease) and its keys to move.
        route_timeout = max(10.0, 2 * cluster.lease_timeout)
        self.router = ClusterRouter(
            registry, self._peers, RouterSettings(route_timeout=route_timeout)
        )
        self._server = PeerServer(
            self.router.route,
            cluster.peer_host,
            self._peer_port(),
            node_id=self.node_id,
            max_message_size=config.server.max_message_size,
            shutdown_timeout=config.server.shutdown_timeout,
        )

    @property
    def peer_port(self) -> int:
        """The bound peer port."""
        return self._server.port

    async def start(self, local: LocalEntities) -> None:
        """Serve the peer port, join the cluster, follow it. Raises `OSError`
        (the peer port) or `MembershipUnavailable`/`NodeIdInUse` (joining)."""
        await self._server.start()
        member = Member(self.node_id, self._advertised_address())
        membership = self._membership(member)
        await self.router.start(membership, local)
        log.info(
            "node %s is a member of cluster %r (%s membership; peer port %s, advertised as %s)",
            self.node_id,
            self._config.cluster.cluster_name,
            self._config.membership_mode,
            self._server.address,
            member.peer_address,
        )

    async def leave(self) -> None:
        """Deregister and hand every entity off (Postgres membership only)."""
        if self._config.membership_mode == "postgres":
            await self.router.leave()

    async def stop_serving(self) -> None:
        """Close the peer port; in-flight forwards finish within the shutdown timeout."""
        await self._server.close()

    async def close(self) -> None:
        """Close the peer port (if still open), the membership and the peer
        channels. Idempotent."""
        try:
            await self._server.close()
        finally:
            await self.router.close()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()
        await self.router.wait_closed()

    # -- wiring -------------------------------------------------------------------------

    def _membership(self, member: Member) -> Membership:
        cluster = self._config.cluster
        if self._config.membership_mode == "static":
            members = [Member(node_id, address) for node_id, address in cluster.static_peers]
            return StaticMembership(members, member)
        dsn = PostgresOptions.split_url(self._config.membership_url)[0]
        options = PostgresMembershipOptions(
            cluster=cluster.cluster_name,
            heartbeat_interval=cluster.heartbeat_interval,
            lease_timeout=cluster.lease_timeout,
        )
        return PostgresMembership(dsn, member, options)

    def _listed_address(self) -> str | None:
        """This node's address in ``--static-peers``, if listed there."""
        return dict(self._config.cluster.static_peers).get(self.node_id)

    def _peer_port(self) -> int:
        cluster = self._config.cluster
        listed = self._listed_address()
        if cluster.peer_port == 0 and listed is not None:
            return parse_address(listed)[1]
        return cluster.peer_port

    def _advertised_address(self) -> str:
        cluster = self._config.cluster
        listed = self._listed_address()
        if listed is not None:
            return listed
        if cluster.peer_address:
            return cluster.peer_address
        host = cluster.peer_host
        if host in _WILDCARDS:
            host = socket.gethostname()
        elif ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self._server.port}"
