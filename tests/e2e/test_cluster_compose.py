"""docker-compose.yml runs the same cluster as `make cluster` (tools/run_cluster.py).

No Docker engine runs the file here: it is parsed, and every node's proxy and
user function must use the commands, flags and ports run_cluster.py uses.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tools.launch import ROOT
from tools.run_cluster import NODES, USER_FUNCTION_MODULE, NodeSpec

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    result: dict[str, Any] = compose["services"]
    return result


def flag(command: list[str], name: str) -> str:
    assert command.count(name) == 1, f"{name} given {command.count(name)} times in {command}"
    return command[command.index(name) + 1]


def proxy_of(services: dict[str, Any], node: NodeSpec) -> tuple[str, list[str]]:
    found = [
        (name, service["command"])
        for name, service in services.items()
        if "--node-id" in service.get("command", [])
        and flag(service["command"], "--node-id") == node.node_id
    ]
    assert len(found) == 1, f"one proxy service for {node.node_id}, found {found}"
    return found[0]


@pytest.mark.parametrize("node", NODES, ids=[n.node_id for n in NODES])
def test_each_proxy_runs_with_the_flags_and_ports_of_make_cluster(
    services: dict[str, Any], node: NodeSpec
) -> None:
    name, command = proxy_of(services, node)
    assert command[:2] == ["cloudstate-proxy", "serve"]
    expected = node.cluster_flags()
    for key, value in zip(expected[::2], expected[1::2], strict=True):
        assert flag(command, key) == value, key
    assert flag(command, "--port") == str(node.client_port)
    assert flag(command, "--user-function-port") == str(node.user_function_port)
    # Other containers reach its peer port by its service name.
    assert flag(command, "--peer-address") == f"{name}:{node.peer_port}"
    assert f"{node.client_port}:{node.client_port}" in services[name]["ports"]
    assert str(node.client_port) in " ".join(services[name]["healthcheck"]["test"])
    assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("node", NODES, ids=[n.node_id for n in NODES])
def test_each_proxy_has_its_own_user_function_beside_it(
    services: dict[str, Any], node: NodeSpec
) -> None:
    _, command = proxy_of(services, node)
    user_function = services[flag(command, "--user-function-host")]
    assert user_function["command"] == ["python", "-m", USER_FUNCTION_MODULE]
    assert user_function["environment"]["PORT"] == str(node.user_function_port)
    assert str(node.user_function_port) in " ".join(user_function["healthcheck"]["test"])


def test_all_proxies_share_one_postgres_journal(services: dict[str, Any]) -> None:
    urls = {flag(proxy_of(services, node)[1], "--journal-url") for node in NODES}
    assert len(urls) == 1
    assert urls.pop().startswith("postgresql://postgres:postgres@postgres:5432/")
    assert "healthcheck" in services["postgres"]


def test_the_image_is_python_3_11_slim_and_generates_the_protocol_code() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "python protos/generate.py" in dockerfile
