"""The shopping cart entity: add and remove line items, read the cart.

State and snapshot are the domain `Cart`; the events are `ItemAdded` (merged
into an existing line of the same product) and `ItemRemoved`.
"""

from __future__ import annotations

from google.protobuf import empty_pb2

from user_function_sdk import CommandContext, EventSourcedEntity

from . import domain_pb2 as domain
from . import shoppingcart_pb2 as api

SERVICE = api.DESCRIPTOR.services_by_name["ShoppingCart"]
PERSISTENCE_ID = "shopping-cart"
SNAPSHOT_EVERY = 5

Context = CommandContext[domain.Cart]


def add_item(cart: domain.Cart, item: api.AddLineItem, ctx: Context) -> empty_pb2.Empty:
    if item.quantity <= 0:
        ctx.fail(f"Cannot add negative quantity of item {item.product_id}")
    line = domain.LineItem(productId=item.product_id, name=item.name, quantity=item.quantity)
    ctx.emit(domain.ItemAdded(item=line))
    return empty_pb2.Empty()


def remove_item(cart: domain.Cart, item: api.RemoveLineItem, ctx: Context) -> empty_pb2.Empty:
    if not any(line.productId == item.product_id for line in cart.items):
        ctx.fail(f"Cannot remove item {item.product_id} because it is not in the cart.")
    ctx.emit(domain.ItemRemoved(productId=item.product_id))
    return empty_pb2.Empty()


def get_cart(cart: domain.Cart, request: api.GetShoppingCart, ctx: Context) -> api.Cart:
    return api.Cart(
        items=[
            api.LineItem(product_id=line.productId, name=line.name, quantity=line.quantity)
            for line in cart.items
        ]
    )


def item_added(cart: domain.Cart, event: domain.ItemAdded) -> domain.Cart:
    """Add the item, or its quantity to the line of the same product (pure)."""
    updated = domain.Cart()
    updated.CopyFrom(cart)
    for line in updated.items:
        if line.productId == event.item.productId:
            line.quantity += event.item.quantity
            return updated
    updated.items.append(event.item)
    return updated


def item_removed(cart: domain.Cart, event: domain.ItemRemoved) -> domain.Cart:
    return domain.Cart(items=[line for line in cart.items if line.productId != event.productId])


def snapshot(cart: domain.Cart) -> domain.Cart:
    return cart


def restore(snapshot: domain.Cart) -> domain.Cart:
    return snapshot


def create_entity() -> EventSourcedEntity[domain.Cart]:
    """A new shopping cart entity with all its handlers registered."""
    entity: EventSourcedEntity[domain.Cart] = EventSourcedEntity(
        SERVICE,
        persistence_id=PERSISTENCE_ID,
        snapshot_every=SNAPSHOT_EVERY,
        initial_state=lambda entity_id: domain.Cart(),
    )
    entity.command_handler("AddItem")(add_item)
    entity.command_handler("RemoveItem")(remove_item)
    entity.command_handler("GetCart")(get_cart)
    entity.event_handler(domain.ItemAdded)(item_added)
    entity.event_handler(domain.ItemRemoved)(item_removed)
    entity.snapshot(snapshot)
    entity.snapshot_handler(domain.Cart)(restore)
    return entity
