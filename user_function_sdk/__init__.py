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
`Projection` keeps a read model up to date from the proxy's event log.
"""

from .context import CommandContext, Forward, Metadata, SideEffect
from .discovery import ServiceInfo
from .entity import EntityOptions, EventSourcedEntity
from .errors import CommandFailed, ProtocolError, RecoveryError, RegistrationError
from .instance import CommandFailure, CommandResult, EntityInstance
from .projection import (
    Projection,
    ProjectionContext,
    ProjectionFailed,
    ProjectionOptions,
    run_projection,
)
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
    "Projection",
    "ProjectionContext",
    "ProjectionFailed",
    "ProjectionOptions",
    "ProtocolError",
    "RecoveryError",
    "RegistrationError",
    "ServerOptions",
    "ServiceInfo",
    "SideEffect",
    "UserFunctionServer",
    "run_projection",
    "serve",
]
