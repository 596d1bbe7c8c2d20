"""A proxy node as the cluster sees it: its id and where to reach it.

`Member` is the value that membership publishes and the ring hands out as the
owner of a key. The ring places a member by ``node_id`` alone, so a node that
restarts with the same id on another address keeps its share of the keys.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Member:
    """One proxy node.

    - ``node_id``: unique and stable within the cluster (a pod name, a host
      name); non-empty text without NUL characters or surrounding whitespace.
    - ``peer_address``: ``host:port`` where the other proxies forward commands
      to this node (IPv6 hosts in brackets: ``[::1]:9101``).
    - ``client_address``: optionally the ``host:port`` clients use (for admin
      views and redirects); None when not advertised.

    Raises ValueError for an invalid field.
    """

    node_id: str
    peer_address: str
    client_address: str | None = None

    def __post_init__(self) -> None:
        check_node_id(self.node_id)
        parse_address(self.peer_address, what="peer address")
        if self.client_address is not None:
            parse_address(self.client_address, what="client address")


def check_node_id(node_id: str) -> None:
    """Raise ValueError unless ``node_id`` is a usable node id (see `Member`)."""
    check_name("node id", node_id)


def check_name(what: str, value: str) -> None:
    """Raise ValueError, naming ``what``, unless ``value`` is non-empty text
    without surrounding whitespace or NUL characters that Postgres can store."""
    if not value or value != value.strip():
        raise ValueError(f"{what} must be non-empty without surrounding spaces: {value!r}")
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character: {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text: {value!r}") from exc


def parse_address(address: str, *, what: str = "address") -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into host and port.

    Raises ValueError, naming ``what``, for anything else: a missing host, a
    port outside 1..65535, an unbracketed IPv6 address.
    """
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{what} {address!r}: put an IPv6 host in brackets, e.g. [::1]:9101")
    if not sep or not host or any(c.isspace() for c in host):
        raise ValueError(f"{what} {address!r} is not host:port")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{what} {address!r} needs a port between 1 and 65535")
    return host, int(port_text)
