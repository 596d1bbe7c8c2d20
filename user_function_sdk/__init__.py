"""A Python SDK for Cloudstate (protocol 0.2) event-sourced user functions.

Declare an entity on the gRPC service it implements, register its handlers,
and serve it::

    cart = EventSourcedEntity("com.example.shoppingcart.ShoppingCart",
                              persistence_id="shopping-cart", snapshot_every=5,
                              initial_state=lambda entity_id: Cart())

    @cart.command_handler("AddItem")
    def add_item(state, item, ctx): ...

    serve([cart])

`user_function_sdk.testkit.EntityTestKit` runs an entity in memory for tests.
"""

from .context import CommandContext, Forward, Metadata, SideEffect
from .discovery import ServiceInfo
from .entity import EntityOptions, EventSourcedEntity
from .errors import CommandFailed, ProtocolError, RecoveryError, RegistrationError
from .instance import CommandFailure, CommandResult, EntityInstance
from .server import ServerOptions, UserFunctionServer, serve

__all__ = [
    "CommandContext",
    "CommandFailed",
    "CommandFailure",
    "CommandResult",
    "EntityInstance",
    "EntityOptions",
    "EventSourcedEntity",
    "Forward",
    "Metadata",
    "ProtocolError",
    "RecoveryError",
    "RegistrationError",
    "ServerOptions",
    "ServiceInfo",
    "SideEffect",
    "UserFunctionServer",
    "serve",
]
