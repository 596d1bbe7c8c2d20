"""The ``cloudstate-proxy`` command line.

Subcommands:
  serve   run the proxy in front of a user function
  events  print the global event log, reading the journal directly

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
from pathlib import Path
from typing import Any

from . import __version__
from .app import run
from .config import (
    SETTINGS,
    ConfigError,
    ProxyConfig,
    Setting,
    UserFunctionConfig,
    default_journal_url,
    load_config,
)
from .discovery import DiscoveryError
from .errors import ProxyError
from .observability import configure_logging
from .readside import LogQuery
from .readside.events_command import FORMATS, EventsOptions, missing_journal, print_events
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
    _add_events_command(commands)
    return parser


def _add_events_command(commands: Any) -> None:
    events = commands.add_parser(
        "events",
        help="print the global event log, reading the journal directly",
        description=(
            "Print committed events in global offset order: offset, persistence id/entity "
            "id, sequence number, time, type and payload. Reads the journal itself; no proxy "
            "needs to run. Payloads are decoded to JSON with the user function's descriptors "
            "when --user-function-host/--user-function-port is given, else shown as base64."
        ),
    )
    add = events.add_argument
    add("--journal-url", metavar="URL", help=_help(SETTINGS["journal_url"]))
    add(
        "--state-dir",
        metavar="DIR",
        help="directory of the default SQLite journal [env STATE_DIR; default: .state]",
    )
    add("--persistence-id", metavar="ID", help="only events of this persistence id")
    add("--entity-id", metavar="ID", help="only events of this entity (needs --persistence-id)")
    add(
        "--after-offset",
        metavar="N",
        type=int,
        default=0,
        help="only events after this global offset [default: 0, from the beginning]",
    )
    add(
        "--follow",
        "-f",
        action="store_true",
        help="then keep printing new events as they are committed, until Ctrl-C",
    )
    add(
        "--format",
        choices=FORMATS,
        default="text",
        help="text (columns) or json (one object per line) [default: text]",
    )
    add(
        "--user-function-host",
        metavar="HOST",
        help="decode payloads with the types of the user function on this host "
        "[default: 127.0.0.1 when only the port is given]",
    )
    add(
        "--user-function-port",
        metavar="PORT",
        type=int,
        help="port of that user function [default: 8080 when only the host is given]",
    )
    events.set_defaults(command=_events, parser=events)


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


def events_options_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> EventsOptions:
    """The options of parsed ``events`` arguments, or exit with status 2 and a
    message naming the bad flag."""
    parser: argparse.ArgumentParser = args.parser
    url = args.journal_url or environ.get("JOURNAL_URL")
    if not url:
        url = default_journal_url(Path(args.state_dir or environ.get("STATE_DIR") or ".state"))
    user_function = None
    if args.user_function_host is not None or args.user_function_port is not None:
        host, port = args.user_function_host, args.user_function_port
        user_function = (
            "127.0.0.1" if host is None else host,
            8080 if port is None else port,
        )
    try:
        SETTINGS["journal_url"].validate(url)
        query = LogQuery(
            after_offset=args.after_offset,
            persistence_id=args.persistence_id,
            entity_id=args.entity_id,
            follow=args.follow,
        )
        return EventsOptions(
            journal_url=url,
            query=query,
            output_format=args.format,
            user_function=UserFunctionConfig(*user_function) if user_function else None,
        )
    except ValueError as exc:  # ConfigError is one, naming its flag
        parser.error(str(exc))


def _events(args: argparse.Namespace) -> int:
    options = events_options_from_args(args, os.environ)
    configure_logging("warning", "text")
    problem = missing_journal(options.journal_url)
    if problem:
        print(f"cloudstate-proxy events: {problem}", file=sys.stderr)
        return EXIT_FAILED
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(print_events(options, sys.stdout, sys.stderr))
    except KeyboardInterrupt:  # Ctrl-C: how --follow normally ends
        return EXIT_OK
    except BrokenPipeError:  # the reader went away (``| head``): not an error
        # Python would complain again flushing stdout at exit; point it elsewhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
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
