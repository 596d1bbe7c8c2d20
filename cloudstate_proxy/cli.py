"""The ``cloudstate-proxy`` command line.

Subcommands:
  serve   run the proxy in front of a user function

Every `serve` flag has an environment variable; see ``cloudstate-proxy serve --help``.
This module only parses arguments and wires objects together.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from . import __version__
from .app import run
from .config import SETTINGS, ConfigError, ProxyConfig, Setting, load_config
from .discovery import DiscoveryError
from .errors import ProxyError
from .observability import configure_logging
from .registry import SpecError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    return command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloudstate-proxy",
        description="An event-sourcing proxy that speaks the Cloudstate protocol (0.2).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the proxy in front of a user function",
        description=(
            "Discover the user function's services, then serve them to gRPC clients, "
            "keeping every entity's events in the journal. Each flag can also be set "
            "by the environment variable shown; the flag wins."
        ),
    )
    add_setting_arguments(serve)
    serve.set_defaults(command=_serve, parser=serve)
    return parser


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `SETTINGS` entry, documented with its variable and default."""
    for key, setting in SETTINGS.items():
        parser.add_argument(
            *setting.flags,
            dest=key,
            default=None,
            metavar=setting.metavar or key.rsplit("_", 1)[-1].upper(),
            help=_help(setting),
        )


def _help(setting: Setting) -> str:
    default = setting.default if setting.default is not None else setting.help_default
    env = f"env {setting.env}; " if setting.env else ""
    return f"{setting.help} [{env}default: {default}]".replace("%", "%%")


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> ProxyConfig:
    """The config of parsed ``serve`` arguments, or exit with status 2 and a
    message naming the bad flag."""
    values = {key: getattr(args, key) for key in SETTINGS}
    try:
        return load_config(values, environ)
    except ConfigError as exc:
        parser: argparse.ArgumentParser = args.parser
        parser.error(str(exc))


def _serve(args: argparse.Namespace) -> int:
    config = config_from_args(args, os.environ)
    configure_logging(config.log_level, config.log_format)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(run(config))
    except SpecError as exc:
        log.error("cannot serve the user function's entity spec: %s", exc)
        return EXIT_FAILED
    except (DiscoveryError, ProxyError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILED
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return EXIT_INTERRUPTED
    return EXIT_OK


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed, else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
