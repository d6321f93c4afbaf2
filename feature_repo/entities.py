"""Entities: who or what a feature row describes. Join keys match the canonical tables (ctrflow.data.tables)."""

from __future__ import annotations

from feast import Entity, ValueType

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="A user (user_id int64)")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="An item (item_id int64)")
