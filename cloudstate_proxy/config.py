"""The proxy's configuration: frozen, validated dataclasses built once at start-up.

Every setting is described once, in `SETTINGS`: its command-line flags, its
environment variable, its default and its check. `load_config` resolves each
setting (flag, else environment variable, else default) and raises
`ConfigError` with a message naming the flag (and the variable, when the value
came from the environment). The dataclasses re-run the same checks, so a
config built in code is as valid as one built from the command line.

Nothing here holds state: the resulting `ProxyConfig` is passed down to the
components that need it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from h2grpc.stacks import DEFAULT_STACK, STACKS

from .cluster.member import check_node_id, parse_address
from .entity.model import EntitySettings
from .httpjson.options import HttpJsonOptions

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
JOURNAL_SCHEMES = ("postgresql", "postgres", "sqlite", "memory")
MEMBERSHIPS = ("auto", "postgres", "static", "none")
_POSTGRES_SCHEMES = ("postgresql", "postgres")
_MAX_GRPC_MESSAGE = 2**31 - 1


class ConfigError(ValueError):
    """An invalid setting. The message names its flag (and environment variable)."""


# --- value parsers and checks -------------------------------------------------------
# A parser turns the textual form into a value; a check validates a value. Both
# raise ValueError with a message that does not name the setting (the caller does).

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _text(raw: str) -> str:
    return raw.strip()


def _integer(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"must be an integer, got {raw!r}") from None


def _duration(raw: str) -> float:
    """Seconds, as `30`, `2.5s`, `100ms` or `1m`."""
    match = _DURATION.match(raw)
    if match is None:
        raise ValueError(f"must be a duration such as 30, 2.5s, 100ms or 1m, got {raw!r}")
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]


def _size(raw: str) -> int:
    """Bytes, as `4194304`, `512KiB` or `4MiB` (K, M, G are powers of 1024)."""
    match = _SIZE.match(raw)
    if match is None:
        raise ValueError(f"must be a size such as 4194304, 512KiB or 4MiB, got {raw!r}")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _SIZE_UNITS[unit]


def _lower(raw: str) -> str:
    return raw.strip().lower()


def _non_empty(value: Any) -> None:
    if not str(value).strip():
        raise ValueError("must not be empty")


def _port(value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a port number between 0 and 65535, got {value}")


def _user_port(value: int) -> None:
    if not 1 <= value <= 65535:
        raise ValueError(f"must be a port number between 1 and 65535, got {value}")


def _non_negative(value: float) -> None:
    if not value >= 0:
        raise ValueError(f"must be 0 or more, got {value:g}")


def _positive(value: float) -> None:
    if not value > 0:
        raise ValueError(f"must be greater than 0, got {value:g}")


def _message_size(value: int) -> None:
    if not 1024 <= value <= _MAX_GRPC_MESSAGE:
        raise ValueError(f"must be between 1KiB and {_MAX_GRPC_MESSAGE} bytes, got {value}")


def _one_of(choices: tuple[str, ...]) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")

    return check


def _journal_url(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in JOURNAL_SCHEMES:
        raise ValueError(
            f"must be a postgresql://, sqlite:///<path> or memory:// URL, got {value!r}"
        )
    if parts.scheme == "sqlite" and not value.split("://", 1)[1].split("?", 1)[0].strip("/ "):
        raise ValueError(f"a sqlite URL needs a file path (sqlite:///<path>), got {value!r}")


def _static_peers(raw: str) -> tuple[tuple[str, str], ...]:
    """``node=host:port,node=host:port`` as (node id, address) pairs."""
    peers = []
    for item in raw.split(","):
        node_id, sep, address = item.strip().partition("=")
        if not sep:
            raise ValueError(f"must list node=host:port entries, got {item.strip()!r}")
        peers.append((node_id.strip(), address.strip()))
    return tuple(peers)


def _peer_list(value: tuple[tuple[str, str], ...]) -> None:
    ids = [node_id for node_id, _ in value]
    if len(set(ids)) != len(ids):
        raise ValueError(f"node ids must be unique, got {', '.join(ids)}")
    for node_id, address in value:
        check_node_id(node_id)
        parse_address(address, what=f"address of node {node_id!r}")


def _node_id(value: str) -> None:
    check_node_id(value)


def _peer_address(value: str) -> None:
    parse_address(value, what="peer address")


def _postgres_url(value: str) -> None:
    if urlsplit(value).scheme not in _POSTGRES_SCHEMES:
        raise ValueError(f"must be a postgresql:// URL, got {value!r}")


@dataclass(frozen=True, slots=True)
class Setting:
    """One configurable value: how it is spelled, documented, parsed and checked."""

    flags: tuple[str, ...]
    env: str | None
    default: str | None  # None: derived from other settings (see `help_default`)
    help: str
    parse: Callable[[str], Any] = _text
    check: Callable[[Any], None] = _non_empty
    help_default: str = ""
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return self.flags[0]

    def validate(self, value: Any, source: str = "") -> None:
        """Run the check, raising `ConfigError` naming the flag (and the source)."""
        try:
            self.check(value)
        except ValueError as exc:
            raise ConfigError(f"{self.flag}{source}: {exc}") from None


SETTINGS: Mapping[str, Setting] = {
    "user_function_host": Setting(
        ("--user-function-host",), "USER_FUNCTION_HOST", "127.0.0.1",
        "host of the user function's gRPC server",
    ),
    "user_function_port": Setting(
        ("--user-function-port",), "USER_FUNCTION_PORT", "8080",
        "port of the user function's gRPC server", _integer, _user_port,
    ),
    "host": Setting(
        ("--host",), "PROXY_HOST", "0.0.0.0",
        "address the client port binds to",
    ),
    "http_port": Setting(
        ("--http-port", "--port"), "HTTP_PORT", "9000",
        "client port serving the user's services over gRPC (0 picks a free port)",
        _integer, _port,
    ),
    "http_json_port": Setting(
        ("--http-json-port",), "HTTP_JSON_PORT", None,
        "port serving the user's services as HTTP/JSON (their google.api.http rules; "
        "POST /<service>/<method> for methods without one); 0 picks a free port",
        _integer, _port, help_default="disabled", metavar="PORT",
    ),
    "metrics_port": Setting(
        ("--metrics-port",), "METRICS_PORT", None,
        "port serving Prometheus metrics at GET /metrics (on the --host address); "
        "0 picks a free port",
        _integer, _port, help_default="disabled", metavar="PORT",
    ),
    "http_json_host": Setting(
        ("--http-json-host",), "HTTP_JSON_HOST", None,
        "address the HTTP/JSON port binds to", help_default="the --host address",
        metavar="HOST",
    ),
    "state_dir": Setting(
        ("--state-dir",), "STATE_DIR", ".state",
        "directory for local state (the default SQLite journal)", Path,
    ),
    "journal_url": Setting(
        ("--journal-url",), "JOURNAL_URL", None,
        "event store: postgresql://user:pass@host/db, sqlite:///<path> or memory://",
        check=_journal_url, help_default="sqlite:///<state dir, made absolute>/journal.db",
    ),
    "journal_start_timeout": Setting(
        ("--journal-start-timeout",), "JOURNAL_START_TIMEOUT", "60s",
        "how long to keep retrying, with backoff, while the journal's database cannot "
        "be reached at start (0: try once)",
        _duration, _non_negative, metavar="DURATION",
    ),
    "passivation_timeout": Setting(
        ("--passivation-timeout",), "PASSIVATION_TIMEOUT", "30s",
        "idle time before an entity is passivated, for services whose discovery names none",
        _duration, _positive, metavar="DURATION",
    ),
    "entity_queue_size": Setting(
        ("--entity-queue-size",), "ENTITY_QUEUE_SIZE", "100",
        "commands waiting per entity before clients get RESOURCE_EXHAUSTED",
        _integer, _positive, metavar="N",
    ),
    "max_entities": Setting(
        ("--max-entities",), "MAX_ENTITIES", "10000",
        "live entity instances at most (least recently used ones are passivated); each "
        "costs ~35 KB in the proxy and ~25 KB in a Python user function",
        _integer, _positive, metavar="N",
    ),
    "max_message_size": Setting(
        ("--max-message-size",), "MAX_MESSAGE_SIZE", "4MiB",
        "largest gRPC message to or from clients and the user function",
        _size, _message_size, metavar="SIZE",
    ),
    "recovery_timeout": Setting(
        ("--recovery-timeout",), "RECOVERY_TIMEOUT", "30s",
        "longest time an entity may take to recover (snapshot and event replay)",
        _duration, _positive, metavar="DURATION",
    ),
    "discovery_max_backoff": Setting(
        ("--discovery-max-backoff",), "DISCOVERY_MAX_BACKOFF", "10s",
        "longest pause between discovery attempts while the user function is not up",
        _duration, _positive, metavar="DURATION",
    ),
    "shutdown_timeout": Setting(
        ("--shutdown-timeout",), "SHUTDOWN_TIMEOUT", "10s",
        "on shutdown, how long in-flight requests may take to finish",
        _duration, _positive, metavar="DURATION",
    ),
    "grpc_stack": Setting(
        ("--grpc-stack",), "GRPC_STACK", DEFAULT_STACK,
        "gRPC implementation of the client port and of the user-function channel: "
        "h2grpc (built in, the fastest here) or grpcio (grpc.aio)",
        _lower, _one_of(STACKS),
    ),
    "log_level": Setting(
        ("--log-level",), "LOG_LEVEL", "info",
        "log level: " + ", ".join(LOG_LEVELS), _lower, _one_of(LOG_LEVELS),
    ),
    "log_format": Setting(
        ("--log-format",), "LOG_FORMAT", "text",
        "log format: text or json (one object per line)", _lower, _one_of(LOG_FORMATS),
    ),
    "proxy_name": Setting(
        ("--proxy-name",), "PROXY_NAME", "cloudstate-proxy-py",
        "proxy name reported to the user function at discovery",
    ),
    "membership": Setting(
        ("--membership",), "CLUSTER_MEMBERSHIP", "auto",
        "cluster membership: postgres (heartbeats in the shared database), static "
        "(--static-peers), none (a single node), or auto (postgres when the journal is on "
        "Postgres, else none)", _lower, _one_of(MEMBERSHIPS),
    ),
    "node_id": Setting(
        ("--node-id",), "NODE_ID", None,
        "this node's id in the cluster: unique, and stable across restarts", check=_node_id,
        help_default="<host name>-<client port>, or a random suffix with --port 0",
    ),
    "peer_host": Setting(
        ("--peer-host",), "PEER_HOST", "0.0.0.0",
        "address the peer port binds to (other proxies forward commands there; never "
        "expose it to clients)",
    ),
    "peer_port": Setting(
        ("--peer-port",), "PEER_PORT", "0",
        "peer port (0 picks a free one; with --membership static, this node's port in "
        "--static-peers)", _integer, _port,
    ),
    "peer_address": Setting(
        ("--peer-address",), "PEER_ADDRESS", None,
        "host:port at which the other proxies reach this node's peer port", check=_peer_address,
        help_default="<peer host, or this host's name for 0.0.0.0/::>:<bound peer port>",
    ),
    "static_peers": Setting(
        ("--static-peers",), "STATIC_PEERS", None,
        "with --membership static: every node of the cluster, this one included, as "
        "node=host:port,node=host:port", _static_peers, _peer_list, metavar="LIST",
    ),
    "membership_url": Setting(
        ("--membership-url",), "MEMBERSHIP_URL", None,
        "Postgres database of the membership table (cluster_members)", check=_postgres_url,
        help_default="the journal URL", metavar="URL",
    ),
    "cluster_name": Setting(
        ("--cluster-name",), "CLUSTER_NAME", "default",
        "nodes sharing a membership database form one cluster per name (give proxies of "
        "different user functions different names)",
    ),
    "heartbeat_interval": Setting(
        ("--heartbeat-interval",), "HEARTBEAT_INTERVAL", "1s",
        "how often a node renews its membership lease", _duration, _positive,
        metavar="DURATION",
    ),
    "lease_timeout": Setting(
        ("--lease-timeout",), "LEASE_TIMEOUT", "5s",
        "a node not renewed for this long is dropped and its entities move to other nodes "
        "(at least twice --heartbeat-interval)", _duration, _positive, metavar="DURATION",
    ),
}  # fmt: skip


def _validate(owner: object, fields: Mapping[str, str]) -> None:
    """Check the dataclass fields named in ``fields`` (field -> setting key)."""
    for attribute, key in fields.items():
        SETTINGS[key].validate(getattr(owner, attribute))


@dataclass(frozen=True, slots=True)
class UserFunctionConfig:
    """Where the user function's gRPC server listens."""

    host: str = "127.0.0.1"
    port: int = 8080

    def __post_init__(self) -> None:
        _validate(self, {"host": "user_function_host", "port": "user_function_port"})

    @property
    def address(self) -> str:
        """``host:port`` in gRPC target syntax (IPv6 literals bracketed)."""
        return _address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The client-facing gRPC server."""

    host: str = "0.0.0.0"
    port: int = 9000
    max_message_size: int = 4 * 1024 * 1024
    # Grace period for in-flight requests when the server stops.
    shutdown_timeout: float = 10.0
    # The gRPC implementation, for this server and the user-function channel.
    grpc_stack: str = DEFAULT_STACK

    def __post_init__(self) -> None:
        _validate(
            self,
            {
                "host": "host",
                "port": "http_port",
                "max_message_size": "max_message_size",
                "shutdown_timeout": "shutdown_timeout",
                "grpc_stack": "grpc_stack",
            },
        )

    @property
    def address(self) -> str:
        return _address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """How the proxy introduces itself to the user function and retries discovery."""

    proxy_name: str = "cloudstate-proxy-py"
    # Pause after the first failed attempt, doubled up to `max_backoff` (seconds).
    initial_backoff: float = 1.0
    max_backoff: float = 10.0
    # Deadline of one `discover` or `reportError` call (seconds).
    call_timeout: float = 10.0

    def __post_init__(self) -> None:
        _validate(self, {"proxy_name": "proxy_name", "max_backoff": "discovery_max_backoff"})
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ConfigError(
                f"--discovery-max-backoff: must be at least the initial backoff "
                f"({self.initial_backoff:g}s), got {self.max_backoff:g}"
            )
        if not self.call_timeout > 0:
            raise ConfigError(f"discovery call timeout must be > 0, got {self.call_timeout:g}")


@dataclass(frozen=True, slots=True)
class EntityConfig:
    """Limits of entity instances (see `EntitySettings`)."""

    passivation_timeout: float = 30.0
    queue_size: int = 100
    max_instances: int = 10_000
    recovery_timeout: float = 30.0

    def __post_init__(self) -> None:
        _validate(
            self,
            {
                "passivation_timeout": "passivation_timeout",
                "queue_size": "entity_queue_size",
                "max_instances": "max_entities",
                "recovery_timeout": "recovery_timeout",
            },
        )


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Cluster membership and the peer port (see `cloudstate_proxy.cluster`).

    Empty ``node_id``, ``peer_address`` and ``membership_url`` are derived at
    start-up (see their flags' help). ``static_peers`` lists (node id,
    host:port) pairs and is required exactly with ``membership="static"``.
    """

    membership: str = "auto"
    node_id: str = ""
    peer_host: str = "0.0.0.0"
    peer_port: int = 0
    peer_address: str = ""
    static_peers: tuple[tuple[str, str], ...] = ()
    membership_url: str = ""
    cluster_name: str = "default"
    heartbeat_interval: float = 1.0
    lease_timeout: float = 5.0

    def __post_init__(self) -> None:
        # Field names are their settings' keys; empty optional ones are derived later.
        always = ("membership", "peer_host", "peer_port", "cluster_name")
        optional = ("node_id", "peer_address", "static_peers", "membership_url")
        names = [*always, "heartbeat_interval", "lease_timeout"]
        names += [name for name in optional if getattr(self, name)]
        _validate(self, {name: name for name in names})
        if self.lease_timeout < 2 * self.heartbeat_interval:
            raise ConfigError(
                f"--lease-timeout: must be at least twice --heartbeat-interval "
                f"({self.heartbeat_interval:g}s), got {self.lease_timeout:g}s"
            )
        if (self.membership == "static") != bool(self.static_peers):
            raise ConfigError("--static-peers: needed with --membership static, and only then")
        listed = [node_id for node_id, _ in self.static_peers]
        if self.static_peers and self.node_id not in listed:
            raise ConfigError(
                f"--node-id: with --membership static it must be one of {', '.join(listed)}, "
                f"got {self.node_id!r}"
            )


