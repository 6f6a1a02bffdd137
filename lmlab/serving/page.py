"""The page at `lmlab serve`'s root (`GET /`): a chat and a completion box over the server's own API, streamed,
with each token's probability and its likeliest alternatives on hover, and the same prompt at several temperatures
side by side. One static file (static/page.html, tens of KB, its script and style inline): it loads nothing from
anywhere but this server, which its Content-Security-Policy enforces. The page itself holds no secret, so it is
answered without the API key; it sends the key it is given with each API request, which the server checks as
any client's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PAGE = Path(__file__).with_name("static") / "page.html"
# Inline script and style only; requests only to this server.
POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
          "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def add_page_route(app: Any) -> None:
    """GET / answers the page (read once, here)."""
    from fastapi.responses import Response

    html = PAGE.read_bytes()

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(html, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": POLICY, "Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff"})
