"""A small command-line client of the shopping cart, through a proxy.

    python -m examples.shoppingcart.client [--target localhost:9000] add USER PRODUCT NAME QTY
    python -m examples.shoppingcart.client remove USER PRODUCT
    python -m examples.shoppingcart.client get USER
    python -m examples.shoppingcart.client top [--view localhost:8090] [--limit N]

`top` asks the view process (python -m examples.shoppingcart.view) for the most
added products, not the proxy.

Exits 1 and prints the gRPC status when the call fails.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message

from . import shoppingcart_pb2 as api
from . import shoppingcart_pb2_grpc as api_grpc
from . import view_pb2 as view_api
from . import view_pb2_grpc as view_grpc

DEFAULT_TARGET = "localhost:9000"
DEFAULT_VIEW = "localhost:8090"
TIMEOUT = 10.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Call the shopping cart through a proxy.")
    parser.add_argument("--target", default=DEFAULT_TARGET, help="proxy host:port")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add an item to a cart")
    add.add_argument("user_id")
    add.add_argument("product_id")
    add.add_argument("name")
    add.add_argument("quantity", type=int)
    remove = commands.add_parser("remove", help="remove an item from a cart")
    remove.add_argument("user_id")
    remove.add_argument("product_id")
    get = commands.add_parser("get", help="show a cart")
    get.add_argument("user_id")
    top = commands.add_parser("top", help="show the most added products (from the view)")
    top.add_argument("--view", default=DEFAULT_VIEW, help="the view's host:port")
    top.add_argument("--limit", type=int, default=10)
    return parser.parse_args(argv)


def call(stub: api_grpc.ShoppingCartStub, args: argparse.Namespace) -> Message:
    if args.command == "add":
        request = api.AddLineItem(
            user_id=args.user_id, product_id=args.product_id, name=args.name, quantity=args.quantity
        )
        return stub.AddItem(request, timeout=TIMEOUT)
    if args.command == "remove":
        request = api.RemoveLineItem(user_id=args.user_id, product_id=args.product_id)
        return stub.RemoveItem(request, timeout=TIMEOUT)
    return stub.GetCart(api.GetShoppingCart(user_id=args.user_id), timeout=TIMEOUT)


def call_view(channel: grpc.Channel, args: argparse.Namespace) -> Message:
    stub = view_grpc.PopularProductsStub(channel)
    return stub.Top(view_api.TopRequest(limit=args.limit), timeout=TIMEOUT)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with grpc.insecure_channel(args.view if args.command == "top" else args.target) as channel:
        try:
            if args.command == "top":
                reply = call_view(channel, args)
            else:
                reply = call(api_grpc.ShoppingCartStub(channel), args)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    text = text_format.MessageToString(reply)
    print(text if text else "ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
