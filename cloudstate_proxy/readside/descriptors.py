"""Event payload decoding for people: the user function's types, fetched once.

`fetch_descriptors` asks the user function's discovery service (one attempt,
bounded by a timeout) for its descriptor set; `PayloadDecoder` then turns an
event's bytes into a JSON-ready dict when its type is known. Only this module
of the read side speaks the discovery messages.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError

from cloudstate import entity_pb2

from ..config import DiscoveryConfig, UserFunctionConfig
from ..discovery import DISCOVER_METHOD, proxy_info
from ..registry import SpecError, build_pool, load_descriptor_set

# How this tool introduces itself to the user function.
_AS_TOOL = DiscoveryConfig(proxy_name="cloudstate-proxy-py events")


class DescriptorsUnavailable(Exception):
    """The user function could not be asked for its types (or sent unusable ones)."""


async def fetch_descriptors(
    user_function: UserFunctionConfig, *, call_timeout: float
) -> descriptor_pool.DescriptorPool:
    """The types the user function at ``user_function`` declares, from one
    ``discover`` call. Raises `DescriptorsUnavailable`."""
    async with grpc.aio.insecure_channel(user_function.address) as channel:
        discover = channel.unary_unary(
            DISCOVER_METHOD,
            request_serializer=entity_pb2.ProxyInfo.SerializeToString,
            response_deserializer=entity_pb2.EntitySpec.FromString,
        )
        try:
            spec = await discover(proxy_info(_AS_TOOL), timeout=call_timeout)
        except grpc.aio.AioRpcError as exc:
            raise DescriptorsUnavailable(
                f"discovery at {user_function.address} failed: {exc.code().name}: {exc.details()}"
            ) from None
    try:
        return build_pool(load_descriptor_set(spec.proto))
    except SpecError as exc:
        raise DescriptorsUnavailable(f"unusable descriptors: {exc}") from None


class PayloadDecoder:
    """Decodes payloads whose ``type.googleapis.com/<full name>`` type is in ``pool``."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None) -> None:
        self._pool = pool

    def decode(self, type_url: str, payload: bytes) -> dict[str, Any] | None:
        """The payload as a dict in protobuf's JSON mapping (field names as in
        the .proto file), or None when its type is unknown or it does not parse."""
        if self._pool is None or "/" not in type_url:
            return None
        try:
            descriptor = self._pool.FindMessageTypeByName(type_url.rpartition("/")[2])
            message = message_factory.GetMessageClass(descriptor)()
            message.ParseFromString(payload)
            decoded: dict[str, Any] = json_format.MessageToDict(
                message, preserving_proto_field_name=True
            )
        except (KeyError, DecodeError, TypeError, ValueError):
            return None
        return decoded
