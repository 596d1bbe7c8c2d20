"""The shopping cart example's behaviour, through the SDK's test kit."""

from __future__ import annotations

from google.protobuf import empty_pb2

from examples.shoppingcart import domain_pb2 as domain
from examples.shoppingcart import shoppingcart_pb2 as api
from examples.shoppingcart.cart import create_entity
from user_function_sdk.testkit import EntityTestKit

USER = "cart1"


def add(product: str, name: str, quantity: int) -> api.AddLineItem:
    return api.AddLineItem(user_id=USER, product_id=product, name=name, quantity=quantity)


def remove(product: str) -> api.RemoveLineItem:
    return api.RemoveLineItem(user_id=USER, product_id=product)


def get_cart(kit: EntityTestKit[domain.Cart]) -> api.Cart:
    reply = kit.handle("GetCart", api.GetShoppingCart(user_id=USER)).reply
    assert isinstance(reply, api.Cart)
    return reply


def line(product: str, name: str, quantity: int) -> api.LineItem:
    return api.LineItem(product_id=product, name=name, quantity=quantity)


def test_entity_declaration() -> None:
    entity = create_entity()
    assert entity.service_name == "com.example.shoppingcart.ShoppingCart"
    assert entity.options.persistence_id == "shopping-cart"
    assert entity.options.snapshot_every == 5


def test_new_cart_is_empty() -> None:
    kit = EntityTestKit(create_entity(), entity_id=USER)
    assert get_cart(kit) == api.Cart()
    assert kit.events == ()


def test_add_items_merges_quantities() -> None:
    kit = EntityTestKit(create_entity(), entity_id=USER)
    result = kit.handle("AddItem", add("apple", "Apple", 2))
    assert result.reply == empty_pb2.Empty()
    expected_event = domain.ItemAdded(
        item=domain.LineItem(productId="apple", name="Apple", quantity=2)
    )
    assert result.events == (expected_event,)
    kit.handle("AddItem", add("pear", "Pear", 1))
    kit.handle("AddItem", add("apple", "Apple", 3))
    assert get_cart(kit) == api.Cart(items=[line("apple", "Apple", 5), line("pear", "Pear", 1)])


def test_adding_a_non_positive_quantity_fails() -> None:
    kit = EntityTestKit(create_entity(), entity_id=USER)
    for quantity in (-1, 0):
        result = kit.handle("AddItem", add("apple", "Apple", quantity))
        assert result.failure is not None
        assert result.failure.description == "Cannot add negative quantity of item apple"
        assert not result.failure.restart
        assert result.events == ()
    assert get_cart(kit) == api.Cart()


def test_remove_item() -> None:
    kit = EntityTestKit(create_entity(), entity_id=USER)
    kit.handle("AddItem", add("apple", "Apple", 2))
    kit.handle("AddItem", add("pear", "Pear", 1))
    result = kit.handle("RemoveItem", remove("apple"))
    assert result.reply == empty_pb2.Empty()
    assert result.events == (domain.ItemRemoved(productId="apple"),)
    assert get_cart(kit) == api.Cart(items=[line("pear", "Pear", 1)])


def test_removing_an_absent_item_fails() -> None:
    kit = EntityTestKit(create_entity(), entity_id=USER)
    result = kit.handle("RemoveItem", remove("apple"))
    assert result.failure is not None
    assert result.failure.description == "Cannot remove item apple because it is not in the cart."
    assert result.events == ()


def test_snapshot_every_five_events_is_the_domain_cart() -> None:
    kit = EntityTestKit(create_entity(), entity_id=USER)
    snapshots = [kit.handle("AddItem", add(f"p{i}", f"P{i}", 1)).snapshot for i in range(5)]
    assert snapshots[:4] == [None] * 4
    assert snapshots[4] == domain.Cart(
        items=[domain.LineItem(productId=f"p{i}", name=f"P{i}", quantity=1) for i in range(5)]
    )


def test_recovers_from_snapshot_and_events() -> None:
    kit = EntityTestKit(create_entity(), entity_id=USER)
    for i in range(6):
        kit.handle("AddItem", add("apple" if i % 2 else "pear", "Fruit", 1))
    kit.handle("RemoveItem", remove("pear"))
    restarted = kit.recovered()
    assert restarted.snapshot is not None and restarted.snapshot[0] == 5
    assert get_cart(restarted) == get_cart(kit) == api.Cart(items=[line("apple", "Fruit", 3)])


def test_rebuild_from_events() -> None:
    item = domain.LineItem(productId="apple", name="Apple", quantity=1)
    events = [domain.ItemAdded(item=item)] * 3 + [domain.ItemRemoved(productId="apple")]
    kit = EntityTestKit.from_events(create_entity(), events, entity_id=USER)
    assert kit.sequence_number == 4
    assert get_cart(kit) == api.Cart()