@dataclass(frozen=True, slots=True)
class HttpJsonConfig:
    """The HTTP/JSON port beside the gRPC client port (`cloudstate_proxy.httpjson`):
    ``port`` None disables it, an empty ``host`` means the client port's host."""

    port: int | None = None
    host: str = ""

    def __post_init__(self) -> None:
        names = {"port": "http_json_port"} if self.port is not None else {}
        if self.host:
            names["host"] = "http_json_host"
        _validate(self, names)


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything the proxy needs to run; build it with `load_config` or in code.

    ``journal_url`` left empty means ``sqlite:///<state_dir>/journal.db``.
    """

    user_function: UserFunctionConfig = field(default_factory=UserFunctionConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    entities: EntityConfig = field(default_factory=EntityConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    http_json: HttpJsonConfig = field(default_factory=HttpJsonConfig)
    state_dir: Path = Path(".state")
    journal_url: str = ""
    # Port of the Prometheus metrics endpoint; None: not served.
    metrics_port: int | None = None
    # Seconds start-up keeps retrying a journal it cannot reach (0: once).
    journal_start_timeout: float = 60.0
    log_level: str = "info"
    log_format: str = "text"

    def __post_init__(self) -> None:
        if not self.journal_url:
            object.__setattr__(self, "journal_url", default_journal_url(self.state_dir))
        _validate(
            self,
            {
                "state_dir": "state_dir",
                "journal_url": "journal_url",
                "journal_start_timeout": "journal_start_timeout",
                "log_level": "log_level",
                "log_format": "log_format",
                **({"metrics_port": "metrics_port"} if self.metrics_port is not None else {}),
            },
        )
        if self.membership_mode == "postgres":
            try:
                _postgres_url(self.membership_url)
            except ValueError:
                raise ConfigError(
                    "--membership: postgres needs a Postgres database: a postgresql:// "
                    "journal, or --membership-url"
                ) from None

    @property
    def membership_mode(self) -> str:
        """``postgres``, ``static`` or ``none``: ``auto`` resolved by the journal URL."""
        mode = self.cluster.membership
        if mode == "auto":
            return "postgres" if urlsplit(self.journal_url).scheme in _POSTGRES_SCHEMES else "none"
        return mode

    @property
    def membership_url(self) -> str:
        """The database of the membership table: ``--membership-url``, else the journal."""
        return self.cluster.membership_url or self.journal_url

    def http_json_options(self) -> HttpJsonOptions | None:
        """The HTTP/JSON server's settings, or None when it is disabled. It
        shares the client port's message size limit and shutdown timeout."""
        if self.http_json.port is None:
            return None
        return HttpJsonOptions(
            host=self.http_json.host or self.server.host,
            port=self.http_json.port,
            max_body_size=self.server.max_message_size,
            shutdown_timeout=self.server.shutdown_timeout,
        )

    def entity_settings(self) -> EntitySettings:
        """The entity manager's limits."""
        return EntitySettings(
            queue_size=self.entities.queue_size,
            max_instances=self.entities.max_instances,
            default_passivation=self.entities.passivation_timeout,
            recovery_timeout=self.entities.recovery_timeout,
            max_message_size=self.server.max_message_size,
        )


