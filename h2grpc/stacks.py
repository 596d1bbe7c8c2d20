"""Choosing between h2grpc and grpcio's grpc.aio where the project serves or calls gRPC.

h2grpc is the default; grpc.aio remains available (``--grpc-stack grpcio``
on the proxy, ``GRPC_STACK=grpcio`` for the SDK) for peers or features that
only grpcio offers (TLS, compression), and to compare the two.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import grpc

from h2grpc.client import insecure_channel
from h2grpc.server import server

STACKS = ("h2grpc", "grpcio")
DEFAULT_STACK = "h2grpc"


def check_stack(stack: str) -> str:
    if stack not in STACKS:
        raise ValueError(f"gRPC stack must be one of {', '.join(STACKS)}, not {stack!r}")
    return stack


def stack_from_env(variable: str = "GRPC_STACK") -> str:
    return check_stack(os.environ.get(variable, DEFAULT_STACK).strip().lower())


def make_server(stack: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Server:
    if check_stack(stack) == "grpcio":
        return grpc.aio.server(options=list(options))
    return server(options)


def make_channel(stack: str, target: str, options: Sequence[tuple[str, Any]]) -> Any:
    """A ``grpc.aio.Channel`` or its h2grpc counterpart (the same methods)."""
    if check_stack(stack) == "grpcio":
        return grpc.aio.insecure_channel(target, options=list(options))
    return insecure_channel(target, options)
