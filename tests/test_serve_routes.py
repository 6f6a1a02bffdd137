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
    assert answered().endswith("POST /tokenize and POST /detokenize") and "GET /v1/models/{id}" in answered()
    assert [label(p) for p in ("/v1/models/tiny", "/v1/completions", "/v2/x")] == ["/v1/models/{id}",
                                                                                 "/v1/completions", "other"]
    assert OPEN == ("/", "/health", "/metrics")
