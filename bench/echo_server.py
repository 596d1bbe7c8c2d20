"""A bare gRPC server that answers every unary call with an empty message.

The transport ceiling: the same generator against it measures what gRPC in
Python costs on this machine with no proxy, user function or database.
Usage: python -m bench.echo_server PORT [grpcio|h2grpc] (default grpcio:
grpc.aio, the ceiling the proxy is compared with; h2grpc shows the built-in
stack's own cost).
"""

from __future__ import annotations

import asyncio
import gc
import sys

import grpc

from h2grpc.stacks import make_server


class _EchoHandler(grpc.GenericRpcHandler):
    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        return grpc.unary_unary_rpc_method_handler(
            _reply, request_deserializer=None, response_serializer=None
        )


async def _reply(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b""


async def main(port: int, stack: str) -> None:
    server = make_server(stack, ())
    server.add_generic_rpc_handlers((_EchoHandler(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    # The collector settings the proxy and the SDK's serve() use once serving.
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)
    await server.wait_for_termination()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "grpcio"))
