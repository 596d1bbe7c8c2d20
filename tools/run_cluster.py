"""`make cluster`: three proxy nodes on loopback sharing one Postgres.

Each node is a proxy with its own shopping-cart user function beside it (the
sidecar layout: the proxy reaches it on 127.0.0.1), all journaling to the same
database and finding each other through its ``cluster_members`` table. Any node
serves any cart: a node forwards a command to the cart's owner over the peer
ports. Prints the client ports; Ctrl-C stops everything cleanly.

Database: DATABASE_URL, else postgresql://postgres@127.0.0.1:5432/test.
docker-compose.yml runs the same nodes with the same flags and ports
(tests/e2e/test_cluster_compose.py checks that they agree).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tools.launch import (
    ROOT,
    ManagedProcess,
    start_proxy,
    start_user_function,
    wait_port,
    wait_serving,
)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
USER_FUNCTION_MODULE = "examples.shoppingcart"
HEARTBEAT_INTERVAL = "1s"
LEASE_TIMEOUT = "5s"


@dataclass(frozen=True)
class NodeSpec:
    """One node: a proxy and the user function beside it."""

    node_id: str
    client_port: int
    peer_port: int
    user_function_port: int

    def cluster_flags(self) -> list[str]:
        """The ``cloudstate-proxy serve`` flags every layout (this script,
        docker-compose.yml) gives this node, besides where things listen."""
        return [
            "--node-id", self.node_id,
            "--peer-port", str(self.peer_port),
            "--membership", "postgres",
            "--heartbeat-interval", HEARTBEAT_INTERVAL,
            "--lease-timeout", LEASE_TIMEOUT,
        ]  # fmt: skip


NODES = (
    NodeSpec("node-a", client_port=9001, peer_port=9101, user_function_port=8081),
    NodeSpec("node-b", client_port=9002, peer_port=9102, user_function_port=8082),
    NodeSpec("node-c", client_port=9003, peer_port=9103, user_function_port=8083),
)


def start_node(
    node: NodeSpec,
    journal_url: str,
    logs: Path,
    started: list[ManagedProcess],
    extra_args: Sequence[str] = (),
) -> None:
    """Start the node's user function, then its proxy (with ``extra_args``),
    adding each to ``started`` (user function first); return once the proxy serves."""
    user_function = start_user_function(USER_FUNCTION_MODULE, node.user_function_port, logs)
    started.append(user_function)
    wait_port(node.user_function_port, process=user_function)
    proxy = start_proxy(
        node.user_function_port,
        node.client_port,
        journal_url,
        logs,
        extra_args=["--peer-host", "127.0.0.1", *node.cluster_flags(), *extra_args],
    )
    started.append(proxy)
    wait_serving(f"127.0.0.1:{node.client_port}", process=proxy)


def main() -> int:
    journal_url = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    logs = ROOT / ".state" / "cluster-logs"
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    processes: list[ManagedProcess] = []
    try:
        for node in NODES:
            start_node(node, journal_url, logs, processes)
        print(_banner(logs), flush=True)
        while not stop.wait(0.5):
            for process in processes:
                if not process.alive():
                    print(f"{process.name} exited:\n{process.log_tail()}", file=sys.stderr)
                    return 1
        print("stopping ...", flush=True)
        return 0
    finally:
        # Proxies first (each leaves the cluster and hands its entities to the
        # nodes still running), then the user functions.
        proxies = processes[1::2]
        for process in [*reversed(proxies), *processes[0::2]]:
            process.stop()


def _banner(logs: Path) -> str:
    ports = "\n".join(
        f"  {n.node_id}: 127.0.0.1:{n.client_port} (peer port {n.peer_port}, "
        f"user function {n.user_function_port})"
        for n in NODES
    )
    client = ".venv/bin/python -m examples.shoppingcart.client --target"
    first, last = NODES[0].client_port, NODES[-1].client_port
    return f"""
Three proxy nodes serve the shopping cart (logs: {logs}):
{ports}

Any node serves any cart; the owner of a cart may be another node:
  {client} 127.0.0.1:{first} add alice apple Apple 2
  {client} 127.0.0.1:{last} get alice

Ctrl-C stops every process.
"""


if __name__ == "__main__":
    sys.exit(main())
