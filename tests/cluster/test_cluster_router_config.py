"""Cluster flags: parsing, validation, ``serve --help``, and what a node derives
from them (membership mode, node id, peer port and advertised address)."""

from __future__ import annotations

import socket

import pytest

from cloudstate_proxy.cli import build_parser, main
from cloudstate_proxy.cluster.node import ClusterNode, default_node_id
from cloudstate_proxy.config import ClusterConfig, ConfigError, load_config
from tests.proxy.entity.helpers import tck_registry

PG = "postgresql://u@db:5432/journal"


def test_cluster_flags_parse_into_the_cluster_config() -> None:
    config = load_config(
        {
            "journal_url": PG,
            "node_id": "node-a",
            "peer_host": "10.0.0.5",
            "peer_port": "9101",
            "peer_address": "proxy-a:9101",
            "membership_url": "postgresql://u@members/db",
            "cluster_name": "carts",
            "heartbeat_interval": "500ms",
            "lease_timeout": "3s",
        },
        {},
    )
    assert config.cluster == ClusterConfig(
        membership="auto",
        node_id="node-a",
        peer_host="10.0.0.5",
        peer_port=9101,
        peer_address="proxy-a:9101",
        membership_url="postgresql://u@members/db",
        cluster_name="carts",
        heartbeat_interval=0.5,
        lease_timeout=3.0,
    )
    assert config.membership_mode == "postgres"
    assert config.membership_url == "postgresql://u@members/db"


def test_environment_variables_set_cluster_flags_too() -> None:
    environ = {"CLUSTER_MEMBERSHIP": "static", "NODE_ID": "b", "STATIC_PEERS": "a=h:1, b=h:2"}
    config = load_config({}, environ)
    assert config.membership_mode == "static"
    assert config.cluster.static_peers == (("a", "h:1"), ("b", "h:2"))


@pytest.mark.parametrize(
    ("journal_url", "membership", "mode"),
    [
        (PG, "auto", "postgres"),
        ("postgres://u@db/j", "auto", "postgres"),
        ("sqlite:///tmp/j.db", "auto", "none"),
        ("memory://", "auto", "none"),
        (PG, "none", "none"),
    ],
)
def test_auto_membership_follows_the_journal(journal_url: str, membership: str, mode: str) -> None:
    config = load_config({"journal_url": journal_url, "membership": membership}, {})
    assert config.membership_mode == mode
    assert config.membership_url == journal_url


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"membership": "gossip"}, "--membership: must be one of"),
        ({"membership": "postgres"}, "--membership: postgres needs a Postgres database"),
        ({"membership": "static"}, "--static-peers: needed with --membership static"),
        ({"static_peers": "a=h:1", "node_id": "a"}, "--static-peers: needed with"),
        (
            {"membership": "static", "static_peers": "a=h:1", "node_id": "b"},
            "--node-id: with --membership static it must be one of a",
        ),
        ({"membership": "static", "static_peers": "a=h:1,a=h:2"}, "--static-peers: node ids"),
        ({"membership": "static", "static_peers": "a:h:1"}, "--static-peers: must list"),
        ({"membership": "static", "static_peers": "a=h"}, "--static-peers: address of node"),
        ({"peer_port": "70000"}, "--peer-port: must be a port number"),
        ({"peer_address": "nohost"}, "--peer-address: peer address"),
        ({"node_id": "a\x00b"}, "--node-id: node id contains a NUL"),
        ({"membership_url": "sqlite:///x.db"}, "--membership-url: must be a postgresql://"),
        ({"heartbeat_interval": "2s", "lease_timeout": "3s"}, "--lease-timeout: must be at"),
        ({"lease_timeout": "0"}, "--lease-timeout: must be greater than 0"),
    ],
)
def test_invalid_cluster_settings_name_their_flag(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(values, {})


def test_serve_help_documents_every_cluster_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--node-id",
        "--peer-host",
        "--peer-port",
        "--peer-address",
        "--membership",
        "--static-peers",
        "--membership-url",
        "--cluster-name",
        "--heartbeat-interval",
        "--lease-timeout",
    ):
        assert flag in text
    assert "env CLUSTER_MEMBERSHIP; default: auto" in text
    assert "default: <host name>-<client port>" in text


def test_a_bad_cluster_flag_exits_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--membership", "static"])
    with pytest.raises(SystemExit) as exited:
        args.command(args)
    assert exited.value.code == 2
    assert "--static-peers" in capsys.readouterr().err


def test_the_default_node_id_is_the_host_name_and_client_port() -> None:
    host = socket.gethostname()
    assert default_node_id(9000) == f"{host}-9000"
    random_ids = {default_node_id(0) for _ in range(3)}
    assert len(random_ids) == 3 and all(i.startswith(f"{host}-") for i in random_ids)


async def test_a_static_node_binds_and_advertises_its_listed_address() -> None:
    config = load_config(
        {
            "journal_url": PG,
            "membership": "static",
            "node_id": "b",
            "static_peers": "a=127.0.0.1:9101,b=127.0.0.1:9102",
        },
        {},
    )
    node = ClusterNode(config, tck_registry())
    assert node.node_id == "b"
    assert node._peer_port() == 9102
    assert node._advertised_address() == "127.0.0.1:9102"
    await node.close()