def default_journal_url(state_dir: Path) -> str:
    """``sqlite:///<absolute state dir>/journal.db``: absolute, so that the URL
    means the same file whichever way a reader treats relative sqlite paths."""
    return f"sqlite://{(state_dir / 'journal.db').absolute()}"


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def load_config(values: Mapping[str, str | None], environ: Mapping[str, str]) -> ProxyConfig:
    """Build the config from flag values (setting key -> text or None) and the
    environment. A flag wins over its variable, which wins over the default.
    Raises `ConfigError` naming the flag of the first invalid setting."""
    resolved: dict[str, Any] = {}
    for key, setting in SETTINGS.items():
        raw, source = values.get(key), ""
        if raw is None and setting.env is not None and setting.env in environ:
            raw, source = environ[setting.env], f" (from {setting.env})"
        if raw is None:
            raw = setting.default
        if raw is None:
            resolved[key] = None
            continue
        try:
            resolved[key] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{setting.flag}{source}: {exc}") from None
        setting.validate(resolved[key], source)
    return _assemble(resolved)


def _assemble(v: Mapping[str, Any]) -> ProxyConfig:
    return ProxyConfig(
        user_function=UserFunctionConfig(v["user_function_host"], v["user_function_port"]),
        server=ServerConfig(
            v["host"],
            v["http_port"],
            v["max_message_size"],
            v["shutdown_timeout"],
            v["grpc_stack"],
        ),
        discovery=DiscoveryConfig(
            proxy_name=v["proxy_name"],
            initial_backoff=min(1.0, v["discovery_max_backoff"]),
            max_backoff=v["discovery_max_backoff"],
        ),
        entities=EntityConfig(
            passivation_timeout=v["passivation_timeout"],
            queue_size=v["entity_queue_size"],
            max_instances=v["max_entities"],
            recovery_timeout=v["recovery_timeout"],
        ),
        http_json=HttpJsonConfig(v["http_json_port"], v["http_json_host"] or ""),
        cluster=ClusterConfig(
            membership=v["membership"],
            node_id=v["node_id"] or "",
            peer_host=v["peer_host"],
            peer_port=v["peer_port"],
            peer_address=v["peer_address"] or "",
            static_peers=v["static_peers"] or (),
            membership_url=v["membership_url"] or "",
            cluster_name=v["cluster_name"],
            heartbeat_interval=v["heartbeat_interval"],
            lease_timeout=v["lease_timeout"],
        ),
        state_dir=v["state_dir"],
        journal_url=v["journal_url"] or "",
        journal_start_timeout=v["journal_start_timeout"],
        metrics_port=v["metrics_port"],
        log_level=v["log_level"],
        log_format=v["log_format"],
    )
