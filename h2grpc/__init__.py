"""gRPC over HTTP/2 on asyncio, without grpc.aio's threads.

grpc.aio moves every message between threads (an event-engine thread reads
the socket, a poller thread hands the completion to the event loop through a
socket). On this project's two-core machines that costs more CPU per call
than the proxy's own work, so the proxy's front door, its channel to the user
function and the SDK's server use this small implementation instead: one
asyncio protocol per connection, frames parsed and written on the event
loop's thread, several frames per write.

`server()` and `insecure_channel()` return objects with the subset of
`grpc.aio.Server` and `grpc.aio.Channel` that grpc-generated code, grpcio's
health and reflection servicers and this project use; statuses and errors
are grpc's own types (`grpc.StatusCode`, `grpc.aio.AioRpcError`).
"""

from h2grpc.client import Channel, insecure_channel
from h2grpc.server import Server, server

__all__ = ["Channel", "Server", "insecure_channel", "server"]
