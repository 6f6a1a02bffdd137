"""The route table of `lmlab serve` (lmlab.serving.routes.ROUTES) is what the app registers, and what the 404, the
metrics' labels and the API key's exemptions are read from."""

from __future__ import annotations

import pytest

from lmlab.serving.app import create_app
from lmlab.serving.routes import OPEN, ROUTES, answered, label
from lmlab.serving.state import State

pytest.importorskip("fastapi")


def test_the_app_registers_the_route_table_and_nothing_else():
    app = create_app(State(["tiny"], None, lambda state: None)).app.app  # inside the access log and the gate
    registered = {(method, route.path) for route in app.routes if getattr(route, "include_in_schema", False)
                  for method in route.methods}
    assert registered == {(r.method, r.path) for r in ROUTES}
    names = [f"{r.method} {r.label}" for r in ROUTES]  # the 404 lists every route, in the table's order
    assert answered() == f"{', '.join(names[:-1])} and {names[-1]}" and "GET /v1/models/{id}" in answered()
    assert all(label(r.path.replace("{model_id}", "tiny")) == r.label for r in ROUTES) and label("/v2/x") == "other"
    assert OPEN == ("/", *(r.path for r in ROUTES if not r.keyed))  # the page, and the routes that ask no key


def test_every_route_asks_for_the_key_and_waits_for_the_model_as_its_entry_says():
    from starlette.testclient import TestClient

    client = TestClient(create_app(State(["tiny"], "key", lambda state: None)))  # never loads: 503 where it waits
    for route in ROUTES:
        path = route.path.replace("{model_id}", "tiny")
        without = client.request(route.method, path).status_code
        keyed = client.request(route.method, path, headers={"Authorization": "Bearer key"}).status_code
        assert (without == 401) == route.keyed, f"{route.method} {route.path} without the key: {without}"
        assert (keyed == 503) == route.loading, f"{route.method} {route.path} while loading: {keyed}"
