"""The list of items, and the form that edits one: routes and views."""

from __future__ import annotations

from typing import Any

from pyramid.httpexceptions import HTTPNotFound, HTTPSeeOther  # type: ignore[import-untyped]
from sqlalchemy import select

from pyramid_app.models import Item


def list_items(request: Any) -> dict[str, Any]:
    items = request.dbsession.scalars(select(Item).order_by(Item.id)).all()
    return {"items": items}


def _item(request: Any) -> Item:
    item = request.dbsession.get(Item, int(request.matchdict["id"]))
    if item is None:
        raise HTTPNotFound()
    assert isinstance(item, Item)
    return item


def edit_form(request: Any) -> dict[str, Any]:
    item = _item(request)
    return {"item": item, "name": item.name, "description": item.description, "error": None}


def save(request: Any) -> Any:
    """Save the form; pyramid_tm commits after this returns, and alkey bumps then."""
    item = _item(request)
    name = request.POST.get("name", "").strip()
    description = request.POST.get("description", "").strip()
    if not name:
        return {"item": item, "name": name, "description": description, "error": "A name, please."}
    item.name, item.description = name, description
    return HTTPSeeOther(request.route_path("items"))


def includeme(config: Any) -> None:
    config.add_route("items", "/")
    config.add_route("edit", "/items/{id:\\d+}/edit")
    config.add_view(list_items, route_name="items", renderer="items.mako")
    config.add_view(edit_form, route_name="edit", renderer="edit.mako", request_method="GET")
    config.add_view(save, route_name="edit", renderer="edit.mako", request_method="POST")
