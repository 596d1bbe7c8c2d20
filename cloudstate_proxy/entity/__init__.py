"""The entity layer: per-entity instances that speak the `handle` stream to the
user function and persist their events, and the manager that routes commands
to them.

    async with EntityManager(registry, store, store, channel, settings) as manager:
        reply = await manager.route(command)
"""

from __future__ import annotations

from .instance import EntityInstance, Phase
from .manager import EntityManager
from .model import AsOf, CommandReply, EntityCommand, EntitySettings, Metadata, Payload, Router

__all__ = [
    "AsOf",
    "CommandReply",
    "EntityCommand",
    "EntityInstance",
    "EntityManager",
    "EntitySettings",
    "Metadata",
    "Payload",
    "Phase",
    "Router",
]
