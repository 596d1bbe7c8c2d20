"""Configuration: flags, environment variables, defaults and validation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cloudstate_proxy.cli import build_parser, config_from_args, main
from cloudstate_proxy.config import (
    SETTINGS,
    ConfigError,
    DiscoveryConfig,
    EntityConfig,
    ProxyConfig,
    ServerConfig,
    UserFunctionConfig,
    load_config,
)
from cloudstate_proxy.entity.model import EntitySettings


def parse(argv: list[str], environ: dict[str, str] | None = None) -> ProxyConfig:
    args = build_parser().parse_args(["serve", *argv])
    return config_from_args(args, environ or {})


def test_defaults() -> None:
    config = parse([])
    assert config.user_function == UserFunctionConfig("127.0.0.1", 8080)
    assert config.user_function.address == "127.0.0.1:8080"
    assert config.server.host == "0.0.0.0"
    assert config.server.port == 9000
    assert config.server.max_message_size == 4 * 1024 * 1024
    assert config.state_dir == Path(".state")
    assert config.journal_url == f"sqlite://{Path.cwd()}/.state/journal.db"
    assert config.entities == EntityConfig(30.0, 100, 10_000, 30.0)
    assert config.discovery.initial_backoff == 1.0
    assert config.discovery.max_backoff == 10.0
    assert config.log_level == "info"
    assert config.server.grpc_stack == "h2grpc"
    assert parse(["--grpc-stack", "GRPCIO"]).server.grpc_stack == "grpcio"
    assert config == ProxyConfig()


def test_entity_settings_conversion() -> None:
    config = parse(
        [
            "--passivation-timeout=250ms",
            "--entity-queue-size=7",
            "--max-entities=9",
            "--recovery-timeout=1m",
            "--max-message-size=64KiB",
        ]
    )
    assert config.entity_settings() == EntitySettings(
        queue_size=7,
        max_instances=9,
        default_passivation=0.25,
        recovery_timeout=60.0,
        max_message_size=64 * 1024,
    )


def test_environment_variables_are_honoured() -> None:
    config = parse(
        [],
        {
            "USER_FUNCTION_HOST": "uf.local",
            "USER_FUNCTION_PORT": "8181",
            "HTTP_PORT": "9191",
            "STATE_DIR": "/tmp/proxy-state",
            "LOG_LEVEL": "DEBUG",
            "PASSIVATION_TIMEOUT": "5",
            "DISCOVERY_MAX_BACKOFF": "3s",
            "SHUTDOWN_TIMEOUT": "2",
            "PROXY_NAME": "edge",
        },
    )
    assert config.user_function.address == "uf.local:8181"
    assert config.server.port == 9191
    assert config.state_dir == Path("/tmp/proxy-state")
    assert config.journal_url == "sqlite:///tmp/proxy-state/journal.db"
    assert config.log_level == "debug"
    assert config.entities.passivation_timeout == 5.0
    assert config.discovery.max_backoff == 3.0
    assert config.server.shutdown_timeout == 2.0
    assert config.discovery.proxy_name == "edge"


def test_journal_url_from_environment() -> None:
    config = parse([], {"JOURNAL_URL": "postgresql://u:p@db/events"})
    assert config.journal_url == "postgresql://u:p@db/events"


def test_flag_wins_over_environment() -> None:
    config = parse(["--http-port", "9300"], {"HTTP_PORT": "9200"})
    assert config.server.port == 9300


def test_port_alias_and_port_zero() -> None:
    assert parse(["--port", "0"]).server.port == 0


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--user-function-port", "http"], "--user-function-port"),
        (["--user-function-port", "0"], "--user-function-port"),
        (["--user-function-host", " "], "--user-function-host"),
        (["--http-port", "70000"], "--http-port"),
        (["--port", "-1"], "--http-port"),
        (["--host", ""], "--host"),
        (["--journal-url", "mysql://db/x"], "--journal-url"),
        (["--journal-url", "sqlite:///"], "--journal-url"),
        (["--passivation-timeout", "soon"], "--passivation-timeout"),
        (["--passivation-timeout", "0"], "--passivation-timeout"),
        (["--entity-queue-size", "0"], "--entity-queue-size"),
        (["--max-entities", "many"], "--max-entities"),
        (["--max-message-size", "12"], "--max-message-size"),
        (["--max-message-size", "4 parsecs"], "--max-message-size"),
        (["--recovery-timeout", "-5"], "--recovery-timeout"),
        (["--discovery-max-backoff", "0s"], "--discovery-max-backoff"),
        (["--shutdown-timeout", "x"], "--shutdown-timeout"),
        (["--log-level", "chatty"], "--log-level"),
        (["--log-format", "xml"], "--log-format"),
        (["--grpc-stack", "netty"], "--grpc-stack"),
        (["--proxy-name", ""], "--proxy-name"),
    ],
)
def test_invalid_flag_exits_2_naming_it(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {flag}" in err, err


def test_invalid_environment_variable_names_flag_and_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HTTP_PORT", "ninety")
    with pytest.raises(SystemExit) as exited:
        main(["serve"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--http-port (from HTTP_PORT)" in err
    assert "ninety" in err


def test_help_documents_every_flag_with_env_and_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    # argparse wraps lines; compare without line breaks.
    text = " ".join(capsys.readouterr().out.split())
    for setting in SETTINGS.values():
        for flag in setting.flags:
            assert flag in text
        assert f"env {setting.env}" in text
        default = setting.default if setting.default is not None else setting.help_default
        assert f"default: {default}" in text


def test_top_level_help_lists_serve(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "serve" in capsys.readouterr().out


def test_dataclasses_validate_when_built_in_code() -> None:
    with pytest.raises(ConfigError, match="--http-port"):
        ServerConfig(port=70000)
    with pytest.raises(ConfigError, match="--user-function-port"):
        UserFunctionConfig(port=0)
    with pytest.raises(ConfigError, match="--entity-queue-size"):
        EntityConfig(queue_size=0)
    with pytest.raises(ConfigError, match="--discovery-max-backoff"):
        DiscoveryConfig(initial_backoff=2.0, max_backoff=1.0)
    with pytest.raises(ConfigError, match="--log-level"):
        replace(ProxyConfig(), log_level="loud")


def test_config_is_frozen() -> None:
    config = ProxyConfig()
    with pytest.raises(AttributeError):
        config.log_level = "debug"  # type: ignore[misc]


def test_ipv6_addresses_are_bracketed() -> None:
    assert UserFunctionConfig("::1", 8080).address == "[::1]:8080"
    assert ServerConfig(host="::", port=9000).address == "[::]:9000"


def test_load_config_without_a_parser() -> None:
    config = load_config({"http_port": "0"}, {"JOURNAL_URL": "memory://"})
    assert config.server.port == 0
    assert config.journal_url == "memory://"
