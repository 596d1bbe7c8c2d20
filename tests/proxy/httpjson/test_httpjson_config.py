"""The HTTP/JSON flags: disabled by default, flag and environment, validation."""

from __future__ import annotations

import pytest

from cloudstate_proxy.cli import build_parser, config_from_args
from cloudstate_proxy.config import ConfigError, HttpJsonConfig, ProxyConfig, ServerConfig
from cloudstate_proxy.httpjson import HttpJsonOptions


def parse(argv: list[str], environ: dict[str, str] | None = None) -> ProxyConfig:
    args = build_parser().parse_args(["serve", *argv])
    return config_from_args(args, environ or {})


def test_disabled_by_default() -> None:
    config = parse([])
    assert config.http_json == HttpJsonConfig(None, "")
    assert config.http_json_options() is None
    assert ProxyConfig().http_json_options() is None


def test_flag_binds_the_client_host_and_shares_limits() -> None:
    config = parse(
        [
            "--http-json-port",
            "9080",
            "--host",
            "127.0.0.1",
            "--max-message-size",
            "64KiB",
            "--shutdown-timeout",
            "2s",
        ]
    )
    assert config.http_json_options() == HttpJsonOptions(
        host="127.0.0.1", port=9080, max_body_size=64 * 1024, shutdown_timeout=2.0
    )


def test_environment_and_flag_precedence() -> None:
    environ = {"HTTP_JSON_PORT": "0", "HTTP_JSON_HOST": "::1"}
    options = parse([], environ).http_json_options()
    assert options is not None
    assert (options.host, options.port, options.address) == ("::1", 0, "[::1]:0")
    options = parse(["--http-json-port", "9181", "--http-json-host", "localhost"], environ)
    assert options.http_json == HttpJsonConfig(9181, "localhost")


def test_invalid_values_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(["--http-json-port", "70000"])
    assert exited.value.code == 2
    assert "--http-json-port: must be a port number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse([], {"HTTP_JSON_PORT": "web"})
    assert "--http-json-port (from HTTP_JSON_PORT): must be an integer" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--http-json-host"):
        HttpJsonConfig(9080, " ")
    with pytest.raises(ConfigError, match="--http-port"):
        ServerConfig(port=-1)
